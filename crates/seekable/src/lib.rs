//! Random-access decompression (work in progress on its own branch).
