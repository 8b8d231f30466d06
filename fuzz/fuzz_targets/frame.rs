//! The frame scanner and message views on arbitrary bytes, fed in chunks:
//! never a panic, never more bytes claimed than given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgheal_protocol::frame::{self, Scanner, Step};
use pgheal_protocol::{backend, frontend};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut scanner = Scanner::new(1 << 16);
    let (mut pos, mut end) = (0, chunk.min(data.len()));
    loop {
        match scanner.next(&data[pos..end], |t| t.is_ascii_uppercase()) {
            Ok(Step::NeedMore) if end == data.len() => break,
            Ok(Step::NeedMore) => end = (end + chunk).min(data.len()),
            Ok(step) => {
                assert!(step.consumed() > 0);
                pos += step.consumed();
                assert!(pos <= end);
            }
            Err(_) => break,
        }
    }
    if let Ok(Some(m)) = frame::message(data, 1 << 20) {
        assert!(m.len <= data.len());
        let body = m.body;
        let _ = backend::ErrorFields::parse(body);
        let _ = backend::parameter_status(body);
        let _ = backend::data_row(body);
        let _ = backend::Authentication::parse(body);
        let _ = frontend::parse(body);
        let _ = frontend::bind(body);
        let _ = frontend::target(body);
        let _ = frontend::query(body);
        let _ = frontend::password(body);
        let _ = frontend::sasl_initial_response(body);
    }
});
