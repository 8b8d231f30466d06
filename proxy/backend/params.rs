//! Session parameters: what a client asked for in its startup packet, what
//! a server reported, and the SET/RESET that turns one into the other.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::sync::{lock, FastHash};

/// Parameters by case-folded name, keeping the name as first given.
/// Shared when cloned and copied on change: clients that logged in with
/// the same parameters (see [`Interned`]) and a server set to them hold
/// one map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Params {
    map: Arc<BTreeMap<String, (String, String)>>,
}

/// Distinct parameter sets kept for sharing at most; past it a login
/// keeps its own.
const MAX_INTERNED: usize = 1024;

/// Parameter sets clients logged in with, so that a thousand clients of
/// one application hold one map (an idle client costs a pointer).
#[derive(Default)]
pub struct Interned(Mutex<HashSet<Params, FastHash>>);

impl Interned {
    pub fn intern(&self, params: Params) -> Params {
        let mut set = lock(&self.0);
        if let Some(known) = set.get(&params) {
            return known.clone();
        }
        if set.len() >= MAX_INTERNED {
            // Forget the sets no client holds any more.
            set.retain(|p| Arc::strong_count(&p.map) > 1);
            if set.len() >= MAX_INTERNED {
                return params;
            }
        }
        set.insert(params.clone());
        params
    }
}

/// Startup keys that are not run-time parameters.
const NOT_PARAMETERS: [&str; 4] = ["user", "database", "replication", "options"];

impl Params {
    pub fn set(&mut self, name: &str, value: &str) {
        let key = name.to_ascii_lowercase();
        let map = Arc::make_mut(&mut self.map);
        match map.get_mut(&key) {
            Some(entry) => entry.1 = value.to_string(),
            None => {
                map.insert(key, (name.to_string(), value.to_string()));
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        // Keys are stored folded; a name that is already lower case (the
        // usual case, and the one on the data path) needs no new String.
        let entry = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.map.get(&name.to_ascii_lowercase())
        } else {
            self.map.get(name)
        };
        entry.map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.values().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The parameters a client's startup packet asks for, including those
    /// in `options` (`-c name=value`, `--name=value`).
    pub fn from_startup(params: &[(String, String)]) -> Result<Params, String> {
        let mut out = Params::default();
        for (k, v) in params {
            if k == "options" {
                for (name, value) in parse_options(v)? {
                    out.set_checked(&name, &value)?;
                }
            } else if !NOT_PARAMETERS.contains(&k.as_str()) && !k.starts_with("_pq_.") {
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
        for (key, (name, value)) in wanted.map.iter() {
            if self.map.get(key).map(|(_, v)| v) != Some(value) {
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
        for (key, (name, _)) in self.map.iter() {
            if !wanted.map.contains_key(key) {
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
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Params::from_startup(&v)
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
        let startup = |app: &str| {
            let list = [("application_name".to_string(), app.to_string())];
            Params::from_startup(&list).expect("valid")
        };
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
        assert!(lock(&interned.0).len() <= MAX_INTERNED);
        let d = interned.intern(startup("web"));
        assert!(Arc::ptr_eq(&a.map, &d.map), "a set still held stays shared");
    }
}
