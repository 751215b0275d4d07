//! `openonce`: open the plugin once per export and share that one handle
//! among all connections, for plugins that are slow to open (a remote
//! login, a VDDK session).  The handle stays open until the server exits.
//!
//! Sharing has costs the user accepts by choosing the filter: clients
//! share the plugin's one connection, and multi-conn gains nothing.  A
//! plugin that handles one request at a time per handle
//! (`serialize_requests`) now sees requests from several connections on
//! one handle, so the filter asks the server for one request at a time
//! across all connections instead (`serialize_all_requests`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nbdkit_backend::{layer_fn, Backend, FilterSpec, Handle, LockExt, Result, ThreadModel};

struct OpenOnce {
    next: Arc<dyn Backend>,
    /// The open handles, by (export, read-only).
    handles: Mutex<HashMap<(String, bool), Arc<dyn Handle>>>,
}

impl Backend for OpenOnce {
    fn name(&self) -> &str {
        "openonce"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn thread_model(&self) -> ThreadModel {
        match self.next.thread_model() {
            ThreadModel::SerializeRequests => ThreadModel::SerializeAllRequests,
            m => m,
        }
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        // Held while opening, so that two clients arriving together still
        // open the plugin once.
        let mut handles = self.handles.lock_unpoisoned();
        let key = (export.to_string(), readonly);
        let shared = match handles.get(&key) {
            Some(h) => h.clone(),
            None => {
                let h: Arc<dyn Handle> = Arc::from(self.next.open(readonly, export)?);
                handles.insert(key, h.clone());
                h
            }
        };
        Ok(Box::new(Shared(shared)))
    }
    fn shutdown(&self) {
        // Close the plugin's handles (flushing whatever they buffer)
        // before the plugin itself shuts down.
        self.handles.lock_unpoisoned().clear();
        self.next.shutdown();
    }
}

/// One connection's view of the shared handle: everything is forwarded,
/// and dropping it (the client leaving) leaves the handle open.
struct Shared(Arc<dyn Handle>);

impl Handle for Shared {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.0)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "openonce",
    summary: "open the plugin once per export and share it among connections",
    description: "For plugins that are slow to open. The handle stays open until the \
server exits; clients share it, so multi-conn brings nothing.\n\n\
Example:\n  nbdkit-rs --filter=openonce nbd socket=/tmp/remote.sock",
    params: &[],
    configure: |_| {
        Ok(layer_fn(|next| {
            Ok(Arc::new(OpenOnce {
                next,
                handles: Mutex::new(HashMap::new()),
            }))
        }))
    },
};
