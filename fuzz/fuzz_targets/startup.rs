//! Startup packets (StartupMessage, SSLRequest, GSSENCRequest, Cancel) on
//! arbitrary bytes: never a panic, never more bytes claimed than given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgheal_protocol::startup;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((packet, len))) = startup::parse(data) {
        assert!(len <= data.len());
        if let startup::StartupPacket::Startup(msg) = packet {
            let _ = msg.param("user");
            let _ = msg.protocol_options().count();
        }
    }
});
