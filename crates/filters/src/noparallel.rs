//! `noparallel`: run requests with less concurrency than the plugin
//! allows, to test plugins or clients under a stricter thread model.

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, FilterSpec, Handle, Param, Result, ThreadModel};

use crate::modes::take_mode;

struct NoParallel {
    next: Arc<dyn Backend>,
    model: ThreadModel,
}

impl Backend for NoParallel {
    fn name(&self) -> &str {
        "noparallel"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    // The server enforces the most restrictive model in the chain.
    fn thread_model(&self) -> ThreadModel {
        self.model.min(self.next.thread_model())
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.next.open(readonly, export)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "noparallel",
    summary: "serialize requests or connections (serialize=requests|all-requests|connections)",
    description: "Example:\n  nbdkit-rs --filter=noparallel memory 1G serialize=connections",
    params: &[Param {
        name: "serialize",
        help: "requests (default): one at a time per connection; all-requests: one at a time overall; connections: one client at a time",
    }],
    configure: |cfg| {
        let model = take_mode(
            cfg,
            "noparallel",
            "serialize",
            &[
                ("requests", ThreadModel::SerializeRequests),
                ("all-requests", ThreadModel::SerializeAllRequests),
                ("all_requests", ThreadModel::SerializeAllRequests),
                ("connections", ThreadModel::SerializeConnections),
            ],
            ThreadModel::SerializeRequests,
        )?;
        Ok(layer_fn(move |next| {
            Ok(Arc::new(NoParallel {
                next,
                model,
            }))
        }))
    },
};
