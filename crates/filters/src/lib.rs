//! Built-in filters.  One file per filter, each exporting a `SPEC`; a
//! filter holds its `next` backend and overrides only what it changes.

use nbdkit_backend::FilterSpec;

pub mod cow;
pub mod fua;
pub mod log;
pub mod nocache;
pub mod noextents;
pub mod nozero;
pub mod offset;
pub mod partition;
pub mod protect;
pub mod truncate;

mod modes;
mod window;

/// Every built-in filter, in the order `--help` lists them.
pub fn all() -> Vec<&'static FilterSpec> {
    vec![
        &cow::SPEC,
        &fua::SPEC,
        &log::SPEC,
        &nocache::SPEC,
        &noextents::SPEC,
        &nozero::SPEC,
        &offset::SPEC,
        &partition::SPEC,
        &protect::SPEC,
        &truncate::SPEC,
    ]
}
