//! Whole-image fuzzing: open plus reads at fuzzer-chosen offsets through
//! the seekable crate, compared with a reference decoder (see
//! image_common.rs).  Seeded with images made by the format's own tools.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "image_common.rs"]
mod image_common;

fuzz_target!(|data: &[u8]| {
    let _ = image_common::run(data);
});
