//! Any bytes as a transmission request header, compact or extended.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbdkit_proto::RequestHeader;

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(h) = RequestHeader::parse(data, extended) {
            let _ = h.payload_len(extended);
            let len = RequestHeader::wire_len(extended);
            let mut again = h.encode(extended);
            again.truncate(len);
            assert_eq!(&again[..], &data[..len]);
        }
    }
});
