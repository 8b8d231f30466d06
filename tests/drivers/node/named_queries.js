// node-postgres through pgheal in transaction mode: named queries (`name:`
// in the query config, prepared once per connection) from a pool larger
// than pgheal's server pool. Exits non-zero with a message on any wrong
// result.
const { Pool } = require('pg');

const CLIENTS = 8;
const ROUNDS = 40;

async function worker(pool, k) {
  for (let r = 0; r < ROUNDS; r++) {
    const i = ((k * ROUNDS + r) % 100) + 1;
    const res = await pool.query({
      name: 'item-by-id',
      text: 'SELECT name FROM items WHERE id = $1',
      values: [i],
    });
    if (res.rows.length !== 1 || res.rows[0].name !== `item-${i}`) {
      throw new Error(`item ${i}: ${JSON.stringify(res.rows)}`);
    }
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      await client.query({ name: 'bump', text: 'UPDATE items SET n = n + 1 WHERE id = $1', values: [i] });
      await client.query('COMMIT');
    } finally {
      client.release();
    }
  }
}

async function main() {
  const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: CLIENTS });
  try {
    await Promise.all([...Array(CLIENTS).keys()].map((k) => worker(pool, k)));
    const total = await pool.query('SELECT sum(n)::int AS s FROM items');
    if (total.rows[0].s !== CLIENTS * ROUNDS) {
      throw new Error(`updates lost or doubled: sum(n) = ${total.rows[0].s}`);
    }
    console.log(`node-postgres: ${CLIENTS} clients x ${ROUNDS} rounds ok`);
  } finally {
    await pool.end();
  }
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
