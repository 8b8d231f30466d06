//! Finding, in a transaction's SQL, the name of a function whose effects
//! survive a rollback (such a transaction is never replayed).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use memchr::memmem::Finder;

/// Functions whose effects survive a rollback, never replayed whatever
/// the configuration says: `setval`, the `dblink` family (work done on
/// another server), `pg_logical_emit_message` (non-transactional messages).
pub const NEVER_REPLAYED: [&str; 3] = ["setval", "dblink", "pg_logical_emit_message"];

/// Finds, case-insensitively and anywhere in a query (strings, comments
/// and function bodies included, so a `DO` block counts too), the name of
/// a function whose effects survive a rollback.
#[derive(Debug, Clone)]
pub struct NeverReplayed {
    /// A searcher for each name, in lower case.
    names: Arc<[Finder<'static>]>,
    /// Tells this list from every other one built in this process, for
    /// answers cached per statement.
    generation: usize,
}

/// Lists of function names built so far.
static GENERATIONS: AtomicUsize = AtomicUsize::new(1);

/// SQL up to this long is lower-cased on the stack; longer SQL on the heap.
const ON_STACK: usize = 512;

impl NeverReplayed {
    /// [`NEVER_REPLAYED`] and `extra`.
    pub fn new(extra: &[String]) -> Result<NeverReplayed, String> {
        if extra.iter().any(|n| n.trim().is_empty()) {
            return Err("a function name must not be empty".into());
        }
        let names = NEVER_REPLAYED
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .map(|name| Finder::new(&name.to_ascii_lowercase()).into_owned())
            .collect();
        Ok(NeverReplayed {
            names,
            generation: GENERATIONS.fetch_add(1, Relaxed),
        })
    }

    /// True when `sql` names one of the functions (ASCII letters in any
    /// case). Every Query of a recorded transaction is asked: the SQL is
    /// lower-cased once and each name found by memchr's vectorised
    /// substring search, about 580 instructions for a pgbench statement,
    /// where an ASCII-case-insensitive aho-corasick automaton took 1,300.
    pub fn found_in(&self, sql: &[u8]) -> bool {
        let mut stack = [0u8; ON_STACK];
        let mut heap = Vec::new();
        let lower = match stack.get_mut(..sql.len()) {
            Some(lower) => {
                lower.copy_from_slice(sql);
                lower
            }
            None => {
                heap.extend_from_slice(sql);
                &mut heap[..]
            }
        };
        lower.make_ascii_lowercase();
        self.names.iter().any(|name| name.find(lower).is_some())
    }

    /// [`NeverReplayed::found_in`] for a statement's SQL, remembered in
    /// `cache` (0, or this list's generation with the answer in bit 0).
    pub fn found_in_cached(&self, sql: &[u8], cache: &AtomicUsize) -> bool {
        let known = cache.load(Relaxed);
        if known >> 1 == self.generation {
            return known & 1 == 1;
        }
        let found = self.found_in(sql);
        cache.store(self.generation << 1 | usize::from(found), Relaxed);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::{NeverReplayed, ON_STACK};

    #[test]
    fn a_cached_answer_holds_for_its_own_list_only() {
        let cache = std::sync::atomic::AtomicUsize::new(0);
        let sql = b"SELECT audit('x'), 1";
        let builtin = NeverReplayed::new(&[]).expect("built-in names");
        assert!(!builtin.found_in_cached(sql, &cache));
        assert!(!builtin.found_in_cached(sql, &cache), "cached");
        // A reload that lists `audit` is not fooled by the cached answer.
        let reloaded = NeverReplayed::new(&["AUDIT".into()]).expect("names");
        assert!(reloaded.found_in_cached(sql, &cache));
        assert!(reloaded.found_in_cached(sql, &cache));
        assert!(NeverReplayed::new(&[" ".into()]).is_err());
    }

    #[test]
    fn names_are_found_in_any_case_anywhere() {
        let names = NeverReplayed::new(&["Audit_Me".into()]).expect("names");
        for sql in [
            "SELECT setval('s', 1)",
            "select SetVal('s', 1)",
            "DO $$ BEGIN PERFORM dblink_exec('x'); END $$",
            "SELECT 1 -- audit_me",
            "SELECT 'AUDIT_ME'",
            "SELECT pg_logical_emit_message(true, 'p', 'm')",
            "setval",
        ] {
            assert!(names.found_in(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "",
            "SELECT set_val(1)",
            "SELECT d blink",
            "SELECT audit_m",
            "é",
        ] {
            assert!(!names.found_in(sql.as_bytes()), "{sql}");
        }
    }

    /// Every length around the stack buffer's, with the name at its start,
    /// across its end and at the very end of the SQL.
    #[test]
    fn long_sql_is_searched_whole() {
        let names = NeverReplayed::new(&[]).expect("names");
        for len in [
            ON_STACK - 7,
            ON_STACK - 1,
            ON_STACK,
            ON_STACK + 1,
            3 * ON_STACK,
        ] {
            let blank = vec![b'x'; len];
            assert!(!names.found_in(&blank), "{len}");
            for at in [0, len / 2, ON_STACK - 3, len - 6] {
                if at + 6 > len {
                    continue;
                }
                let mut sql = blank.clone();
                sql[at..at + 6].copy_from_slice(b"SETval");
                assert!(names.found_in(&sql), "{len} {at}");
            }
        }
    }

    /// Against the plainest search there is, on SQL made of the names'
    /// letters in random case (a small xorshift, so a failure repeats).
    #[test]
    fn agrees_with_a_plain_search() {
        let list = ["setval", "dblink", "pg_logical_emit_message", "x_y"];
        let names = NeverReplayed::new(&["X_Y".into()]).expect("names");
        let alphabet = b"setvaldbinkpg_ocmXY ";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut found = 0;
        for _ in 0..20_000 {
            let len = (next() % 700) as usize;
            let sql: Vec<u8> = (0..len)
                .map(|_| {
                    let c = alphabet[(next() % alphabet.len() as u64) as usize];
                    if next() % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            let plain = list.iter().any(|n| {
                sql.windows(n.len())
                    .any(|w| w.eq_ignore_ascii_case(n.as_bytes()))
            });
            assert_eq!(
                names.found_in(&sql),
                plain,
                "{}",
                String::from_utf8_lossy(&sql)
            );
            found += usize::from(plain);
        }
        assert!(
            found > 100,
            "the generated SQL names a function now and then ({found})"
        );
    }
}
