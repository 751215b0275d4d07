//! The data plugin's expression language (`data='0 1 @0x1fe 0x55 0xaa'`)
//! on arbitrary text.  Files and scripts are off and the expansion limit is
//! small, so every input must end in an image within the limit or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdkit_plugins::data::expr::{evaluate, Context};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // $a and $b refer to each other's text, so variables are exercised too.
    let var = |name: &str| match name {
        "a" => Some("0x55 $b".to_string()),
        "b" => Some("( 1 2 )*3 $a".to_string()),
        _ => None,
    };
    let ctx = Context {
        var: &var,
        allow_io: false,
        limit: 1 << 20,
    };
    if let Ok(img) = evaluate(text, &ctx) {
        assert!(img.data_len() <= 1 << 20);
        assert!(img.size <= i64::MAX as u64);
        let mut end = 0;
        for (o, d) in img.runs() {
            assert!(o >= end && !d.is_empty());
            end = o + d.len() as u64;
        }
        assert!(end <= img.size);
    }
});
