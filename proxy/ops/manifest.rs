//! The manifest beside each dump (`NAME-….dump.json`): what the database
//! held when the dump was taken — its encoding and the exact row count of
//! every table, counted under the dump's own snapshot — and the outcome of
//! the last restore drill of that dump.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::conn::{ServerConn, UpstreamError};

/// What a manifest says about one dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The configured database (`[databases.NAME]`).
    pub database: String,
    /// The database's name on the server.
    pub dbname: String,
    pub taken_at: String,
    /// The node the dump was taken from.
    pub source: String,
    pub server_version: String,
    pub encoding: String,
    /// Every table whose rows the dump holds, with its row count; `None`
    /// for an unlogged table dumped from a replica (pg_dump skips its rows).
    pub tables: Vec<TableRows>,
    /// The last restore drill of this dump, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_check: Option<RestoreCheckOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub name: String,
    pub rows: Option<u64>,
}

impl TableRows {
    /// `schema.name` as psql shows it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// When a restore drill ran on this dump and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreCheckOutcome {
    /// UTC, `YYYYMMDDTHHMMSSZ`.
    pub at: String,
    pub target: String,
    /// `None`: every table restored with its recorded row count.
    pub error: Option<String>,
}

/// Where the manifest of `dump` lives.
pub fn path_of(dump: &Path) -> PathBuf {
    let mut name = dump.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

impl Manifest {
    /// The manifest beside `dump`; `None` when there is none (a dump taken
    /// before manifests existed) or it cannot be read.
    pub fn read(dump: &Path) -> Option<Manifest> {
        let text = std::fs::read(path_of(dump)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes it beside `dump`, through a temporary file and a rename, so a
    /// reader never sees half of one. The temporary file is hidden
    /// (`.NAME-….dump.json.tmp`), like a dump being written, so that what
    /// lists backups never takes it for one.
    pub fn write(&self, dump: &Path) -> std::io::Result<()> {
        let path = path_of(dump);
        let mut hidden = std::ffi::OsString::from(".");
        hidden.push(path.file_name().unwrap_or_default());
        hidden.push(".tmp");
        let tmp = path.with_file_name(hidden);
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// The recorded counts by `schema.name`.
    pub fn counts(&self) -> BTreeMap<String, Option<u64>> {
        self.tables
            .iter()
            .map(|t| (t.qualified(), t.rows))
            .collect()
    }
}

/// The tables pg_dump dumps the rows of (ordinary tables and partitions,
/// not catalogs, temporary tables or extension members) with their exact
/// row counts, read in the connection's current transaction. Each count
/// runs as its own query, built and quoted by the server (`format('%I')`),
/// through `query_to_xml` so that one statement counts them all. Unlogged
/// tables count as `None` on a replica, where pg_dump skips their rows.
const COUNT_ROWS: &str = "\
SELECT n.nspname, c.relname,
       CASE WHEN c.relpersistence = 'u' AND pg_is_in_recovery() THEN NULL
            ELSE (xpath('/row/n/text()', query_to_xml(
                    format('SELECT count(*) AS n FROM ONLY %I.%I', n.nspname, c.relname),
                    false, true, '')))[1]::text
       END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp_)'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype = 'e')
 ORDER BY 1, 2";

/// Counts the rows of every table the way [`COUNT_ROWS`] says.
pub async fn count_rows(conn: &mut ServerConn) -> Result<Vec<TableRows>, UpstreamError> {
    let rows = conn.query_rows(COUNT_ROWS).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut cols = r.into_iter();
            let mut next = || cols.next().flatten();
            TableRows {
                schema: next().unwrap_or_default(),
                name: next().unwrap_or_default(),
                rows: next().and_then(|n| n.parse().ok()),
            }
        })
        .collect())
}

/// How a restored database differs from what the manifest recorded: one
/// line per table that is missing or holds another number of rows.
pub fn differences(recorded: &Manifest, restored: &[TableRows]) -> Vec<String> {
    let found: BTreeMap<String, Option<u64>> =
        restored.iter().map(|t| (t.qualified(), t.rows)).collect();
    let mut out = Vec::new();
    for table in &recorded.tables {
        let Some(want) = table.rows else {
            continue;
        };
        match found.get(&table.qualified()) {
            None => out.push(format!("{}: missing", table.qualified())),
            Some(&got) if got != Some(want) => out.push(format!(
                "{}: {} rows, {want} when the dump was taken",
                table.qualified(),
                got.map_or("?".to_string(), |n| n.to_string())
            )),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, rows: Option<u64>) -> TableRows {
        TableRows {
            schema: "public".into(),
            name: name.into(),
            rows,
        }
    }

    #[test]
    fn differences_name_missing_and_miscounted_tables() {
        let recorded = Manifest {
            database: "app".into(),
            dbname: "app".into(),
            taken_at: "20261201T000000Z".into(),
            source: "127.0.0.1:5432".into(),
            server_version: "15".into(),
            encoding: "UTF8".into(),
            tables: vec![
                table("a", Some(3)),
                table("b", Some(2)),
                table("c", Some(0)),
                table("unlogged", None),
            ],
            restore_check: None,
        };
        let restored = [
            table("a", Some(3)),
            table("b", Some(1)),
            table("extra", Some(9)),
        ];
        assert_eq!(
            differences(&recorded, &restored),
            [
                "public.b: 1 rows, 2 when the dump was taken",
                "public.c: missing"
            ]
        );
        let dir = tempfile::tempdir().expect("dir");
        let dump = dir.path().join("app-20261201T000000Z.dump");
        assert_eq!(Manifest::read(&dump), None);
        recorded.write(&dump).expect("write");
        assert_eq!(Manifest::read(&dump), Some(recorded));
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(files, ["app-20261201T000000Z.dump.json"]);
    }
}
