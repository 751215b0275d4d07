//! The metadata contexts NBD_CMD_BLOCK_STATUS can report, and which of
//! them a client's LIST_META_CONTEXT / SET_META_CONTEXT queries name.
//!
//! Two are offered on every export: `base:allocation` (holes and zeroes,
//! from [`nbdkit_backend::Handle::extents`]) and qemu's
//! `qemu:allocation-depth` (how deep in a backing chain each range is,
//! from [`nbdkit_backend::Handle::allocation_depth`]).  qemu-nbd offers
//! the second only with `-A`, because its answer walks the image chain;
//! here a backend that has no chain answers "1" at no cost, so it is
//! always offered and `--no-mc` is the one switch that turns contexts
//! off.  Pure: the handshake sends what [`answer`] returns, and the
//! transmission phase sends one chunk per [`Selected`] context.

use nbdkit_backend::StatusKind;
use nbdkit_proto::{META_CONTEXT_ALLOCATION_DEPTH, META_CONTEXT_BASE_ALLOCATION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    BaseAllocation,
    AllocationDepth,
}

impl MetaContext {
    /// Every context, in the order they are listed and their block status
    /// chunks sent.
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];

    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => META_CONTEXT_BASE_ALLOCATION,
            MetaContext::AllocationDepth => META_CONTEXT_ALLOCATION_DEPTH,
        }
    }

    /// The id SET_META_CONTEXT gives it.  The spec lets ids change between
    /// options; fixed ones keep the server stateless about them (and
    /// base:allocation keeps the 1 nbdkit gives it).
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
        }
    }

    /// Which answer of the backend the context reports.
    pub fn status(self) -> StatusKind {
        match self {
            MetaContext::BaseAllocation => StatusKind::Allocation,
            MetaContext::AllocationDepth => StatusKind::Depth,
        }
    }

    /// The namespace with its colon: `base:`, `qemu:`.
    fn namespace(self) -> &'static str {
        let name = self.name();
        &name[..=name.find(':').expect("a context name has a namespace")]
    }

    /// Whether `query` names this context: by its whole name, or, when
    /// listing (`list`), by its namespace alone ("base:", "qemu:"), the
    /// wildcard the spec and qemu-nbd define for LIST and that SET ignores.
    /// Matching is exact and case-sensitive, as in nbdkit and qemu-nbd.
    fn matches(self, query: &str, list: bool) -> bool {
        query == self.name() || (list && query == self.namespace())
    }
}

/// The contexts one option answers with: for LIST with no query every
/// context, for SET with no query none, otherwise each context some query
/// names, once however many name it.  Queries in unknown namespaces, or
/// naming contexts this server does not have, select nothing (the spec
/// says to ignore them).
pub fn answer(queries: &[String], set: bool) -> Vec<MetaContext> {
    if queries.is_empty() {
        return if set {
            vec![]
        } else {
            MetaContext::ALL.to_vec()
        };
    }
    MetaContext::ALL
        .into_iter()
        .filter(|c| queries.iter().any(|q| c.matches(q, !set)))
        .collect()
}

/// The contexts a connection selected with SET_META_CONTEXT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Selected(u8);

impl Selected {
    pub fn of(contexts: &[MetaContext]) -> Selected {
        Selected(contexts.iter().fold(0, |bits, &c| bits | Self::bit(c)))
    }

    fn bit(c: MetaContext) -> u8 {
        1 << (c as u8)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, c: MetaContext) -> bool {
        self.0 & Self::bit(c) != 0
    }

    /// The selected contexts, in [`MetaContext::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = MetaContext> {
        MetaContext::ALL
            .into_iter()
            .filter(move |&c| self.contains(c))
    }
}

#[cfg(test)]
mod tests {
    use super::MetaContext::*;
    use super::*;

    fn q(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn listing_matches_names_and_namespaces() {
        assert_eq!(answer(&[], false), [BaseAllocation, AllocationDepth]);
        assert_eq!(answer(&q(&["base:"]), false), [BaseAllocation]);
        assert_eq!(answer(&q(&["qemu:"]), false), [AllocationDepth]);
        assert_eq!(
            answer(&q(&["qemu:allocation-depth", "base:allocation"]), false),
            [BaseAllocation, AllocationDepth]
        );
        // Named twice, listed once (as qemu-nbd).
        assert_eq!(
            answer(&q(&["qemu:allocation-depth", "qemu:"]), false),
            [AllocationDepth]
        );
        for other in [
            "base",
            "qemu",
            "QEMU:allocation-depth",
            "qemu:allocation-depth:",
            "qemu:dirty-bitmap:x",
            "x-foo:",
            "",
        ] {
            assert!(answer(&q(&[other]), false).is_empty(), "{other:?}");
        }
    }

    #[test]
    fn setting_selects_whole_names_only() {
        assert!(answer(&[], true).is_empty());
        assert!(answer(&q(&["base:", "qemu:"]), true).is_empty());
        assert_eq!(
            answer(&q(&["qemu:allocation-depth", "x:y"]), true),
            [AllocationDepth]
        );
        let both = answer(&q(&["qemu:allocation-depth", "base:allocation"]), true);
        let sel = Selected::of(&both);
        assert!(sel.contains(BaseAllocation) && sel.contains(AllocationDepth));
        assert_eq!(sel.iter().map(|c| c.id()).collect::<Vec<_>>(), [1, 2]);
        assert!(Selected::of(&[]).is_empty());
        assert!(!Selected::of(&[AllocationDepth]).contains(BaseAllocation));
    }
}
