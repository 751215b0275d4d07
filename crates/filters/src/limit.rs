//! `limit`: allow at most N clients at once.  A client counts from the
//! moment it connects until it disconnects (listing exports counts too);
//! one more is closed at once, before the handshake, with a log line
//! saying why, as nbdkit's limit filter does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, Client, ConfigError, Error, ErrorKind, FilterSpec, Handle, Param, Result,
};

struct Limit {
    next: Arc<dyn Backend>,
    limit: u64,
    connected: AtomicU64,
}

impl Backend for Limit {
    fn name(&self) -> &str {
        "limit"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        // Claim a slot first, so two clients racing for the last one
        // cannot both get it.
        let claimed = self
            .connected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if claimed.is_err() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "limit filter: too many clients (the limit is {})",
                    self.limit
                ),
            ));
        }
        self.next.preconnect(client).inspect_err(|_| {
            self.connected.fetch_sub(1, Ordering::SeqCst);
        })
    }
    fn disconnected(&self, client: &Client) {
        self.next.disconnected(client);
        self.connected.fetch_sub(1, Ordering::SeqCst);
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(LimitHandle {
            next: self.next.open(readonly, export)?,
        }))
    }
}

struct LimitHandle {
    next: Box<dyn Handle>,
}

impl Handle for LimitHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "limit",
    summary: "allow at most N clients at once (limit=N, default 1)",
    description: "Example:\n  nbdkit-rs --filter=limit file disk.img limit=2",
    params: &[Param {
        name: "limit",
        help: "the most clients at once (default 1; 0 means no limit)",
    }],
    configure: |cfg| {
        let limit = cfg
            .take_parse::<u64>("limit")
            .map_err(|e| ConfigError::new(format!("limit filter: {e}")))?
            .unwrap_or(1);
        let limit = if limit == 0 { u64::MAX } else { limit };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(Limit {
                next,
                limit,
                connected: AtomicU64::new(0),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{Config, Peer};

    #[test]
    fn slots_are_counted_and_returned() {
        let mut cfg = Config::new(vec![("limit".into(), "2".into())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let b = layer.layer(plugin).unwrap();
        let clients: Vec<_> = (1..=4).map(|i| Client::new(i, Peer::Stdio)).collect();
        b.preconnect(&clients[0]).unwrap();
        b.preconnect(&clients[1]).unwrap();
        let e = b.preconnect(&clients[2]).err().unwrap();
        assert!(e.to_string().contains("the limit is 2"), "{e}");
        b.disconnected(&clients[0]);
        b.preconnect(&clients[3]).unwrap();
        let e = b.preconnect(&clients[2]).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    }
}
