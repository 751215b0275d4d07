//! Compile the C half of the nbdkit API (the variadic functions Rust cannot
//! define) and export the `nbdkit_*` functions from this crate's own test
//! executables, which load plugins in-process.

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("nbdkit_cplugin_shim");
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=nbdkit_*");
}
