//! Built-in filters.  One file per filter, each exporting a `SPEC`; a
//! filter holds its `next` backend and overrides only what it changes.

use nbdkit_backend::FilterSpec;

/// `extents` and `allocation_depth` of a handle that answers both block
/// status questions with one `self.status(kind, offset, count, req_one,
/// out)`.  (The caller imports `Extents`, `Result` and `StatusKind`, as
/// its `status` needs them.)
macro_rules! status_by_kind {
    () => {
        fn extents(&self, offset: u64, count: u64, req_one: bool, out: &mut Extents) -> Result<()> {
            self.status(StatusKind::Allocation, offset, count, req_one, out)
        }
        fn allocation_depth(
            &self,
            offset: u64,
            count: u64,
            req_one: bool,
            out: &mut Extents,
        ) -> Result<()> {
            self.status(StatusKind::Depth, offset, count, req_one, out)
        }
    };
}

pub mod blocksize;
pub mod blocksize_policy;
pub mod cache;
pub mod cacheextents;
pub mod checkwrite;
pub mod compressed;
pub mod count;
pub mod cow;
pub mod ddrescue;
pub mod delay;
pub mod error;
pub mod evil;
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
pub mod map;
pub mod multi_conn;
pub mod nocache;
pub mod noextents;
pub mod nofilter;
pub mod noparallel;
pub mod nozero;
pub mod offset;
pub mod openonce;
pub mod partition;
pub mod pause;
pub mod protect;
pub mod qcow2dec;
pub mod rate;
pub mod readahead;
pub mod readonly;
pub mod retry;
pub mod retry_request;
pub mod rotational;
pub mod scan;
pub mod spinning;
pub mod stats;
pub mod swab;
pub mod tar;
pub mod time_limit;
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
        &compressed::INDEXED_GZIP,
        &count::SPEC,
        &cow::SPEC,
        &delay::SPEC,
        &error::SPEC,
        &evil::SPEC,
        &exitlast::SPEC,
        &ext2::SPEC,
        &exitwhen::SPEC,
        &fua::SPEC,
        &ip::SPEC,
        &limit::SPEC,
        &log::SPEC,
        &luks::SPEC,
        &map::SPEC,
        &multi_conn::SPEC,
        &nocache::SPEC,
        &noextents::SPEC,
        &noparallel::SPEC,
        &nozero::SPEC,
        &offset::SPEC,
        &openonce::SPEC,
        &partition::SPEC,
        &pause::SPEC,
        &protect::SPEC,
        &qcow2dec::SPEC,
        &qcow2dec::ALIAS,
        &rate::SPEC,
        &readahead::SPEC,
        &readonly::SPEC,
        &retry::SPEC,
        &rotational::SPEC,
        &spinning::SPEC,
        &stats::SPEC,
        &swab::SPEC,
        &tar::SPEC,
        &time_limit::SPEC,
        &truncate::SPEC,
        &compressed::XZ,
        &compressed::ZSTD,
    ];
    all.sort_by_key(|f| f.name);
    all
}
