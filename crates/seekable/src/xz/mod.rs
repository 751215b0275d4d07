//! xz: random access through the index every xz stream ends with.

pub mod index;
mod reader;

pub use index::{XzBlock, XzCheck, XzIndex, XzStream};
pub use reader::XzReader;
