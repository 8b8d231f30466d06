//! Every parser gets arbitrary bytes and must answer without panicking, and
//! must never claim more bytes than it was given.

use pgheal_protocol::backend::{self, Authentication, ErrorFields, TxStatus};
use pgheal_protocol::frame::{self, Scanner, Step};
use pgheal_protocol::{effects, frontend, startup};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn scanner_consumes_within_bounds(data in proptest::collection::vec(any::<u8>(), 0..600),
                                      max in 5usize..400, chunk in 1usize..64) {
        let mut sc = Scanner::new(max);
        let mut pos = 0;
        let mut end = chunk.min(data.len());
        loop {
            match sc.next(&data[pos..end], |t| t.is_ascii_uppercase()) {
                Ok(Step::NeedMore) => {
                    if end == data.len() { break; }
                    end = (end + chunk).min(data.len());
                }
                Ok(step) => {
                    prop_assert!(step.consumed() > 0);
                    pos += step.consumed();
                    prop_assert!(pos <= end);
                }
                Err(_) => break,
            }
        }
    }

    #[test]
    fn message_and_header_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some(m)) = frame::message(&data, 1 << 20) {
            prop_assert!(m.len <= data.len());
            prop_assert_eq!(m.body.len() + frame::HEADER_LEN, m.len);
        }
        let _ = frame::header(&data, 1 << 20);
    }

    #[test]
    fn startup_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((_, n))) = startup::parse(&data) {
            prop_assert!(n <= data.len());
        }
    }

    #[test]
    fn startup_with_valid_length_never_panics(body in proptest::collection::vec(any::<u8>(), 4..200)) {
        let mut data = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        data.extend(&body);
        let _ = startup::parse(&data);
    }

    #[test]
    fn views_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = backend::parameter_status(&data);
        let _ = backend::backend_key_data(&data);
        let _ = backend::data_row(&data);
        let _ = ErrorFields::parse(&data);
        let _ = Authentication::parse(&data);
        let _ = TxStatus::parse(&data);
        let _ = frontend::password(&data);
        let _ = frontend::sasl_initial_response(&data);
        let _ = frontend::query(&data);
        let _ = frontend::parse(&data);
        let _ = frontend::bind(&data);
        let _ = frontend::target(&data);
    }

    #[test]
    fn effects_spans_stay_inside_the_text(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let e = effects::effects(&data);
        for p in &e.prepared {
            prop_assert!(p.span.end <= data.len());
            match &p.command {
                effects::Prepared::Prepare { body, .. } => prop_assert!(body.end <= data.len()),
                effects::Prepared::Execute { at, .. } => prop_assert!(at.end <= data.len()),
                effects::Prepared::Deallocate { .. } => {}
            }
        }
    }

    #[test]
    fn effects_of_sql_like_text(words in proptest::collection::vec(
        prop::sample::select(vec!["set", "reset", "prepare", "execute", "deallocate", "all", "session",
            "time", "zone", "\"x\"", "'v'", ";", "(", ")", "temp", "create", "listen", "with", "hold",
            "declare", "a.b", "$1", "--c\n", "prepare", "transaction"]), 0..12)) {
        let sql = words.join(" ");
        let e = effects::effects(sql.as_bytes());
        for p in &e.prepared {
            prop_assert!(p.span.end <= sql.len());
        }
    }
}
