//! zstd (stub while xz is being built).
use crate::{Options, RandomAccess, Result, Source, Error};
use std::sync::Arc;
pub struct ZstdReader;
impl ZstdReader { pub fn open(_s: Arc<dyn Source>, o: &Options) -> Result<ZstdReader> { Err(Error::Unsupported{name:o.name.clone(),format:"zstd",reason:"todo".into()}) } }
impl RandomAccess for ZstdReader { fn size(&self)->u64{0} fn read_at(&self,_b:&mut [u8],_o:u64)->Result<()>{Ok(())} fn format(&self)->&'static str{"zstd"} }
pub fn seekable_compress(_d:&[u8],_f:usize,_l:i32)->std::io::Result<Vec<u8>>{Ok(vec![])}
