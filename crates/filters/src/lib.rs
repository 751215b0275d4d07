//! Built-in filters.  One file per filter, each exporting a `SPEC`; a
//! filter holds its `next` backend and overrides only what it changes.

use nbdkit_backend::FilterSpec;

pub mod blocksize;
pub mod blocksize_policy;
pub mod cache;
pub mod cacheextents;
pub mod checkwrite;
pub mod compressed;
pub mod cow;
pub mod ddrescue;
pub mod delay;
pub mod error;
pub mod exitlast;
pub mod exitwhen;
pub mod exportname;
pub mod ext2;
pub mod extentlist;
pub mod fua;
pub mod ip;
pub mod limit;
pub mod log;
pub mod luks;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod nofilter;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod partition;
pub mod protect;
pub mod qcow2dec;
pub mod rate;
pub mod readahead;
pub mod retry;
pub mod retry_request;
pub mod scan;
pub mod stats;
pub mod swab;
pub mod tar;
pub mod tls_fallback;
pub mod truncate;

mod modes;
mod window;

/// Every built-in filter, by name (the order `--help` lists them).
pub fn all() -> Vec<&'static FilterSpec> {
    let mut all = vec![
        &blocksize::SPEC,
        &cacheextents::SPEC,
        &checkwrite::SPEC,
        &ddrescue::SPEC,
        &exportname::SPEC,
        &extentlist::SPEC,
        &nofilter::SPEC,
        &retry_request::SPEC,
        &scan::SPEC,
        &tls_fallback::SPEC,
        &blocksize_policy::SPEC,
        &cache::SPEC,
        &compressed::BZIP2,
        &compressed::GZIP,
        &compressed::LZIP,
        &cow::SPEC,
        &delay::SPEC,
        &error::SPEC,
        &exitlast::SPEC,
        &ext2::SPEC,
        &exitwhen::SPEC,
        &fua::SPEC,
        &ip::SPEC,
        &limit::SPEC,
        &log::SPEC,
        &luks::SPEC,
        &multi_conn::SPEC,
        &nocache::SPEC,
        &noextents::SPEC,
        &noparallel::SPEC,
        &nozero::SPEC,
        &offset::SPEC,
        &partition::SPEC,
        &protect::SPEC,
        &qcow2dec::SPEC,
        &qcow2dec::ALIAS,
        &rate::SPEC,
        &readahead::SPEC,
        &retry::SPEC,
        &stats::SPEC,
        &swab::SPEC,
        &tar::SPEC,
        &truncate::SPEC,
        &compressed::XZ,
        &compressed::ZSTD,
    ];
    all.sort_by_key(|f| f.name);
    all
}
