//! bzip2: random access by block, found by scanning for block magics.

mod reader;
pub mod scan;

pub use reader::{Bzip2Block, Bzip2Reader};
