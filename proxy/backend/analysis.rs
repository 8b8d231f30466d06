//! What a prepared statement's SQL does, for routing (its class) and for
//! the session (its effects), remembered per thread. Drivers send the same
//! Parse text again and again (the unnamed statement of every extended
//! query, or a named one on every new connection). Looking at the text
//! twice (routing, translation) cost about a fifth of pgheal's work on a
//! short extended transaction; finding it again costs a hash and a
//! comparison.
//!
//! Only statement texts come here: a simple Query carries its values in the
//! text, so most are new (`Session::request_intent` looks at those once).

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::rc::Rc;

use lru::LruCache;
use pgheal_protocol::classify::Class;
use pgheal_protocol::effects::{self, Effects};

/// Texts longer than this are looked at each time: long texts are rarely
/// the ones sent again unchanged, and each remembered one is kept whole.
const MAX_TEXT: usize = 2048;

/// Texts each thread remembers (at most 512 KiB of text per thread).
const ENTRIES: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");

/// A text's class and effects, shared by the cache and whoever asked
/// (finding a text again copies a pointer, not the effects' lists).
pub type Analysis = Rc<(Class, Effects)>;

type Seen = LruCache<Box<[u8]>, Analysis>;

thread_local! {
    static SEEN: RefCell<Option<Seen>> = const { RefCell::new(None) };
}

/// [`effects::analyze`] of a statement's text, remembered.
pub fn statement(sql: &[u8]) -> Analysis {
    if sql.len() > MAX_TEXT {
        return Rc::new(effects::analyze(sql));
    }
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        let seen = seen.get_or_insert_with(|| LruCache::new(ENTRIES));
        if let Some(known) = seen.get(sql) {
            return known.clone();
        }
        let analysis = Rc::new(effects::analyze(sql));
        seen.put(sql.into(), analysis.clone());
        analysis
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_seen_again_gets_the_same_analysis() {
        for sql in [
            &b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"[..],
            b"SET search_path = app",
            b"PREPARE p AS SELECT 1; EXECUTE p",
            b"INSERT INTO t VALUES ($1) RETURNING id",
        ] {
            let first = statement(sql);
            assert_eq!(*first, effects::analyze(sql));
            let again = statement(sql);
            assert!(
                Rc::ptr_eq(&again, &first),
                "{}",
                String::from_utf8_lossy(sql)
            );
        }
    }

    #[test]
    fn texts_of_one_length_are_told_apart() {
        let read = statement(b"SELECT x FROM t");
        let write = statement(b"SELECT x INTO t");
        assert_eq!(read.0, Class::Read);
        assert_eq!(write.0, Class::Write);
    }

    #[test]
    fn the_oldest_texts_are_forgotten_and_long_ones_never_kept() {
        for i in 0..ENTRIES.get() + 10 {
            statement(format!("SELECT {i}").as_bytes());
        }
        let long = format!("SELECT '{}'", "x".repeat(MAX_TEXT));
        assert_eq!(statement(long.as_bytes()).0, Class::Read);
        SEEN.with(|seen| {
            let seen = seen.borrow();
            let seen = seen.as_ref().expect("used");
            assert_eq!(seen.len(), ENTRIES.get());
            assert!(!seen.contains(b"SELECT 0".as_slice()));
            assert!(!seen.contains(long.as_bytes()));
        });
    }
}
