//! `tls-fallback`: with `--tls=on`, show plaintext clients a harmless
//! 512-byte read-only export holding a message, whatever export they ask
//! for, and only TLS clients the real plugin.  The plugin is never opened
//! for a plaintext client (so a plaintext client cannot tie it up).

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, BlockSize, CacheMode, Client, Config, ConfigError, ExportEntry, FilterSpec,
    Handle, Layer, Param, Result, ThreadModel,
};

const SIZE: usize = 512;
const DEFAULT_MESSAGE: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let msg = c
        .take("tlsreadme")
        .unwrap_or_else(|| DEFAULT_MESSAGE.to_string());
    let mut data = msg.into_bytes();
    if data.len() > SIZE {
        tracing::warn!("tlsreadme: the message is longer than {SIZE} bytes; it is cut there");
    }
    data.resize(SIZE, 0);
    let message = Arc::new(data);
    Ok(layer_fn(move |next| {
        if next.thread_model() == ThreadModel::SerializeConnections {
            return Err(ConfigError::new(
                "the tls-fallback filter requires parallel connection support \
                 (the plugin's thread model is serialize_connections)",
            ));
        }
        Ok(Arc::new(TlsFallback { next, message }))
    }))
}

struct TlsFallback {
    next: Arc<dyn Backend>,
    message: Arc<Vec<u8>>,
}

fn is_tls() -> bool {
    Client::current().is_some_and(|c| c.is_tls())
}

impl Backend for TlsFallback {
    fn name(&self) -> &str {
        "tls-fallback"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        if !is_tls() {
            return Ok(vec![ExportEntry::default()]);
        }
        self.next.list_exports(readonly)
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        if !is_tls() {
            return Ok(String::new());
        }
        self.next.default_export(readonly)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        if !is_tls() {
            return Ok(Box::new(Plaintext {
                message: self.message.clone(),
            }));
        }
        self.next.open(readonly, export)
    }
}

/// What a plaintext client gets: the message, read-only, nothing else
/// (no `next`, so every capability is the plugin default: off).
struct Plaintext {
    message: Arc<Vec<u8>>,
}

impl Handle for Plaintext {
    fn size(&self) -> Result<u64> {
        Ok(self.message.len() as u64)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    fn export_description(&self) -> Result<Option<String>> {
        Ok(None)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(CacheMode::None)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // The server keeps requests inside the 512 bytes.
        let start = (offset as usize).min(self.message.len());
        let end = start.saturating_add(buf.len()).min(self.message.len());
        buf[..end - start].copy_from_slice(&self.message[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "tls-fallback",
    summary: "serve plaintext clients a 512-byte message instead of the plugin",
    description: "Use with --tls=on: TLS clients see the plugin; plaintext clients see one\n\
read-only export, \"\", holding the message (padded with zeroes to 512\n\
bytes).  The plugin must not be serialize_connections.\n\n\
Example:\n  nbdkit-rs --tls=on --tls-certificates=/etc/pki/nbdkit --filter=tls-fallback \\\n    \
file disk.img tlsreadme=$'Connect with TLS\\n'",
    params: &[Param {
        name: "tlsreadme",
        help: "MESSAGE: contents of the plaintext export (at most 512 bytes)",
    }],
    configure,
};
