//! Session state that follows a transaction-mode client from server to
//! server: its settings, and what pins it to one server.
//!
//! Settings are not parsed out of `SET`: after a transaction that changed
//! some, pgheal asks the server for their values (`current_setting`) before
//! giving it back. That is exact for every syntax, and a `SET` rolled back
//! or made `LOCAL` reads back as the value that stayed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pgheal_protocol::effects::{Effects, Pin, Prepared};

use super::Session;
use crate::backend::conn::{ServerConn, UpstreamError};
use crate::backend::params::quote_literal;
use crate::config::PoolMode;
use crate::frontend::App;

/// Settings a transaction may have changed.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    names: Vec<String>,
    /// Names whose last change was a RESET: back to the login value.
    reset: Vec<String>,
    reset_all: bool,
}

/// A client held on its server; counted while it lasts.
pub(super) struct Pinned {
    pub(super) reason: Pin,
    app: Arc<App>,
}

impl Pinned {
    fn new(reason: Pin, app: Arc<App>) -> Pinned {
        app.counters.pinned_clients.fetch_add(1, Ordering::Relaxed);
        Pinned { reason, app }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.app
            .counters
            .pinned_clients
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// Notes what a statement about to run does beyond its transaction.
    pub(super) fn take_effects(&mut self, effects: &Effects) {
        if effects.is_empty() {
            return;
        }
        if let Some(reason) = effects.pin {
            self.pin(reason);
        }
        if !effects.settings.is_empty() || effects.reset_all {
            let dirty = self.dirty.get_or_insert_with(Box::default);
            dirty.reset.retain(|n| !effects.settings.contains(n));
            dirty.reset.extend(effects.reset.iter().cloned());
            dirty.names.extend(effects.settings.iter().cloned());
            dirty.reset_all |= effects.reset_all;
        }
        let deallocate_all = effects
            .prepared
            .iter()
            .any(|p| p.command == Prepared::Deallocate { name: None });
        if effects.discard_all || deallocate_all {
            self.statements_mut().clear();
        }
    }

    fn pin(&mut self, reason: Pin) {
        if self.mode != PoolMode::Transaction || self.pinned.is_some() {
            return;
        }
        tracing::info!(
            reason = reason.as_str(),
            "client pinned to its server for the rest of its session"
        );
        self.pinned = Some(Pinned::new(reason, self.app.clone()));
    }

    /// Ends the pin when its server session is gone; returns what pinned it.
    pub(super) fn unpin(&mut self) -> Option<&'static str> {
        let p = self.pinned.take()?;
        tracing::warn!(
            reason = p.reason.as_str(),
            "pinned client's server session is gone"
        );
        Some(p.reason.as_str())
    }

    /// `DISCARD ALL`: the client's settings are those it logged in with.
    pub(super) fn restore_startup_params(&mut self) {
        if let Some(startup) = self.startup.take() {
            self.params = *startup;
        }
    }

    /// Before the server goes back: reads the settings the transaction may
    /// have changed, so the client keeps them on its next server.
    pub(super) async fn read_back(&mut self, conn: &mut ServerConn) -> Result<(), UpstreamError> {
        let Some(dirty) = self.dirty.take() else {
            return Ok(());
        };
        let mut names = dirty.names;
        if dirty.reset_all {
            names.extend(self.params.iter().map(|(n, _)| n.to_ascii_lowercase()));
            names.extend(conn.applied.iter().map(|(n, _)| n.to_ascii_lowercase()));
        }
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(());
        }
        let sql = read_back_sql(&names);
        let rows = conn.query_rows(&sql).await?;
        let values = rows.into_iter().next().unwrap_or_default();
        if self.startup.is_none() {
            self.startup = Some(Box::new(self.params.clone()));
        }
        for (name, value) in names.iter().zip(values) {
            if let Some(value) = value {
                self.params.set(name, &value);
                conn.applied.set(name, &value);
            }
        }
        // RESET returns to the value the client logged in with, as it
        // does on a server the client would have to itself.
        let startup = self.startup.as_deref().cloned().unwrap_or_default();
        if dirty.reset_all {
            self.params = startup;
        } else {
            for name in &dirty.reset {
                if let Some(value) = startup.get(name) {
                    self.params.set(name, value);
                }
            }
        }
        tracing::debug!(?names, "session settings carried over");
        Ok(())
    }
}

fn read_back_sql(names: &[String]) -> String {
    let columns: Vec<String> = names
        .iter()
        .map(|n| format!("current_setting({}, true)", quote_literal(n)))
        .collect();
    format!("SELECT {}", columns.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_back_quotes_names() {
        let sql = read_back_sql(&["timezone".into(), "app.it's".into()]);
        assert_eq!(
            sql,
            "SELECT current_setting('timezone', true), current_setting('app.it''s', true)"
        );
    }
}
