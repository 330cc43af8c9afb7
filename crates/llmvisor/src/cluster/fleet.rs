//! The etcd side of fleet mode: registration under a kept-alive lease, placement claims,
//! fencing and reconciliation. See the module doc of `cluster`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp,
};
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;

use super::hop::ReplayGuard;
use super::{check_placement, choose_node, FleetError, NodeRecord, Placement};
use crate::config::{ClusterConfig, Config, ModelConfig};
use crate::supervisor::{Phase, Supervisor};

/// Where a request for a model goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Served by this node's supervisor.
    Local,
    /// Forwarded to another node's daemon; `place`: the model is placed nowhere there yet and
    /// that node is asked to claim a slot for itself (a node writes only its own placements).
    Remote {
        node: String,
        advertise: String,
        place: bool,
    },
}

/// How a request reached this node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hop {
    /// From a client.
    None,
    /// Forwarded by another node that found the model placed here.
    Route,
    /// Forwarded by another node that chose this one for a new placement.
    Place,
}

/// How [`Fleet::claim`] picks the node.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Claim {
    /// This node when it fits, else the node with the most room (asked to claim it itself).
    Choose,
    /// This node or none; `fit`: only when the model fits in its budget now (its server is
    /// not counted in its record yet).
    Here { fit: bool },
}

/// The fleet's keys as one read (or the watch) gives them: node records by node id and
/// placements by key, each with the lease its key hangs on.
#[derive(Debug, Clone, Default)]
struct View {
    nodes: HashMap<String, (NodeRecord, i64)>,
    placements: HashMap<String, (Placement, i64)>,
}

impl View {
    fn read(prefix: &str, kvs: &[KeyValue]) -> View {
        let mut v = View::default();
        for kv in kvs {
            v.put(
                prefix,
                &String::from_utf8_lossy(kv.key()),
                kv.value(),
                kv.lease(),
            );
        }
        v
    }

    /// A key was written (unreadable values are left out, as if absent).
    fn put(&mut self, prefix: &str, key: &str, value: &[u8], lease: i64) {
        let Some(rest) = key.strip_prefix(prefix) else {
            return;
        };
        if let Some(id) = rest.strip_prefix("nodes/") {
            match serde_json::from_slice(value) {
                Ok(rec) => self.nodes.insert(id.to_string(), (rec, lease)),
                Err(_) => self.nodes.remove(id),
            };
        } else if rest.starts_with("placements/") {
            match serde_json::from_slice(value) {
                Ok(p) => self.placements.insert(key.to_string(), (p, lease)),
                Err(_) => self.placements.remove(key),
            };
        }
    }

    /// A key was deleted; the placement it held, if it was one.
    fn delete(&mut self, prefix: &str, key: &str) -> Option<Placement> {
        let rest = key.strip_prefix(prefix)?;
        if let Some(id) = rest.strip_prefix("nodes/") {
            self.nodes.remove(id);
            return None;
        }
        self.placements.remove(key).map(|(p, _)| p)
    }

    /// Node records that hang on the lease they name.
    fn live_nodes(&self) -> Vec<NodeRecord> {
        let mut out: Vec<NodeRecord> = self
            .nodes
            .iter()
            .filter(|(id, (rec, lease))| rec.id == **id && rec.lease == *lease)
            .map(|(_, (rec, _))| rec.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The slots of `model` whose keys exist, trusted or not.
    fn used_slots(&self, slot_prefix: &str) -> Vec<u32> {
        self.placements
            .keys()
            .filter_map(|k| k.strip_prefix(slot_prefix)?.parse().ok())
            .collect()
    }
}

/// Fleet mode of one daemon. Cheap to share (`Arc`).
pub struct Fleet {
    cfg: ClusterConfig,
    prefix: String,
    /// One client per etcd endpoint, connected on first use; operations go to `current` and
    /// move on to the next endpoint when one fails.
    clients: Mutex<Vec<Option<Client>>>,
    current: AtomicUsize,
    connect: ConnectOptions,
    sup: Supervisor,
    models: Vec<ModelConfig>,
    /// `preload`: kept running somewhere in the fleet.
    preload: Vec<String>,
    budget_total: Option<u64>,
    max_loaded: Option<usize>,
    /// The lease this node's keys hang on (0: none yet).
    lease: AtomicI64,
    fenced: AtomicBool,
    /// Last time etcd confirmed the lease (keep-alive answered with a positive TTL).
    renewed: Mutex<Instant>,
    /// Why etcd is unusable right now (`None`: fine).
    etcd_down: Mutex<Option<String>>,
    /// The fleet's node records and placements, kept by a watch while it runs (`None`: no
    /// live watch; read etcd).
    cache: Mutex<Option<View>>,
    /// Ignored placements already warned about (key, lease).
    warned: Mutex<HashSet<(String, i64)>>,
    /// Nonces of the hops this node accepted within the replay window.
    replay: ReplayGuard,
    /// Models for which an extra replica found no room, until when not to try again.
    no_room_until: Mutex<HashMap<String, Instant>>,
    /// One claim at a time per model on this node.
    claims: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Requests this node has forwarded and not finished, by target node.
    forwarding: Mutex<HashMap<String, usize>>,
    pub forwards: AtomicU64,
    pub placements_claimed: AtomicU64,
    pub fences: AtomicU64,
}

/// How long an etcd operation is retried over the endpoints before it counts as failed, at
/// least: a leader election after a member died takes over a second (etcd's election timeout),
/// several on a loaded machine — 2 s failed a CI run. The window grows with `lease_ttl`.
const ETCD_RETRY_MIN: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Fleet {
    /// Connects to etcd and registers this node under a new lease. The background upkeep
    /// (keep-alive, fencing, reconciliation) runs until `shutdown` is called or the process ends.
    pub async fn start(
        config: &Config,
        cluster: &ClusterConfig,
        sup: Supervisor,
    ) -> Result<Arc<Self>, FleetError> {
        let timeout = (cluster.lease_ttl / 3).max(Duration::from_millis(500));
        let opts = connect_options(cluster)
            .map_err(|reason| FleetError::Connect {
                endpoints: cluster.etcd.join(", "),
                reason,
            })?
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        let budget_total = sup.memory_budget();
        let fleet = Arc::new(Self {
            prefix: format!("/llmvisor/{}/", cluster.name),
            cfg: cluster.clone(),
            clients: Mutex::new(vec![None; cluster.etcd.len()]),
            current: AtomicUsize::new(0),
            connect: opts,
            sup,
            models: config.models.clone(),
            preload: config.preload.clone(),
            budget_total,
            max_loaded: config.max_loaded,
            lease: AtomicI64::new(0),
            fenced: AtomicBool::new(false),
            renewed: Mutex::new(Instant::now()),
            etcd_down: Mutex::new(None),
            cache: Mutex::new(None),
            warned: Mutex::new(HashSet::new()),
            replay: ReplayGuard::default(),
            claims: Mutex::new(HashMap::new()),
            no_room_until: Mutex::new(HashMap::new()),
            forwarding: Mutex::new(HashMap::new()),
            forwards: AtomicU64::new(0),
            placements_claimed: AtomicU64::new(0),
            fences: AtomicU64::new(0),
        });
        fleet.register().await.map_err(|e| {
            let reason = match e {
                FleetError::Etcd(reason) => reason,
                other => other.to_string(),
            };
            FleetError::Connect {
                endpoints: cluster.etcd.join(", "),
                reason: explain_connect_error(cluster, &reason),
            }
        })?;
        tracing::info!(
            node = %fleet.cfg.node,
            fleet = %fleet.cfg.name,
            advertise = %fleet.cfg.advertise,
            "fleet mode: registered in etcd"
        );
        let weak = Arc::downgrade(&fleet);
        tokio::spawn(async move { upkeep(weak).await });
        let weak = Arc::downgrade(&fleet);
        tokio::spawn(async move { watch_placements(weak).await });
        Ok(fleet)
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn cluster_key(&self) -> Option<&str> {
        self.cfg.cluster_key.as_deref()
    }

    /// The nonces of accepted hops (see [`super::hop`]).
    pub fn replay_guard(&self) -> &ReplayGuard {
        &self.replay
    }

    pub fn lease_ttl(&self) -> Duration {
        self.cfg.lease_ttl
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Runs `op` against the current endpoint, then each other one while it fails. Retrying is
    /// safe for every operation used here: a transaction that did apply before its answer was
    /// lost fails its compare the second time, and the caller reads the state again.
    async fn kv<T, F, Fut>(&self, op: F) -> Result<T, FleetError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        // Rounds over the endpoints for up to lease_ttl (at least ETCD_RETRY_MIN): long enough to ride out a leader
        // election ("leader changed") after a member died.
        let deadline = Instant::now() + self.cfg.lease_ttl.max(ETCD_RETRY_MIN);
        loop {
            match self.kv_round(&op).await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// One try of `op` on each endpoint, starting with the current one.
    async fn kv_round<T, F, Fut>(&self, op: &F) -> Result<T, FleetError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.cfg.etcd.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no etcd endpoint");
        for k in 0..n {
            let i = (start + k) % n;
            let cached = Self::lock(&self.clients).get(i).cloned().flatten();
            let client = match cached {
                Some(c) => c,
                None => {
                    match Client::connect([&self.cfg.etcd[i]], Some(self.connect.clone())).await {
                        Ok(c) => {
                            if let Some(slot) = Self::lock(&self.clients).get_mut(i) {
                                *slot = Some(c.clone());
                            }
                            c
                        }
                        Err(e) => {
                            last = format!("{}: {e}", self.cfg.etcd[i]);
                            continue;
                        }
                    }
                }
            };
            match op(client).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    last = format!("{}: {e}", self.cfg.etcd[i]);
                    if let Some(slot) = Self::lock(&self.clients).get_mut(i) {
                        *slot = None;
                    }
                }
            }
        }
        Err(FleetError::Etcd(last))
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }
    // A model id is one key segment (`org/name` as `org%2Fname`): `placements/org/` must not
    // be the prefix of another model's slots.
    fn slot_prefix(&self, model: &str) -> String {
        let model = crate::ids::encode_segment(model);
        format!("{}placements/{model}/", self.prefix)
    }
    fn marker_key(&self, node: &str, model: &str) -> String {
        let model = crate::ids::encode_segment(model);
        format!("{}by-node/{node}/{model}", self.prefix)
    }

    fn record(&self, lease: i64) -> NodeRecord {
        let status = self.sup.status();
        let running: Vec<_> = status
            .iter()
            .filter(|s| matches!(s.state, Phase::Starting | Phase::Ready | Phase::Stopping))
            .collect();
        NodeRecord {
            id: self.cfg.node.clone(),
            advertise: self.cfg.advertise.clone(),
            lease,
            budget_total: self.budget_total,
            budget_used: running.iter().filter_map(|s| s.memory).sum(),
            max_loaded: self.max_loaded,
            models: running.iter().map(|s| s.id.clone()).collect(),
        }
    }

    /// Writes this node's record (budget, running models) under `lease`.
    async fn publish_record(&self, lease: i64) -> Result<(), FleetError> {
        let rec = serde_json::to_vec(&self.record(lease)).unwrap_or_default();
        let key = self.node_key(&self.cfg.node);
        self.kv(|mut c| {
            let (key, rec) = (key.clone(), rec.clone());
            async move {
                c.put(key, rec, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// A new lease and this node's record on it.
    async fn register(&self) -> Result<(), FleetError> {
        let ttl = self.cfg.lease_ttl.as_secs() as i64;
        let lease = self
            .kv(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        self.publish_record(lease).await?;
        self.lease.store(lease, Ordering::SeqCst);
        *Self::lock(&self.renewed) = Instant::now();
        self.fenced.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The fleet's node records and placements, read from etcd now.
    async fn read_view(&self) -> Result<View, FleetError> {
        let resp = self
            .kv(|mut c| {
                let key = self.prefix.clone();
                async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(View::read(&self.prefix, resp.kvs()))
    }

    /// Of `view`'s placements (of `model`, or all), those that count: each agrees with the
    /// live record of the node it names ([`check_placement`]). The others are ignored, with a
    /// warning the first time each is seen.
    fn trusted(&self, view: &View, model: Option<&str>) -> Vec<Placement> {
        let mut out = Vec::new();
        for (key, (p, lease)) in &view.placements {
            if model.is_some_and(|m| m != p.model) {
                continue;
            }
            let allowed = self.model(&p.model).map_or(&[][..], |m| &m.nodes[..]);
            let node = view.nodes.get(&p.node).map(|(rec, l)| (rec, *l));
            match check_placement(p, *lease, node, allowed) {
                Ok(()) => out.push(p.clone()),
                Err(why) => self.warn_ignored(key, p, *lease, why),
            }
        }
        out.sort_by_key(|p| p.slot);
        out
    }

    fn warn_ignored(&self, key: &str, p: &Placement, lease: i64, why: &str) {
        let mut warned = Self::lock(&self.warned);
        if warned.len() > 10_000 {
            warned.clear();
        }
        if warned.insert((key.to_string(), lease)) {
            tracing::warn!(
                key,
                node = %p.node,
                advertise = %p.advertise,
                "fleet mode: ignoring a placement: {why}; no request goes there"
            );
        }
    }

    /// The placements of one model (or of all, with `None`) that count, read from etcd.
    pub async fn placements(&self, model: Option<&str>) -> Result<Vec<Placement>, FleetError> {
        let view = self.read_view().await?;
        Ok(self.trusted(&view, model))
    }

    /// Every placement that counts as the watch last saw it (`None` without a live watch).
    pub fn cached_placements(&self) -> Option<Vec<Placement>> {
        let cache = Self::lock(&self.cache);
        Some(self.trusted(cache.as_ref()?, None))
    }

    /// The placements of `model` that count, as the watch last saw them (`None` without a
    /// live watch).
    fn cached(&self, model: &str) -> Option<Vec<Placement>> {
        let cache = Self::lock(&self.cache);
        Some(self.trusted(cache.as_ref()?, Some(model)))
    }

    fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.answers_to(name))
    }

    fn running_locally(&self, id: &str) -> bool {
        self.sup
            .status()
            .iter()
            .any(|s| s.id == id && s.state == Phase::Ready)
    }

    /// Starts every `preload` model that has a free slot, here (see [`Self::place_preloaded`]).
    pub fn preload_all(self: &Arc<Self>) {
        for id in self.preload.clone() {
            let fleet = self.clone();
            tokio::spawn(async move { fleet.place_preloaded(&id).await });
        }
    }

    /// A `preload` model runs somewhere in the fleet: every node tries to claim a slot for itself
    /// (at start, and when a placement of the model goes away); the winners start it.
    async fn place_preloaded(&self, id: &str) {
        let Some(model) = self.model(id) else { return };
        if self.is_fenced() {
            return;
        }
        let here = match self.placements(Some(&model.id)).await {
            Ok(p) if p.iter().any(|p| p.node == self.cfg.node) => true,
            Ok(p) if p.len() as u32 >= model.replicas => false,
            Ok(_) => matches!(
                self.claim(model, Claim::Here { fit: false }).await,
                Ok(Route::Local)
            ),
            Err(e) => {
                tracing::warn!(model = %model.id, "fleet mode: cannot place preloaded model: {e}");
                false
            }
        };
        if here {
            match self.sup.load(&model.id).await {
                Ok(_) => tracing::info!(model = %model.id, "fleet mode: preloaded here"),
                Err(e) => tracing::warn!(model = %model.id, "fleet mode: preload failed: {e}"),
            }
        }
    }

    /// Whether `model` may run on this node (its `nodes`, as this node's config says).
    fn may_run_here(&self, model: &ModelConfig) -> bool {
        model.nodes.is_empty() || model.nodes.contains(&self.cfg.node)
    }

    /// Where a request for `name` goes; `hop`: how it reached this node.
    pub async fn route(&self, name: &str, hop: Hop) -> Result<Route, FleetError> {
        let Some(model) = self.model(name) else {
            // Unknown: the supervisor answers 404 with the known names.
            return Ok(Route::Local);
        };
        if self.is_fenced() {
            return Err(FleetError::Fenced);
        }
        if hop != Hop::None && !self.may_run_here(model) {
            // The forwarding node's config may differ: this node's `nodes` holds here.
            tracing::warn!(model = %model.id, "fleet mode: refusing a hop: `nodes` excludes this node");
            return Err(match hop {
                Hop::Place => FleetError::NoRoom {
                    model: model.id.clone(),
                    why: format!(
                        "node `{}` was chosen for it, but its `nodes` ({}) exclude it",
                        self.cfg.node,
                        model.nodes.join(", ")
                    ),
                },
                _ => FleetError::NotPlacedHere(model.id.clone()),
            });
        }
        if self.etcd_down().is_some() && self.running_locally(&model.id) {
            // etcd is known to be out: what runs here keeps serving, without waiting for it.
            return Ok(Route::Local);
        }
        let cached = self.cached(&model.id);
        // A hop that the cache does not place here may be newer than the cache: read etcd.
        let cached =
            cached.filter(|p| hop == Hop::None || p.iter().any(|p| p.node == self.cfg.node));
        let read = match cached {
            Some(p) => Ok(p),
            None => self.placements(Some(&model.id)).await,
        };
        let placed = match read {
            Ok(p) => p,
            // Without etcd, a server already running here keeps serving.
            Err(_) if self.running_locally(&model.id) => return Ok(Route::Local),
            Err(e) => return Err(e),
        };
        let here = placed.iter().any(|p| p.node == self.cfg.node);
        match hop {
            _ if here && (hop != Hop::None || model.replicas == 1) => return Ok(Route::Local),
            Hop::Route => return Err(FleetError::NotPlacedHere(model.id.clone())),
            Hop::Place => {
                // Chosen by another node: claim a slot here, or say where it went meanwhile.
                return match self.claim(model, Claim::Here { fit: true }).await? {
                    Route::Local => Ok(Route::Local),
                    Route::Remote { .. } => Err(FleetError::NotPlacedHere(model.id.clone())),
                };
            }
            Hop::None => {}
        }
        let backing_off = !placed.is_empty()
            && Self::lock(&self.no_room_until)
                .get(&model.id)
                .is_some_and(|until| Instant::now() < *until);
        if (placed.len() as u32) < model.replicas && !backing_off {
            // Room for another instance: claim one (eagerly, up to `replicas`).
            match self.claim(model, Claim::Choose).await {
                Ok(route) => return Ok(route),
                Err(e) if placed.is_empty() => return Err(e),
                Err(e) => {
                    // Serve from the instances there are; look for room again in a second.
                    tracing::debug!(model = %model.id, "no extra replica: {e}");
                    Self::lock(&self.no_room_until)
                        .insert(model.id.clone(), Instant::now() + Duration::from_secs(1));
                }
            }
        }
        let placed = if placed.is_empty() {
            self.placements(Some(&model.id)).await?
        } else {
            placed
        };
        self.least_busy(&placed).ok_or_else(|| FleetError::NoRoom {
            model: model.id.clone(),
            why: "its placements vanished during the request; retry".into(),
        })
    }

    /// Of `placed`, the one with the fewest requests in flight as this node sees them: its own
    /// leases on the local instance, its forwarded requests on the others (local on a tie).
    fn least_busy(&self, placed: &[Placement]) -> Option<Route> {
        let local_busy = |model: &str| {
            self.sup
                .status()
                .iter()
                .find(|s| s.id == model)
                .map_or(0, |s| s.leases)
        };
        let busy = Self::lock(&self.forwarding);
        placed
            .iter()
            .map(|p| {
                let local = p.node == self.cfg.node;
                let n = if local {
                    local_busy(&p.model)
                } else {
                    busy.get(&p.node).copied().unwrap_or(0)
                };
                (n, !local, p.slot, p)
            })
            .min_by_key(|(n, remote, slot, _)| (*n, *remote, *slot))
            .map(|(_, remote, _, p)| {
                if remote {
                    Route::Remote {
                        node: p.node.clone(),
                        advertise: p.advertise.clone(),
                        place: false,
                    }
                } else {
                    Route::Local
                }
            })
    }

    /// Claims a placement for `model` on this node (one claim at a time per model on this
    /// node), or picks another node for it (`Claim::Choose`), which is then asked to claim it
    /// itself: a node writes placements only under its own lease.
    async fn claim(&self, model: &ModelConfig, how: Claim) -> Result<Route, FleetError> {
        let gate = Self::lock(&self.claims)
            .entry(model.id.clone())
            .or_default()
            .clone();
        let _one = gate.lock().await;
        let slots = self.slot_prefix(&model.id);
        for _attempt in 0..5 {
            let view = self.read_view().await?;
            let placed = self.trusted(&view, Some(&model.id));
            if placed.len() as u32 >= model.replicas {
                return self.least_busy(&placed).ok_or(FleetError::NoRoom {
                    model: model.id.clone(),
                    why: "placements changed; retry".into(),
                });
            }
            let used = view.used_slots(&slots);
            let Some(slot) = (0..model.replicas).find(|s| !used.contains(s)) else {
                // Every slot key exists, some held by placements that do not count.
                return Err(FleetError::NoRoom {
                    model: model.id.clone(),
                    why: "its slots are held by placements that do not count (see the warnings)"
                        .into(),
                });
            };
            let candidates: Vec<NodeRecord> = view
                .live_nodes()
                .into_iter()
                .filter(|n| !placed.iter().any(|p| p.node == n.id))
                .filter(|n| model.nodes.is_empty() || model.nodes.contains(&n.id))
                .collect();
            let target = match how {
                Claim::Choose => choose_node(&self.cfg.node, &candidates, model.memory),
                Claim::Here { fit } => candidates
                    .iter()
                    .find(|n| n.id == self.cfg.node && (!fit || n.fits(model.memory))),
            };
            let Some(target) = target else {
                let why = if model.nodes.is_empty() {
                    "every live node is full (memory budget or max_loaded) or already runs it"
                        .to_string()
                } else {
                    format!(
                        "its nodes ({}) are down, full or already run it",
                        model.nodes.join(", ")
                    )
                };
                return Err(FleetError::NoRoom {
                    model: model.id.clone(),
                    why,
                });
            };
            if target.id != self.cfg.node {
                return Ok(Route::Remote {
                    node: target.id.clone(),
                    advertise: target.advertise.clone(),
                    place: true,
                });
            }
            let lease = self.lease.load(Ordering::SeqCst);
            if lease == 0 || lease != target.lease {
                return Err(FleetError::Fenced);
            }
            let placement = Placement {
                model: model.id.clone(),
                node: self.cfg.node.clone(),
                advertise: self.cfg.advertise.clone(),
                slot,
                since_ms: now_ms(),
            };
            let slot_key = format!("{slots}{slot}");
            let marker = self.marker_key(&self.cfg.node, &model.id);
            let with_lease = || Some(PutOptions::new().with_lease(lease));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(slot_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(marker.clone(), CompareOp::Equal, 0),
                    // Our record still hangs on our lease: the lease is live and ours.
                    Compare::lease(self.node_key(&self.cfg.node), CompareOp::Equal, lease),
                ])
                .and_then([
                    TxnOp::put(
                        slot_key,
                        serde_json::to_vec(&placement).unwrap_or_default(),
                        with_lease(),
                    ),
                    TxnOp::put(marker, slot.to_string(), with_lease()),
                ]);
            let done = self
                .kv(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if done.succeeded() {
                self.placements_claimed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %model.id, slot, "placement claimed here");
                return Ok(Route::Local);
            }
        }
        Err(FleetError::NoRoom {
            model: model.id.clone(),
            why: "placement claims kept conflicting; retry".into(),
        })
    }

    /// Counts a forwarded request to `node` until the guard is dropped.
    pub fn forwarding_to(self: &Arc<Self>, node: &str) -> ForwardGuard {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        *Self::lock(&self.forwarding)
            .entry(node.to_string())
            .or_default() += 1;
        ForwardGuard {
            fleet: self.clone(),
            node: node.to_string(),
        }
    }

    /// `GET /api/cluster`.
    pub async fn snapshot(&self) -> Result<serde_json::Value, FleetError> {
        let view = self.read_view().await?;
        let nodes = view.live_nodes();
        let placements = self.trusted(&view, None);
        let ignored: Vec<_> = view
            .placements
            .iter()
            .filter(|(_, (p, _))| !placements.contains(p))
            .map(|(key, (p, lease))| json!({"key": key, "node": p.node, "advertise": p.advertise, "lease": lease}))
            .collect();
        let mut by_node: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for p in &placements {
            by_node.entry(&p.node).or_default().push(&p.model);
        }
        let nodes: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "advertise": n.advertise,
                    "alive": true,
                    "budget": {"total": n.budget_total, "used": n.budget_used},
                    "max_loaded": n.max_loaded,
                    "running": n.models,
                    "models": by_node.get(n.id.as_str()).cloned().unwrap_or_default(),
                })
            })
            .collect();
        Ok(json!({
            "name": self.cfg.name,
            "node": self.cfg.node,
            "fenced": self.is_fenced(),
            "nodes": nodes,
            "placements": placements,
            "ignored_placements": ignored,
        }))
    }

    /// The models placed on this node, by id.
    async fn my_placements(&self) -> Result<HashMap<String, u64>, FleetError> {
        Ok(self
            .placements(None)
            .await?
            .into_iter()
            .filter(|p| p.node == self.cfg.node)
            .map(|p| (p.model, p.since_ms))
            .collect())
    }

    /// Stops every local server (fencing): new work is refused while `fenced` is set.
    async fn fence(&self, why: &str) {
        if self.fenced.swap(true, Ordering::SeqCst) {
            return;
        }
        self.fences.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %self.cfg.node, "fleet mode: fencing ({why}): stopping every server");
        self.stop_all_local().await;
    }

    async fn stop_all_local(&self) {
        let running: Vec<String> = self
            .sup
            .status()
            .into_iter()
            .filter(|s| s.state != Phase::Stopped && s.state != Phase::Failed)
            .map(|s| s.id)
            .collect();
        let stops = running.iter().map(|id| self.sup.unload(id, true));
        for (id, r) in running
            .iter()
            .zip(futures_util::future::join_all(stops).await)
        {
            if let Err(e) = r {
                tracing::warn!(model = %id, "fleet mode: stop failed: {e}");
            }
        }
    }

    /// One pass of reconciliation: publish the record, stop servers without a placement,
    /// release placements whose server stopped.
    async fn reconcile(&self) -> Result<(), FleetError> {
        let lease = self.lease.load(Ordering::SeqCst);
        self.publish_record(lease).await?;
        let mine = self.my_placements().await?;
        for s in self.sup.status() {
            let running = matches!(s.state, Phase::Starting | Phase::Ready);
            match mine.get(&s.id) {
                None if running => {
                    // Started here outside a request (preload, /api/models/ID/load, a lease):
                    // it keeps running if it can have a slot; else another node holds them all.
                    let claimed = match self.model(&s.id) {
                        Some(m) => self.claim(m, Claim::Here { fit: false }).await,
                        None => continue,
                    };
                    if matches!(claimed, Ok(Route::Local)) {
                        continue;
                    }
                    tracing::warn!(model = %s.id, "fleet mode: running without a placement here; stopping it");
                    if let Err(e) = self.sup.unload(&s.id, true).await {
                        tracing::warn!(model = %s.id, "stop failed: {e}");
                    }
                }
                Some(since) if !running && s.state != Phase::Stopping => {
                    let grace = self
                        .model(&s.id)
                        .map_or(Duration::from_secs(60), |m| m.startup_timeout)
                        + self.cfg.lease_ttl;
                    if now_ms().saturating_sub(*since) > grace.as_millis() as u64 {
                        self.release(&s.id).await?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes this node's placement of `model`.
    async fn release(&self, model: &str) -> Result<(), FleetError> {
        let marker = self.marker_key(&self.cfg.node, model);
        let resp = self
            .kv(|mut c| {
                let key = marker.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let Some(slot) = resp.kvs().first().map(|kv| kv.value().to_vec()) else {
            return Ok(());
        };
        let slot = String::from_utf8_lossy(&slot).into_owned();
        let slot_key = format!("{}{slot}", self.slot_prefix(model));
        let txn = Txn::new()
            .when([Compare::value(marker.clone(), CompareOp::Equal, slot)])
            .and_then([
                TxnOp::delete(slot_key, None::<DeleteOptions>),
                TxnOp::delete(marker, None::<DeleteOptions>),
            ]);
        self.kv(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        tracing::info!(model, "fleet mode: placement released (server stopped)");
        Ok(())
    }

    /// Whether some etcd member answers but has no leader (quorum lost): nobody can place
    /// anything then, so running servers may keep serving.
    async fn quorum_lost(&self) -> bool {
        // Every member at once, each given a second: a loaded machine must not turn a slow
        // answer into "nobody answers" (which fences).
        let probes = self.cfg.etcd.iter().enumerate().map(|(i, ep)| async move {
            let cached = Self::lock(&self.clients).get(i).cloned().flatten();
            let client = match cached {
                Some(c) => c,
                None => {
                    let opts = self
                        .connect
                        .clone()
                        .with_connect_timeout(Duration::from_secs(1))
                        .with_timeout(Duration::from_secs(1));
                    Client::connect([ep], Some(opts)).await.ok()?
                }
            };
            let mut c = client;
            let status = tokio::time::timeout(Duration::from_secs(1), c.status()).await;
            match status {
                Ok(Ok(s)) => Some(s.leader() == 0),
                _ => None,
            }
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .any(|leaderless| leaderless == Some(true))
    }

    /// Called once the upkeep loop ends (shutdown): revoke the lease so the placements go now.
    pub async fn leave(&self) {
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if lease != 0 {
            let _ = self
                .kv(|mut c| async move { c.lease_revoke(lease).await })
                .await;
        }
    }

    fn set_etcd_down(&self, why: Option<String>) {
        let mut down = Self::lock(&self.etcd_down);
        if *down != why {
            match &why {
                Some(w) => {
                    tracing::warn!(node = %self.cfg.node, "fleet mode: etcd unavailable: {w}")
                }
                None => tracing::info!(node = %self.cfg.node, "fleet mode: etcd reachable again"),
            }
        }
        *down = why;
    }

    /// Why etcd is unusable, if it is (for `/api/cluster` and messages).
    pub fn etcd_down(&self) -> Option<String> {
        Self::lock(&self.etcd_down).clone()
    }
}

/// See [`Fleet::forwarding_to`].
pub struct ForwardGuard {
    fleet: Arc<Fleet>,
    node: String,
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        let mut busy = Fleet::lock(&self.fleet.forwarding);
        if let Some(n) = busy.get_mut(&self.node) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Keep-alive, fencing and reconciliation, every third of `lease_ttl`, while the fleet lives.
async fn upkeep(weak: std::sync::Weak<Fleet>) {
    let Some(tick) = weak.upgrade().map(|f| f.cfg.lease_ttl / 3) else {
        return;
    };
    let mut keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(fleet) = weak.upgrade() else { return };
        let lease = fleet.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return; // left the fleet
        }
        // Keep-alive: one request, one answer, within a tick.
        let answer = async {
            if keeper.is_none() {
                keeper = Some(
                    fleet
                        .kv(|mut c| async move { c.lease_keep_alive(lease).await })
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let Some((k, s)) = keeper.as_mut() else {
                return Ok(None);
            };
            k.keep_alive().await.map_err(|e| e.to_string())?;
            s.message().await.map_err(|e| e.to_string())
        };
        // Half the TTL for an answer; a slow answer keeps the stream (it may still come, and
        // on a loaded machine re-creating it every tick would never finish).
        let ttl = match tokio::time::timeout(fleet.cfg.lease_ttl / 2, answer).await {
            Ok(Ok(Some(resp))) => Some(resp.ttl()),
            Ok(Ok(None)) | Ok(Err(_)) => {
                keeper = None;
                None
            }
            Err(_) => None,
        };
        match ttl {
            Some(t) if t > 0 => {
                *Fleet::lock(&fleet.renewed) = Instant::now();
                fleet.set_etcd_down(None);
                if let Err(e) = fleet.reconcile().await {
                    tracing::debug!("fleet mode: reconcile: {e}");
                }
            }
            Some(_) => {
                // etcd says the lease is gone: others may already run our models.
                keeper = None;
                fleet.fence("etcd expired this node's lease").await;
                match fleet.register().await {
                    Ok(()) => {
                        tracing::info!(node = %fleet.cfg.node, "fleet mode: registered again with a new lease")
                    }
                    Err(e) => tracing::warn!("fleet mode: cannot register again yet: {e}"),
                }
            }
            None => {
                let silent = Fleet::lock(&fleet.renewed).elapsed();
                if silent >= fleet.cfg.lease_ttl && !fleet.is_fenced() {
                    if fleet.quorum_lost().await {
                        fleet.set_etcd_down(Some("etcd has no quorum".into()));
                        // No lease expires without a leader, and a new leader gives every
                        // lease its full TTL again: count the silence from now.
                        *Fleet::lock(&fleet.renewed) = Instant::now();
                        continue;
                    }
                    fleet.set_etcd_down(Some("no etcd member answers".into()));
                    fleet.fence("no etcd member answered for lease_ttl").await;
                } else if fleet.etcd_down().is_none() {
                    fleet.set_etcd_down(Some("the lease keep-alive gets no answer".into()));
                }
                if fleet.is_fenced() {
                    // Try a fresh registration; it succeeds once etcd is back.
                    if fleet.register().await.is_ok() {
                        tracing::info!(node = %fleet.cfg.node, "fleet mode: registered again with a new lease");
                    }
                }
            }
        }
    }
}

/// Keeps `Fleet::cache` equal to the fleet's keys in etcd: a read, then a watch from the next
/// revision; on any failure the cache is dropped (requests read etcd) and the watch starts over.
async fn watch_placements(weak: std::sync::Weak<Fleet>) {
    use etcd_client::{EventType, WatchOptions};
    loop {
        let Some(fleet) = weak.upgrade() else { return };
        if fleet.lease.load(Ordering::SeqCst) == 0 {
            return;
        }
        let prefix = fleet.prefix.clone();
        let snapshot = fleet
            .kv(|mut c| {
                let key = prefix.clone();
                async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await;
        let Ok(snapshot) = snapshot else {
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let revision = snapshot.header().map_or(0, |h| h.revision());
        let view = View::read(&prefix, snapshot.kvs());
        let stream = fleet
            .kv(|mut c| {
                let key = prefix.clone();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                async move { c.watch(key, Some(opts)).await }
            })
            .await;
        let Ok(mut stream) = stream else {
            drop(fleet);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        *Fleet::lock(&fleet.cache) = Some(view);
        drop(fleet);
        loop {
            let msg = stream.message().await;
            let Some(fleet) = weak.upgrade() else { return };
            let resp = match msg {
                Ok(Some(r)) if !r.canceled() => r,
                other => {
                    tracing::info!("fleet mode: placement watch ended ({other:?}); reading etcd until it is back");
                    *Fleet::lock(&fleet.cache) = None;
                    break;
                }
            };
            let mut gone = Vec::new();
            {
                let mut cache = Fleet::lock(&fleet.cache);
                let view = cache.get_or_insert_with(View::default);
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match ev.event_type() {
                        EventType::Put => view.put(&prefix, &key, kv.value(), kv.lease()),
                        EventType::Delete => gone.extend(view.delete(&prefix, &key)),
                    }
                }
            }
            // A preloaded model lost an instance (its node died, or it stopped): place it
            // again, without waiting for a request.
            for p in gone {
                if fleet.preload.contains(&p.model) {
                    let f = fleet.clone();
                    tokio::spawn(async move { f.place_preloaded(&p.model).await });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// etcd-client's options for `[cluster]`'s TLS files and user (the timeouts are the caller's).
fn connect_options(cluster: &ClusterConfig) -> Result<ConnectOptions, String> {
    let mut opts = ConnectOptions::new();
    if let Some(tls) = &cluster.etcd_tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.client {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(t);
    }
    if let Some(auth) = &cluster.etcd_auth {
        opts = opts
            .with_user(auth.user.clone(), auth.password.clone())
            .with_auto_token_refresh(true);
    }
    Ok(opts)
}

/// An etcd connection error, with what to check for the usual causes.
fn explain_connect_error(cluster: &ClusterConfig, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let client_cert = cluster.etcd_tls.as_ref().map(|t| t.client.is_some());
    // A member that wants a client certificate closes the connection during the handshake;
    // tonic reports that as a cancelled request ("connection closed"), or, when the close
    // races the first write, as a broken pipe or a reset: not as a TLS error.
    let handshake = [
        "certificate",
        "unknown ca",
        "handshake",
        "connection closed",
        "broken pipe",
        "connection reset",
    ]
    .iter()
    .any(|s| lower.contains(s));
    // On a loaded machine the refused handshake may surface as the request's timeout instead.
    let timed_out = lower.contains("timed out") || lower.contains("timeout");
    let hint = if client_cert == Some(false) && (handshake || timed_out) {
        "; with TLS, etcd may also require a client certificate (--client-cert-auth): set \
         etcd_cert and etcd_key"
    } else if client_cert == Some(true) && handshake {
        "; check that etcd_ca signed the members' certificates and that etcd trusts the CA \
         that signed etcd_cert"
    } else if lower.contains("user name is empty")
        || lower.contains("authentication failed")
        || lower.contains("invalid auth token")
        || lower.contains("permission denied")
    {
        if cluster.etcd_auth.is_some() {
            "; etcd refused the credentials: check etcd_user and its password, and the user's \
             role (read-write on the fleet's prefix /llmvisor/NAME/)"
        } else {
            "; etcd has authentication enabled: set etcd_user and etcd_password_file"
        }
    } else {
        ""
    };
    format!("{error}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way a refused client-certificate handshake has surfaced (seen on this machine, the
    /// last two only under load) gets the hint.
    #[test]
    fn a_refused_handshake_without_a_client_certificate_names_the_missing_keys() {
        let cluster = ClusterConfig {
            etcd: vec!["https://127.0.0.1:2379".into()],
            name: "f".into(),
            node: "n".into(),
            advertise: "http://127.0.0.1:1".into(),
            lease_ttl: Duration::from_secs(3),
            cluster_key: None,
            etcd_tls: Some(crate::config::EtcdTls {
                ca: "/ca.pem".into(),
                client: None,
            }),
            etcd_auth: None,
        };
        for seen in [
            "grpc request error: code: 'Cancelled', message: \"connection closed\"",
            "grpc request error: code: 'Unknown error', message: \"Timeout expired\"",
            "transport error: hyper::Error(Io, Custom { kind: BrokenPipe, error: \"stream \
             closed because of a broken pipe\" })",
            "transport error: Connection reset by peer (os error 104)",
        ] {
            let text = explain_connect_error(&cluster, seen);
            assert!(text.ends_with("set etcd_cert and etcd_key"), "{text}");
        }
        let refused = explain_connect_error(&cluster, "Connection refused (os error 111)");
        assert!(!refused.contains("etcd_cert"), "{refused}");
    }
}
