//! Compile the ext2 filter's C half (src/ext2/shim.c) against libext2fs's
//! headers and link libext2fs and com_err (Debian: libext2fs-dev).

fn main() {
    println!("cargo:rerun-if-changed=src/ext2/shim.c");
    cc::Build::new()
        .file("src/ext2/shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("nbdkit_ext2_shim");
    println!("cargo:rustc-link-lib=ext2fs");
    println!("cargo:rustc-link-lib=com_err");
}
