//! The built-in data sources.  One file per plugin, each exporting a
//! `SPEC` that the command line lists.

use nbdkit_backend::PluginSpec;

pub mod azure;
pub mod curl;
pub mod data;
pub mod file;
pub mod gcs;
pub mod info;
pub mod libvirt;
pub mod memory;
pub mod nbd;
mod objstore;
pub mod partitioning;
pub mod random;
pub mod s3;
pub mod sh;
pub mod simple;
pub mod split;
pub mod tmpdisk;

/// Every built-in plugin, in the order `--help` lists them.
pub fn all() -> Vec<&'static PluginSpec> {
    vec![
        &file::SPEC,
        &memory::SPEC,
        &simple::NULL,
        &simple::ZERO,
        &simple::FULL,
        &simple::PATTERN,
        &simple::ONES,
        &curl::SPEC,
        &s3::SPEC,
        &gcs::SPEC,
        &azure::SPEC,
        &data::SPEC,
        &random::RANDOM,
        &random::SPARSE_RANDOM,
        &split::SPEC,
        &partitioning::SPEC,
        &tmpdisk::SPEC,
        &info::SPEC,
        &nbd::SPEC,
        &sh::SH,
        &sh::EVAL,
        &libvirt::SPEC,
    ]
}
