//! Put the nbdkit C plugin API (`nbdkit_error`, `nbdkit_parse_size`, …,
//! defined in crates/cplugin) into the dynamic symbol table of the
//! executables, where nbdkit's plugins look for them when they are
//! dlopen'ed: a plugin that references a function the executable does not
//! export fails to load, even if it never calls it.  Examples get it too,
//! since they run the same command line.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for kind in ["bins", "examples"] {
        println!("cargo:rustc-link-arg-{kind}=-Wl,--export-dynamic-symbol=nbdkit_*");
        println!("cargo:rustc-link-arg-{kind}=-Wl,-z,pack-relative-relocs");
    }
}
