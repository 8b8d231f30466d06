//! Work pgheal does on the databases themselves: schema migrations before
//! serving, scheduled backups with their manifests, restores and restore
//! drills (with `progress` for the command line).

pub mod backup;
pub mod drill;
pub mod manifest;
pub mod migrate;
pub mod progress;
pub mod recover;
pub mod restore;

use std::path::PathBuf;

/// A PostgreSQL program (pg_dump, pg_restore, ...): on PATH, else in the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
        {
            return Some(found);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let program = e.path().join("bin").join(name);
            program.is_file().then_some((v, program))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, program)| program)
}
