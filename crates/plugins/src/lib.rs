//! The built-in data sources.  One file per plugin, each exporting a
//! `SPEC` that the command line lists.

use nbdkit_backend::PluginSpec;

pub mod azure;
pub mod curl;
pub mod data;
pub mod file;
pub mod floppy;
pub mod gcs;
mod host;
pub mod info;
pub mod iso;
pub mod libvirt;
pub mod linuxdisk;
pub mod memory;
pub mod nbd;
mod objstore;
pub mod ondemand;
pub mod partitioning;
pub mod random;
pub mod s3;
pub mod sh;
pub mod simple;
pub mod split;
pub mod ssh;
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
        &iso::SPEC,
        &floppy::SPEC,
        &ssh::SPEC,
        &linuxdisk::SPEC,
        &partitioning::SPEC,
        &tmpdisk::SPEC,
        &ondemand::SPEC,
        &info::SPEC,
        &nbd::SPEC,
        &sh::SH,
        &sh::EVAL,
        &libvirt::SPEC,
    ]
}

/// The lines `--dump-plugin` adds for a built-in plugin after the common
/// ones, as nbdkit's per-plugin `.dump_plugin` does: the optional
/// features this build has, which scripts probe for (`data_base64=yes`).
pub fn dump_lines(name: &str) -> &'static str {
    match name {
        // allocator=malloc,mlock=true and allocator=zstd.
        "memory" => "mlock=yes\nzstd=yes\n",
        "data" => "data_base64=yes\nmlock=yes\nzstd=yes\n",
        "info" => "info_address=yes\ninfo_base64=yes\n",
        // dynamic-export=true passes the server's export list and its
        // default export's name through.
        "nbd" => "libnbd_dynamic_list=1\n",
        // The thread model comes from the script (its thread_model
        // method), and the highest exit status with a meaning for scripts
        // (3: "false").
        "sh" | "eval" => "has_thread_model=1\nmax_known_status=3\n",
        "iso" => match crate::iso::default_program() {
            Some(("xorriso", _)) => "iso_prog=xorriso\n",
            Some(("genisoimage", _)) => "iso_prog=genisoimage\n",
            Some(_) => "iso_prog=mkisofs\n",
            None => "",
        },
        _ => "",
    }
}
