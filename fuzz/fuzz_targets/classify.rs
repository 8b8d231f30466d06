//! The SQL classifier and session-effects scan on arbitrary text: never a
//! panic, every span they report lies inside the text, and the one-pass
//! analysis a session runs on a Query answers as the two do apart.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgheal_protocol::classify::classify;
use pgheal_protocol::effects::{analyze, effects, Prepared};

fuzz_target!(|data: &[u8]| {
    let class = classify(data);
    let e = effects(data);
    assert_eq!(analyze(data), (class, e.clone()));
    for p in &e.prepared {
        assert!(p.span.start <= p.span.end && p.span.end <= data.len());
        match &p.command {
            Prepared::Prepare { body, .. } => assert!(body.end <= data.len()),
            Prepared::Execute { at, .. } => assert!(at.end <= data.len()),
            Prepared::Deallocate { .. } => {}
        }
    }
});
