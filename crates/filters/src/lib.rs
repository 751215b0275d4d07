//! Built-in filters.  One file per filter, each exporting a `SPEC`; a
//! filter holds its `next` backend and overrides only what it changes.

use nbdkit_backend::FilterSpec;

pub mod compressed;
pub mod cow;
pub mod log;
pub mod offset;
pub mod partition;
pub mod truncate;
mod window;

/// Every built-in filter, in the order `--help` lists them.
pub fn all() -> Vec<&'static FilterSpec> {
    vec![
        &compressed::XZ,
        &compressed::GZIP,
        &compressed::ZSTD,
        &compressed::BZIP2,
        &cow::SPEC,
        &log::SPEC,
        &offset::SPEC,
        &partition::SPEC,
        &truncate::SPEC,
    ]
}
