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
//! keys bound the count by `replicas`. A node whose lease is gone (etcd said so, or no member
//! answered for `lease_ttl`) *fences* itself: it refuses new work and stops its servers, then
//! registers again with a fresh lease and no placements.

#[cfg(feature = "fleet")]
mod fleet;

#[cfg(feature = "fleet")]
pub use fleet::{Fleet, Route};

use serde::{Deserialize, Serialize};

/// Header a node-to-node hop carries: the forwarding node's id.
pub const HOP_HEADER: &str = "x-llmvisor-hop";
/// Header a node-to-node hop carries: the cluster key.
pub const KEY_HEADER: &str = "x-llmvisor-cluster-key";

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
