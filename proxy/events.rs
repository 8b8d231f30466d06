//! What happened, for an operator: a bounded ring of the last events (node
//! up and down, role and mode changes, failovers, reloads, pauses,
//! migrations, backups, shutdown), each logged at the level it deserves
//! when it is recorded. Read by SHOW EVENTS and `GET /events`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::json;

use crate::sync::lock;

/// How many events are kept.
pub const KEPT: usize = 1000;

/// How much an event matters; it is logged at this level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NodeUp,
    NodeDown,
    RoleChanged,
    ModeChanged,
    SplitBrain,
    SplitBrainOver,
    Failover,
    ReplicaExcluded,
    ReplicaReadmitted,
    ReloadApplied,
    ReloadRefused,
    Paused,
    Resumed,
    MigrationsApplied,
    MigrationsFailed,
    BackupTaken,
    BackupFailed,
    BackupPruned,
    RestoreChecked,
    RestoreCheckFailed,
    ShutdownStarted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NodeUp => "node up",
            Kind::NodeDown => "node down",
            Kind::RoleChanged => "role changed",
            Kind::ModeChanged => "mode changed",
            Kind::SplitBrain => "split brain: writes fenced",
            Kind::SplitBrainOver => "split brain over",
            Kind::Failover => "failover",
            Kind::ReplicaExcluded => "replica excluded from reads",
            Kind::ReplicaReadmitted => "replica readmitted",
            Kind::ReloadApplied => "reload applied",
            Kind::ReloadRefused => "reload refused",
            Kind::Paused => "paused",
            Kind::Resumed => "resumed",
            Kind::MigrationsApplied => "migrations applied",
            Kind::MigrationsFailed => "migrations failed",
            Kind::BackupTaken => "backup taken",
            Kind::BackupFailed => "backup failed",
            Kind::BackupPruned => "backup pruned",
            Kind::RestoreChecked => "restore check passed",
            Kind::RestoreCheckFailed => "restore check failed",
            Kind::ShutdownStarted => "shutdown started",
        }
    }
}

/// One thing that happened.
#[derive(Debug, Clone)]
pub struct Event {
    /// Increases by one per event, from 1: the `?since=` cursor.
    pub seq: u64,
    pub at: SystemTime,
    pub level: Level,
    pub kind: Kind,
    pub database: Option<String>,
    pub node: Option<String>,
    pub details: String,
}

impl Event {
    /// When it happened, UTC, to the millisecond (RFC 3339).
    pub fn time(&self) -> String {
        humantime::format_rfc3339_millis(self.at).to_string()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "seq": self.seq,
            "time": self.time(),
            "level": self.level.as_str(),
            "event": self.kind.as_str(),
            "database": self.database,
            "node": self.node,
            "details": self.details,
        })
    }
}

/// The ring.
#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    last: u64,
}

/// Where an event happened: a database, and a node of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct At<'a> {
    pub database: Option<&'a str>,
    pub node: Option<&'a str>,
}

impl<'a> At<'a> {
    pub fn database(database: &'a str) -> At<'a> {
        At {
            database: Some(database),
            node: None,
        }
    }

    pub fn node(database: &'a str, node: &'a str) -> At<'a> {
        At {
            database: Some(database),
            node: Some(node),
        }
    }
}

impl Events {
    /// Records and logs an event.
    pub fn record(&self, level: Level, kind: Kind, at: At<'_>, details: impl Into<String>) {
        let details = details.into();
        let (database, node) = (at.database.unwrap_or("-"), at.node.unwrap_or("-"));
        let event = kind.as_str();
        match level {
            Level::Info => tracing::info!(event, database, node, "{details}"),
            Level::Warn => tracing::warn!(event, database, node, "{details}"),
            Level::Error => tracing::error!(event, database, node, "{details}"),
        }
        let mut ring = lock(&self.ring);
        ring.last += 1;
        let seq = ring.last;
        if ring.events.len() == KEPT {
            ring.events.pop_front();
        }
        ring.events.push_back(Event {
            seq,
            at: SystemTime::now(),
            level,
            kind,
            database: at.database.map(str::to_string),
            node: at.node.map(str::to_string),
            details,
        });
    }

    /// The events after `seq`, oldest first (all kept ones for 0).
    pub fn since(&self, seq: u64) -> Vec<Event> {
        let ring = lock(&self.ring);
        ring.events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// The number of the last event recorded (0 before any).
    pub fn last(&self) -> u64 {
        lock(&self.ring).last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_events_and_a_cursor_reads_on() {
        let events = Events::default();
        for i in 0..KEPT + 5 {
            let at = At::node("app", "127.0.0.1:5432");
            events.record(Level::Info, Kind::NodeUp, at, format!("event {i}"));
        }
        let all = events.since(0);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].seq, 6, "the oldest went first");
        assert_eq!(events.last(), (KEPT + 5) as u64);
        let newer = events.since(events.last() - 2);
        assert_eq!(newer.len(), 2);
        assert_eq!(newer[1].details, format!("event {}", KEPT + 4));
        let json = newer[1].to_json();
        assert_eq!(json["event"], "node up");
        assert_eq!(json["database"], "app");
        assert!(
            json["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{json}"
        );
        assert!(events.since(events.last()).is_empty());
    }
}
