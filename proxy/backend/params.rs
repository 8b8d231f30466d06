//! Session parameters: what a client asked for in its startup packet, what
//! a server reported, and the SET/RESET that turns one into the other.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use pgheal_protocol::build;
use pgheal_protocol::startup::StartupMessage;

use crate::sync::{lock, FastHash, FastMap};

/// Parameters by case-folded name, keeping the name as first given.
/// Shared when cloned and copied on change: clients that logged in with
/// the same parameters (see [`Interned`]) and a server set to them hold
/// one map.
#[derive(Debug, Clone, Default)]
pub struct Params {
    map: Arc<Map>,
}

#[derive(Clone, Default)]
struct Map {
    entries: BTreeMap<String, (String, String)>,
    /// The entries as ParameterStatus messages, made at the first
    /// [`Params::status_messages`] and dropped at a change.
    status: OnceLock<Bytes>,
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entries.fmt(f)
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Params) -> bool {
        self.map.entries == other.map.entries
    }
}

impl Eq for Params {}

impl Hash for Params {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.map.entries.hash(state);
    }
}

/// Distinct parameter sets kept for sharing at most; past it a login
/// keeps its own.
const MAX_INTERNED: usize = 1024;

/// Parameter sets clients logged in with, so that a thousand clients of
/// one application hold one map (an idle client costs a pointer).
#[derive(Default)]
pub struct Interned(Mutex<Sets>);

#[derive(Default)]
struct Sets {
    shared: HashSet<Params, FastHash>,
    /// The set each startup packet's parameters made, by the packet's
    /// text, so that the next login that sends the same ones (the same
    /// application, most of them) finds its set without making it.
    by_startup: FastMap<Box<str>, Params>,
}

impl Interned {
    pub fn intern(&self, params: Params) -> Params {
        let mut sets = lock(&self.0);
        if let Some(known) = sets.shared.get(&params) {
            return known.clone();
        }
        if sets.shared.len() >= MAX_INTERNED {
            // Forget the sets no client holds any more (the startup texts
            // hold them too, and are found again at the next login).
            sets.by_startup.clear();
            sets.shared.retain(|p| Arc::strong_count(&p.map) > 1);
            if sets.shared.len() >= MAX_INTERNED {
                return params;
            }
        }
        sets.shared.insert(params.clone());
        params
    }

    /// The parameters `msg` asks for (see [`Params::from_startup`]), the
    /// set shared with earlier logins that asked for the same.
    pub fn from_startup(&self, msg: &StartupMessage) -> Result<Params, String> {
        if let Some(known) = lock(&self.0).by_startup.get(msg.text()) {
            return Ok(known.clone());
        }
        let params = self.intern(Params::from_startup(msg.params())?);
        let mut sets = lock(&self.0);
        if sets.by_startup.len() >= MAX_INTERNED {
            sets.by_startup.clear();
        }
        sets.by_startup.insert(msg.text().into(), params.clone());
        Ok(params)
    }
}

/// Startup keys that are not run-time parameters.
const NOT_PARAMETERS: [&str; 4] = ["user", "database", "replication", "options"];

impl Params {
    pub fn set(&mut self, name: &str, value: &str) {
        let key = name.to_ascii_lowercase();
        let map = Arc::make_mut(&mut self.map);
        map.status.take();
        match map.entries.get_mut(&key) {
            Some(entry) => entry.1 = value.to_string(),
            None => {
                map.entries
                    .insert(key, (name.to_string(), value.to_string()));
            }
        }
    }

    /// A ParameterStatus message per entry, in name order; made once per
    /// set and kept with it (a server's welcome goes to every client it
    /// welcomes).
    pub fn status_messages(&self) -> &[u8] {
        self.map.status.get_or_init(|| {
            let room = self.iter().map(|(n, v)| n.len() + v.len() + 7).sum();
            let mut out = BytesMut::with_capacity(room);
            for (name, value) in self.iter() {
                build::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
            }
            out.freeze()
        })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        // Keys are stored folded; a name that is already lower case (the
        // usual case, and the one on the data path) needs no new String.
        let entries = &self.map.entries;
        let entry = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            entries.get(&name.to_ascii_lowercase())
        } else {
            entries.get(name)
        };
        entry.map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map
            .entries
            .values()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.map.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.entries.is_empty()
    }

    /// The parameters a client's startup packet asks for, including those
    /// in `options` (`-c name=value`, `--name=value`).
    pub fn from_startup<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Params, String> {
        let mut out = Params::default();
        for (k, v) in params {
            if k == "options" {
                for (name, value) in parse_options(v)? {
                    out.set_checked(&name, &value)?;
                }
            } else if !NOT_PARAMETERS.contains(&k) && !k.starts_with("_pq_.") {
                out.set_checked(k, v)?;
            }
        }
        Ok(out)
    }

    fn set_checked(&mut self, name: &str, value: &str) -> Result<(), String> {
        if !is_parameter_name(name) {
            return Err(format!("unrecognized configuration parameter \"{name}\""));
        }
        self.set(name, value);
        Ok(())
    }

    /// The statements that take a server from `self` to `wanted`, or `None`
    /// when nothing differs. Values go through `set_config`, which reads
    /// them as a startup packet or postgresql.conf would: a list such as
    /// `search_path = a, b` stays a list.
    pub fn diff_sql(&self, wanted: &Params) -> Option<String> {
        if Arc::ptr_eq(&self.map, &wanted.map) {
            return None;
        }
        let mut sets = Vec::new();
        for (key, (name, value)) in wanted.map.entries.iter() {
            if self.map.entries.get(key).map(|(_, v)| v) != Some(value) {
                sets.push(format!(
                    "set_config({}, {}, false)",
                    quote_literal(name),
                    quote_literal(value)
                ));
            }
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql = format!("SELECT {};", sets.join(", "));
        }
        for (key, (name, _)) in self.map.entries.iter() {
            if !wanted.map.entries.contains_key(key) {
                sql.push_str(&format!("RESET {};", reset_name(name)));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

/// A parameter name as RESET takes it: plain when it is a plain (dotted)
/// identifier, quoted otherwise.
fn reset_name(name: &str) -> String {
    if is_parameter_name(name) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn is_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// A SQL string literal that reads back as `value` whether the session
/// has `standard_conforming_strings` on or off: a value holding a
/// backslash becomes an `E'...'` literal with the backslash doubled.
pub fn quote_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// Splits libpq's `options` string: words separated by spaces, `\` escapes.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = match w.as_str() {
            "-c" => it.next().ok_or("-c without a setting in options")?,
            _ if w.starts_with("--") => w[2..].to_string(),
            _ if w.starts_with("-c") => w[2..].to_string(),
            _ => return Err(format!("unsupported startup option \"{w}\"")),
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("option \"{setting}\" has no value"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Result<Params, String> {
        Params::from_startup(pairs.iter().copied())
    }

    fn startup_message(pairs: &[(&str, &str)]) -> StartupMessage {
        let mut buf = BytesMut::new();
        build::startup_message(&mut buf, pairs);
        match pgheal_protocol::startup::parse(&buf) {
            Ok(Some((pgheal_protocol::startup::StartupPacket::Startup(m), _))) => m,
            other => panic!("not a startup message: {other:?}"),
        }
    }

    #[test]
    fn startup_params_and_options() {
        let p = startup(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "app"),
            (
                "options",
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB",
            ),
        ])
        .expect("test input is valid");
        assert_eq!(p.get("APPLICATION_NAME"), Some("app"));
        assert_eq!(p.get("search_path"), Some("a,b"));
        assert_eq!(p.get("statement_timeout"), Some("5s"));
        assert_eq!(p.get("work_mem"), Some("1MB"));
        assert_eq!(p.get("user"), None);
        assert!(startup(&[("bad name", "x")]).is_err());
        assert!(startup(&[("options", "-x")]).is_err());
        assert!(startup(&[("options", "-c nothing")]).is_err());
    }

    #[test]
    fn diff_sets_changed_and_resets_missing() {
        let mut have = Params::default();
        have.set("TimeZone", "UTC");
        have.set("search_path", "old");
        let mut want = Params::default();
        want.set("timezone", "UTC");
        want.set("application_name", "it's");
        let sql = have.diff_sql(&want).expect("test input is valid");
        assert_eq!(
            sql,
            "SELECT set_config('application_name', 'it''s', false);RESET search_path;"
        );
        assert_eq!(want.diff_sql(&want), None);
    }

    #[test]
    fn literals_hold_under_either_string_setting() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        // E'' strings read backslashes the same way whatever
        // standard_conforming_strings says.
        assert_eq!(quote_literal(r"a\b"), r" E'a\\b'");
        assert_eq!(
            quote_literal(r"\'; DROP TABLE t; --"),
            r" E'\\''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn clients_with_the_same_parameters_share_one_map() {
        let startup = |app: &str| Params::from_startup([("application_name", app)]).expect("valid");
        let interned = Interned::default();
        let a = interned.intern(startup("web"));
        let b = interned.intern(startup("web"));
        assert!(Arc::ptr_eq(&a.map, &b.map));
        assert_eq!(a.diff_sql(&b), None);
        // A client that changes a setting gets a map of its own.
        let mut c = b.clone();
        c.set("search_path", "app");
        assert!(!Arc::ptr_eq(&a.map, &c.map));
        assert_eq!(a.get("search_path"), None);
        assert_eq!(c.get("application_name"), Some("web"));
        // Bounded: past the limit, sets nobody holds are forgotten.
        for i in 0..MAX_INTERNED + 10 {
            interned.intern(startup(&format!("app{i}")));
        }
        assert!(lock(&interned.0).shared.len() <= MAX_INTERNED);
        let d = interned.intern(startup("web"));
        assert!(Arc::ptr_eq(&a.map, &d.map), "a set still held stays shared");
    }

    #[test]
    fn a_startup_packet_sent_again_finds_its_set() {
        let interned = Interned::default();
        let web = [
            ("user", "u"),
            ("database", "d"),
            ("application_name", "web"),
        ];
        let a = interned
            .from_startup(&startup_message(&web))
            .expect("valid");
        let b = interned
            .from_startup(&startup_message(&web))
            .expect("valid");
        assert!(Arc::ptr_eq(&a.map, &b.map));
        assert_eq!(lock(&interned.0).by_startup.len(), 1);
        // Another user with the same settings: another text, the same set.
        let other = [("user", "v"), ("application_name", "web")];
        let c = interned
            .from_startup(&startup_message(&other))
            .expect("valid");
        assert!(Arc::ptr_eq(&a.map, &c.map));
        assert_eq!(c.get("application_name"), Some("web"));
        assert_eq!(c.get("user"), None);
        // A refused setting is refused every time, and not remembered.
        let bad = startup_message(&[("user", "u"), ("bad name", "x")]);
        assert!(interned.from_startup(&bad).is_err());
        assert!(interned.from_startup(&bad).is_err());
        assert_eq!(lock(&interned.0).by_startup.len(), 2);
        // Bounded like the sets.
        for i in 0..MAX_INTERNED + 10 {
            let name = format!("app{i}");
            let msg = startup_message(&[("user", "u"), ("application_name", &name)]);
            let p = interned.from_startup(&msg).expect("valid");
            assert_eq!(p.get("application_name"), Some(name.as_str()));
        }
        let sets = lock(&interned.0);
        assert!(sets.by_startup.len() <= MAX_INTERNED);
        assert!(sets.shared.len() <= MAX_INTERNED);
    }

    #[test]
    fn status_messages_follow_the_entries() {
        let expected = |p: &Params| {
            let mut out = BytesMut::new();
            for (name, value) in p.iter() {
                build::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
            }
            out.to_vec()
        };
        let mut a = Params::default();
        assert!(a.status_messages().is_empty());
        a.set("TimeZone", "UTC");
        a.set("server_version", "15.4");
        assert_eq!(a.status_messages(), expected(&a));
        // A copy changed afterwards has its own; the original keeps its.
        let mut b = a.clone();
        b.set("timezone", "Europe/Paris");
        assert_eq!(b.status_messages(), expected(&b));
        assert_ne!(a.status_messages(), b.status_messages());
        assert_eq!(a.status_messages(), expected(&a));
        // A change to a map held once drops what was made for it.
        a.set("application_name", "x");
        assert_eq!(a.status_messages(), expected(&a));
        assert_eq!(a, {
            let mut c = Params::default();
            c.set("application_name", "x");
            c.set("server_version", "15.4");
            c.set("TimeZone", "UTC");
            c
        });
    }
}
