//! The SQL classifier and session-effects scan on arbitrary text: never a
//! panic, and every span they report lies inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgheal_protocol::classify::classify;
use pgheal_protocol::effects::{effects, Prepared};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    let e = effects(data);
    for p in &e.prepared {
        assert!(p.span.start <= p.span.end && p.span.end <= data.len());
        match &p.command {
            Prepared::Prepare { body, .. } => assert!(body.end <= data.len()),
            Prepared::Execute { at, .. } => assert!(at.end <= data.len()),
            Prepared::Deallocate { .. } => {}
        }
    }
});
