//! Fleet mode (issue 15): many llmvisor daemons act as one, coordinated through etcd.
//!
//! Keys, under `/llmvisor/{name}/`:
//! - `nodes/{node}`: a [`NodeRecord`] (advertise URL, capacity), attached to the node's lease;
//! - `placements/{model}/{slot}` (slot < `replicas`): a [`Placement`], attached to the lease of
//!   the node it names, so a node's placements vanish with its lease;
//! - `by-node/{node}/{model}`: the slot, with the same lease; it keeps one node from holding two
//!   slots of one model.
//!
//! A placement is claimed with one transaction that requires both keys to be absent; the slot
//! keys bound the count by `replicas`. A node only ever claims a placement for itself, under
//! its own lease (the transaction also requires its record to hang on that lease); to place a
//! model on another node it forwards the request there asking it to claim ([`hop`]). A
//! placement counts only while it agrees with the live record of the node it names (same
//! lease, same advertise URL, a node the model may run on): [`check_placement`].
//!
//! A node whose lease is gone (etcd said so, or no member answered for `lease_ttl`) *fences*
//! itself: it refuses new work and stops its servers, then registers again with a fresh lease
//! and no placements.

#[cfg(feature = "fleet")]
mod fleet;
#[cfg(feature = "fleet")]
pub mod hop;

#[cfg(feature = "fleet")]
pub use fleet::{Fleet, Hop, Route};

use serde::{Deserialize, Serialize};

/// Header of a node-to-node hop: the forwarding node's id.
pub const HOP_HEADER: &str = "x-llmvisor-hop";
/// Header of a hop: the Unix second it was signed at.
pub const HOP_TIME_HEADER: &str = "x-llmvisor-hop-time";
/// Header of a hop: its random nonce.
pub const HOP_NONCE_HEADER: &str = "x-llmvisor-hop-nonce";
/// Header of a hop: the body's SHA-256 (hex) or `UNSIGNED-BODY`.
pub const HOP_BODY_HEADER: &str = "x-llmvisor-hop-body";
/// Header of a hop: the HMAC-SHA256 over the hop (see [`hop`]).
pub const HOP_SIGNATURE_HEADER: &str = "x-llmvisor-hop-signature";
/// Header of a hop that asks the receiving node to claim a placement for itself.
pub const HOP_PLACE_HEADER: &str = "x-llmvisor-hop-place";
/// Header of a hop's 503 "not placed here" answer: a tag over the responder and the hop's
/// nonce; the forwarding node routes the request again only when it verifies.
pub const NOT_PLACED_HEADER: &str = "x-llmvisor-not-placed";
/// Header of a forwarded answer: the node that served it.
pub const NODE_HEADER: &str = "x-llmvisor-node";

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub advertise: String,
    /// The etcd lease its keys are attached to.
    pub lease: i64,
    /// Bytes; `None` when the node has no memory_budget.
    pub budget_total: Option<u64>,
    pub budget_used: u64,
    pub max_loaded: Option<usize>,
    /// Models with a running (starting or ready) server on the node.
    pub models: Vec<String>,
}

impl NodeRecord {
    /// Free budget in bytes (`u64::MAX` without a budget).
    pub fn free(&self) -> u64 {
        self.budget_total
            .map_or(u64::MAX, |t| t.saturating_sub(self.budget_used))
    }

    /// Whether a model of `memory` bytes (if known) fits on the node right now.
    pub fn fits(&self, memory: Option<u64>) -> bool {
        let room = memory.is_none_or(|m| m <= self.free());
        let count = self.max_loaded.is_none_or(|max| self.models.len() < max);
        room && count
    }
}

/// One instance of a model the fleet runs on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub model: String,
    pub node: String,
    pub advertise: String,
    pub slot: u32,
    /// Unix milliseconds of the claim.
    pub since_ms: u64,
}

/// Why a placement does not count (see [`check_placement`]).
pub fn check_placement(
    p: &Placement,
    placement_lease: i64,
    node: Option<(&NodeRecord, i64)>,
    allowed_nodes: &[String],
) -> Result<(), &'static str> {
    let Some((rec, node_lease)) = node else {
        return Err("its node has no live record");
    };
    if rec.id != p.node || rec.lease != node_lease {
        return Err("its node's record does not match the lease it is stored under");
    }
    if placement_lease != node_lease {
        return Err("it is not attached to its node's lease");
    }
    if p.advertise != rec.advertise {
        return Err("its advertise URL differs from its node's record");
    }
    if !allowed_nodes.is_empty() && !allowed_nodes.contains(&p.node) {
        return Err("the model may not run on that node (`nodes`)");
    }
    Ok(())
}

/// Why fleet mode could not answer.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet mode: etcd is unavailable ({0}); models already running keep serving, new placements wait for etcd")]
    Etcd(String),
    #[error("fleet mode: this node lost its etcd lease and is fenced; it takes no new work until it has registered again")]
    Fenced,
    #[error("fleet mode: no node can run model `{model}` now: {why}")]
    NoRoom { model: String, why: String },
    #[error("fleet mode: model `{0}` is not placed on this node")]
    NotPlacedHere(String),
    #[error("fleet mode: cannot connect to etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
}

/// Picks the node for a new placement: the local node when it fits, else the one with the most
/// free budget; `None` when none fits. `candidates` excludes nodes that already hold one.
pub fn choose_node<'a>(
    local: &str,
    candidates: &'a [NodeRecord],
    memory: Option<u64>,
) -> Option<&'a NodeRecord> {
    let fitting = candidates.iter().filter(|n| n.fits(memory));
    let mut best: Option<&NodeRecord> = None;
    for n in fitting {
        if n.id == local {
            return Some(n);
        }
        if best.is_none_or(|b| n.free() > b.free() || (n.free() == b.free() && n.id < b.id)) {
            best = Some(n);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, total: Option<u64>, used: u64, models: usize) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            advertise: format!("http://{id}"),
            lease: 1,
            budget_total: total,
            budget_used: used,
            max_loaded: Some(2),
            models: (0..models).map(|i| format!("m{i}")).collect(),
        }
    }

    #[test]
    fn a_placement_counts_only_with_its_nodes_live_record() {
        let rec = NodeRecord {
            lease: 7,
            ..node("b", None, 0, 0)
        };
        let p = Placement {
            model: "m".into(),
            node: "b".into(),
            advertise: "http://b".into(),
            slot: 0,
            since_ms: 0,
        };
        assert_eq!(check_placement(&p, 7, Some((&rec, 7)), &[]), Ok(()));
        assert!(check_placement(&p, 7, None, &[]).is_err());
        assert!(
            check_placement(&p, 8, Some((&rec, 7)), &[]).is_err(),
            "another lease"
        );
        assert!(
            check_placement(&p, 7, Some((&rec, 8)), &[]).is_err(),
            "record off its lease"
        );
        let moved = Placement {
            advertise: "http://evil:80".into(),
            ..p.clone()
        };
        assert!(check_placement(&moved, 7, Some((&rec, 7)), &[]).is_err());
        assert!(check_placement(&p, 7, Some((&rec, 7)), &["a".into()]).is_err());
    }

    #[test]
    fn local_node_first_when_it_fits() {
        let nodes = [node("a", Some(100), 0, 0), node("b", Some(100), 90, 0)];
        assert_eq!(choose_node("b", &nodes, Some(10)).unwrap().id, "b");
        assert_eq!(choose_node("b", &nodes, Some(20)).unwrap().id, "a");
    }

    #[test]
    fn most_free_budget_else_none() {
        let nodes = [
            node("a", Some(100), 50, 0),
            node("b", Some(100), 10, 0),
            node("c", None, 0, 2),
        ];
        assert_eq!(choose_node("x", &nodes, Some(10)).unwrap().id, "b");
        assert!(choose_node("x", &nodes, Some(95)).is_none());
        assert!(
            choose_node("c", &nodes[2..], None).is_none(),
            "max_loaded reached"
        );
    }
}
