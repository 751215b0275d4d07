//! Built-in filters.  One file per filter, each exporting a `SPEC`; a
//! filter holds its `next` backend and overrides only what it changes.

use nbdkit_backend::FilterSpec;

pub mod blocksize;
pub mod compressed;
pub mod cow;
pub mod delay;
pub mod error;
pub mod exitlast;
pub mod exitwhen;
pub mod fua;
pub mod ip;
pub mod limit;
pub mod log;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod partition;
pub mod protect;
pub mod rate;
pub mod retry;
pub mod stats;
pub mod truncate;

mod modes;
mod window;

/// Every built-in filter, by name (the order `--help` lists them).
pub fn all() -> Vec<&'static FilterSpec> {
    let mut all = vec![
        &blocksize::SPEC,
        &compressed::BZIP2,
        &compressed::GZIP,
        &cow::SPEC,
        &delay::SPEC,
        &error::SPEC,
        &exitlast::SPEC,
        &exitwhen::SPEC,
        &fua::SPEC,
        &ip::SPEC,
        &limit::SPEC,
        &log::SPEC,
        &multi_conn::SPEC,
        &nocache::SPEC,
        &noextents::SPEC,
        &noparallel::SPEC,
        &nozero::SPEC,
        &offset::SPEC,
        &partition::SPEC,
        &protect::SPEC,
        &rate::SPEC,
        &retry::SPEC,
        &stats::SPEC,
        &truncate::SPEC,
        &compressed::XZ,
        &compressed::ZSTD,
    ];
    all.sort_by_key(|f| f.name);
    all
}
