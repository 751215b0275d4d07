//! `exitlast`: the server exits when its last client disconnects (not
//! before the first one connects).  For servers started on demand, e.g.
//! by a superserver or a script that wants nbdkit-rs gone after one use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{layer_fn, request_shutdown, Backend, Client, FilterSpec, Handle, Result};
use tracing::debug;

struct ExitLast {
    next: Arc<dyn Backend>,
    connected: AtomicU64,
}

impl Backend for ExitLast {
    fn name(&self) -> &str {
        "exitlast"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        self.next.preconnect(client)?;
        self.connected.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn disconnected(&self, client: &Client) {
        self.next.disconnected(client);
        if self.connected.fetch_sub(1, Ordering::SeqCst) == 1 {
            debug!("exitlast: the last client disconnected; exiting");
            request_shutdown();
        }
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.next.open(readonly, export)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "exitlast",
    summary: "exit when the last client disconnects",
    description: "The server runs until a first client connects, then exits gracefully\n\
once no client is connected.  No parameters.\n\n\
Example:\n  nbdkit-rs --filter=exitlast -U /tmp/sock file disk.img",
    params: &[],
    configure: |_| {
        Ok(layer_fn(|next| {
            Ok(Arc::new(ExitLast {
                next,
                connected: AtomicU64::new(0),
            }))
        }))
    },
};
