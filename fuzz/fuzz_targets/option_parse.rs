//! Any bytes as an option header plus payload: parsing must never panic,
//! and whatever parses must encode back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbdkit_proto::option::OPTION_HEADER_LEN;
use nbdkit_proto::{OptionHeader, OptionRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = OptionHeader::parse(data) else { return };
    let payload = &data[OPTION_HEADER_LEN..];
    let payload = &payload[..payload.len().min(h.length as usize)];
    if let Ok(req) = OptionRequest::parse(h.option, payload) {
        if !matches!(req, OptionRequest::Unknown(_)) {
            let again = req.encode();
            assert_eq!(&again[OPTION_HEADER_LEN..], payload);
        }
    }
});
