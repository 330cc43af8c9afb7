//! A conversation survives a swap (`kv_persist`, docs/kv-persist.md): before a stop llmvisor
//! decides, the stop task saves every llama-server slot that holds tokens (`save`); after the
//! next start, before the server is handed out, the start task loads back the files saved
//! under the same shape (`restore`) and discards the others. The next request says whether the
//! restore was worth it ([`KvCell::observe`]): a model whose restore reused nothing has
//! `kv_persist` switched off until its config changes, with one warning.

pub mod arch;
pub mod dir;
mod shape;
mod slots;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::config::{llama_arg, ModelConfig};
use crate::spawn::SpawnSpec;
use crate::sync::LockExt;
use crate::upstream::{Endpoint, UpstreamClient};

/// How often a save waiting for a busy slot looks at `/slots` again.
const BUSY_POLL: Duration = Duration::from_millis(50);
/// KV events buffered for slow readers of `Supervisor::kv_events`.
pub const EVENTS_CAPACITY: usize = 256;

/// Where one start of a `kv_persist` model keeps its slot files and how they are named:
/// `lv-<model>-<shape>-s<slot>-b<bytes>.bin`, `<model>` and `<shape>` hashes (see `shape.rs`),
/// `<bytes>` the size llama-server wrote: a file of another size is cut short, and is never
/// loaded (build 11434 aborts on a truncated file).
#[derive(Debug, Clone)]
pub struct KvPlan {
    pub dir: PathBuf,
    /// `lv-<model hash>-`: the files of this model (a command's own save dir may be shared).
    model_prefix: String,
    /// The shape key of this start.
    shape: String,
    pub model_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl KvPlan {
    fn file_name(&self, slot: u32, bytes: u64) -> String {
        format!("{}{}-s{slot}-b{bytes}.bin", self.model_prefix, self.shape)
    }

    /// The slot a file of this model and shape is for, and the bytes it should have; `None`
    /// for another shape's file.
    fn slot_of(&self, name: &str) -> Option<(u32, u64)> {
        let rest = name
            .strip_prefix(&self.model_prefix)?
            .strip_prefix(&self.shape)?;
        let (slot, bytes) = rest
            .strip_prefix("-s")?
            .strip_suffix(".bin")?
            .split_once("-b")?;
        Some((slot.parse().ok()?, bytes.parse().ok()?))
    }
}

/// Sets up a start of `cfg` whose command is `spec`: its save dir (created owner-only under
/// `<state_dir>/kv/` unless the command names its own `--slot-save-path`, which is then added)
/// and the shape key of the files it may load.
pub fn prepare(
    state_dir: &std::path::Path,
    cfg: &ModelConfig,
    spec: &mut SpawnSpec,
) -> Result<KvPlan, String> {
    let mut argv = vec![spec.program.clone()];
    argv.extend(spec.args.iter().cloned());
    let own = llama_arg(
        &argv,
        &spec.env,
        &["--slot-save-path"],
        "LLAMA_ARG_SLOT_SAVE_PATH",
    );
    let dir = match own {
        Some(own) => match &spec.cwd {
            Some(cwd) => cwd.join(own),
            None => PathBuf::from(own),
        },
        None => {
            let dir = dir::ensure_model_dir(state_dir, &cfg.id).map_err(|e| {
                format!(
                    "cannot create the KV save dir under {}: {e}",
                    dir::root(state_dir).display()
                )
            })?;
            // llama-server joins the file name to the path as given: it needs the separator.
            spec.args.push("--slot-save-path".into());
            spec.args.push(format!("{}/", dir.display()));
            dir
        }
    };
    let model_file = shape::model_file(&argv, &spec.env, spec.cwd.as_deref());
    Ok(KvPlan {
        dir,
        model_prefix: format!(
            "{}{:08x}-",
            dir::FILE_PREFIX,
            shape::fnv1a(cfg.id.as_bytes()) as u32
        ),
        shape: shape::key(&argv, &spec.env, model_file.as_deref()),
        model_file,
        timeout: cfg.kv_save_timeout,
    })
}

/// One `kv_*` event of `/api/events`.
#[derive(Debug, Clone, Serialize)]
pub struct KvEvent {
    /// `kv_saved`, `kv_restored`, `kv_discarded` (a file not loaded and removed: another
    /// shape, or refused as corrupt), `kv_failed` (a save that did not happen), `kv_disabled`.
    #[serde(skip)]
    pub kind: &'static str,
    pub model: String,
    pub slot: Option<u32>,
    pub tokens: Option<u64>,
    pub bytes: Option<u64>,
    pub ms: Option<f64>,
    pub reason: Option<String>,
}

impl KvEvent {
    fn new(kind: &'static str, model: &str) -> Self {
        Self {
            kind,
            model: model.to_owned(),
            slot: None,
            tokens: None,
            bytes: None,
            ms: None,
            reason: None,
        }
    }
}

/// A model's KV counters (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCounters {
    pub saves: u64,
    pub save_failures: u64,
    pub restores: u64,
    pub discarded: u64,
    pub bytes_saved: u64,
    pub bytes_restored: u64,
    pub save_ms: u64,
    pub restore_ms: u64,
}

/// The `/metrics` counters of `kv_persist`: name, help, value.
pub type Metric = (&'static str, &'static str, fn(&KvCounters) -> u64);
pub const METRICS: &[Metric] = &[
    (
        "llmvisor_model_kv_saves_total",
        "KV slots saved before a stop (kv_persist).",
        |c| c.saves,
    ),
    (
        "llmvisor_model_kv_save_failures_total",
        "KV saves that failed or timed out (the stop went on).",
        |c| c.save_failures,
    ),
    (
        "llmvisor_model_kv_restores_total",
        "KV slots restored after a start.",
        |c| c.restores,
    ),
    (
        "llmvisor_model_kv_discarded_total",
        "Saved KV files removed unloaded (another shape, corrupt, cut short).",
        |c| c.discarded,
    ),
    (
        "llmvisor_model_kv_saved_bytes_total",
        "Bytes of KV state saved.",
        |c| c.bytes_saved,
    ),
    (
        "llmvisor_model_kv_restored_bytes_total",
        "Bytes of KV state restored.",
        |c| c.bytes_restored,
    ),
    (
        "llmvisor_model_kv_save_milliseconds_total",
        "Time llama-server spent saving slots.",
        |c| c.save_ms,
    ),
    (
        "llmvisor_model_kv_restore_milliseconds_total",
        "Time llama-server spent restoring slots.",
        |c| c.restore_ms,
    ),
];

#[derive(Default)]
struct Stats {
    saves: AtomicU64,
    save_failures: AtomicU64,
    restores: AtomicU64,
    discarded: AtomicU64,
    bytes_saved: AtomicU64,
    bytes_restored: AtomicU64,
    save_ms: AtomicU64,
    restore_ms: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Bytes of this model's files on disk (None: kv_persist is off).
    saved: Option<u64>,
    /// After a restore: the fewest tokens a restored slot holds; the next request long enough
    /// to have continued it tells whether anything was reused.
    check: Option<u64>,
    /// Why kv_persist is switched off for this model (no reuse seen).
    off: Option<String>,
    model_file: Option<PathBuf>,
}

/// A model's KV state as everyone sees it: bytes saved, the pending reuse check, counters.
pub struct KvCell {
    model: Arc<str>,
    state: Mutex<State>,
    stats: Stats,
    events: broadcast::Sender<KvEvent>,
}

impl KvCell {
    pub(crate) fn new(
        cfg: &ModelConfig,
        events: broadcast::Sender<KvEvent>,
        state_dir: &std::path::Path,
    ) -> Self {
        let cell = Self {
            model: cfg.id.as_str().into(),
            state: Mutex::default(),
            stats: Stats::default(),
            events,
        };
        cell.configure(cfg, state_dir);
        cell
    }

    /// New settings: a model switched off for no reuse gets another chance.
    pub(crate) fn configure(&self, cfg: &ModelConfig, state_dir: &std::path::Path) {
        let saved = cfg
            .kv_persist
            .then(|| dir::bytes(&dir::root(state_dir).join(dir::model_dir_name(&cfg.id))));
        let mut st = self.state.locked();
        st.saved = saved;
        st.off = None;
        st.check = None;
    }

    /// Bytes of saved KV state on disk (`/api/models` `kv_saved`), None when off.
    pub fn saved_bytes(&self) -> Option<u64> {
        let st = self.state.locked();
        st.saved.filter(|_| st.off.is_none())
    }

    /// True once a restore was seen to reuse nothing: no more saves or restores.
    pub fn is_off(&self) -> bool {
        self.state.locked().off.is_some()
    }

    /// True while a restore waits for the request that tells whether it was reused.
    pub fn check_pending(&self) -> bool {
        self.state.locked().check.is_some()
    }

    pub fn counters(&self) -> KvCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        KvCounters {
            saves: l(&s.saves),
            save_failures: l(&s.save_failures),
            restores: l(&s.restores),
            discarded: l(&s.discarded),
            bytes_saved: l(&s.bytes_saved),
            bytes_restored: l(&s.bytes_restored),
            save_ms: l(&s.save_ms),
            restore_ms: l(&s.restore_ms),
        }
    }

    /// llama-server's `timings` of a request to this model: `cache_n` tokens taken from its
    /// cache, `prompt_n` evaluated. After a restore, the first request at least as long as the
    /// restored history decides: some reuse confirms it; none switches kv_persist off.
    pub fn observe(&self, cache_n: u64, prompt_n: u64) {
        let mut st = self.state.locked();
        let Some(restored) = st.check else { return };
        if cache_n > 0 {
            st.check = None;
            drop(st);
            tracing::info!(model = %self.model, cache_n, "the restored KV state was reused");
            return;
        }
        if prompt_n < restored {
            return; // shorter than what was restored: not a continuation of it
        }
        let arch = st
            .model_file
            .as_deref()
            .and_then(arch::architecture)
            .map_or_else(
                || "of unknown architecture".to_string(),
                |a| format!("architecture `{a}`"),
            );
        let reason = format!(
            "a restore of {restored} tokens was followed by a request that reused none ({prompt_n} \
             evaluated): this model ({arch}) recomputes everything after a restore (llama.cpp does \
             so for sliding-window and recurrent models unless started with --swa-full)"
        );
        st.check = None;
        st.off = Some(reason.clone());
        drop(st);
        tracing::warn!(model = %self.model, "kv_persist switched off: {reason}");
        self.emit(KvEvent {
            reason: Some(reason),
            ..KvEvent::new("kv_disabled", &self.model)
        });
    }

    fn emit(&self, event: KvEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    fn refresh_saved(&self, plan: &KvPlan) {
        self.state.locked().saved = Some(dir::bytes(&plan.dir));
    }

    fn failed(&self, slot: Option<u32>, reason: String) {
        self.stats.save_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(model = %self.model, "KV save failed (the stop goes on): {reason}");
        self.emit(KvEvent {
            slot,
            reason: Some(reason),
            ..KvEvent::new("kv_failed", &self.model)
        });
    }

    fn discard(&self, plan: &KvPlan, file: &dir::SavedFile, reason: String) {
        self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(model = %self.model, file = %file.path.display(), "KV file discarded: {reason}");
        if let Err(e) = dir::remove(&plan.dir, &file.name) {
            tracing::warn!(model = %self.model, "cannot remove {}: {e}", file.path.display());
        }
        self.emit(KvEvent {
            bytes: Some(file.bytes),
            reason: Some(reason),
            ..KvEvent::new("kv_discarded", &self.model)
        });
    }
}

/// Before a stop: saves every slot that holds tokens and is not mid-request, within
/// `plan.timeout`; then keeps `<state_dir>/kv` under `budget`. Never fails: what goes wrong is
/// a warning and a `kv_failed` event, and the stop goes on.
pub async fn save(
    plan: &KvPlan,
    cell: &KvCell,
    client: &UpstreamClient,
    endpoint: &Endpoint,
    state_dir: &std::path::Path,
    budget: u64,
) {
    if cell.is_off() {
        return;
    }
    let began = Instant::now();
    let all = async {
        // A request its client just gave up on keeps its slot busy for a moment: wait for
        // it, within half the timeout (the rest is for the saves).
        let patience = Instant::now() + plan.timeout / 2;
        let slots = loop {
            let slots = slots::list(client, endpoint).await.map_err(|e| (None, e))?;
            let busy = slots
                .iter()
                .any(|s| s.is_processing && s.n_prompt_tokens > 0);
            if !busy || Instant::now() >= patience {
                break slots;
            }
            tokio::time::sleep(BUSY_POLL).await;
        };
        for slot in slots.iter().filter(|s| s.n_prompt_tokens > 0) {
            if slot.is_processing {
                cell.failed(
                    Some(slot.id),
                    format!("slot {} is still processing a request: not saved", slot.id),
                );
                continue;
            }
            save_slot(plan, cell, client, endpoint, slot.id).await;
        }
        Ok::<(), (Option<u32>, String)>(())
    };
    match tokio::time::timeout(plan.timeout, all).await {
        Ok(Ok(())) => {}
        Ok(Err((slot, e))) => cell.failed(slot, e),
        Err(_) => cell.failed(
            None,
            format!(
                "not done within kv_save_timeout ({})",
                crate::units::format_duration(plan.timeout)
            ),
        ),
    }
    for gone in dir::enforce_budget(state_dir, budget) {
        tracing::info!(model = %cell.model, "kv_disk_budget: removed the oldest KV file {}", gone.display());
    }
    cell.refresh_saved(plan);
    tracing::debug!(model = %cell.model, ms = began.elapsed().as_millis() as u64, "KV save step done");
}

/// Saves one slot under a temporary name, renamed once complete: a crash mid-save leaves a
/// `.partial` file that is removed, never a truncated file under a name that would be loaded.
async fn save_slot(
    plan: &KvPlan,
    cell: &KvCell,
    client: &UpstreamClient,
    endpoint: &Endpoint,
    slot: u32,
) {
    let partial = format!(
        "{}{}-s{slot}{}",
        plan.model_prefix,
        plan.shape,
        dir::PARTIAL
    );
    let result = slots::save(client, endpoint, slot, &partial)
        .await
        .and_then(|moved| {
            // A full disk can end a write short without llama-server noticing.
            let on_disk = std::fs::symlink_metadata(plan.dir.join(&partial))
                .map(|m| m.len())
                .unwrap_or(0);
            if on_disk != moved.bytes || moved.bytes == 0 {
                return Err(format!(
                    "slot {slot}: {on_disk} bytes on disk, {} reported written",
                    moved.bytes
                ));
            }
            let name = plan.file_name(slot, moved.bytes);
            dir::rename(&plan.dir, &partial, &name).map_err(|e| format!("slot {slot}: {e}"))?;
            // The slot's earlier conversation: the newest save of a slot is the one kept.
            for older in dir::list(&plan.dir) {
                let same_slot = plan.slot_of(&older.name).is_some_and(|(s, _)| s == slot);
                if older.name != name && same_slot {
                    let _ = dir::remove(&plan.dir, &older.name);
                }
            }
            Ok(moved)
        });
    match result {
        Ok(m) => {
            let s = &cell.stats;
            s.saves.fetch_add(1, Ordering::Relaxed);
            s.bytes_saved.fetch_add(m.bytes, Ordering::Relaxed);
            s.save_ms.fetch_add(m.ms.round() as u64, Ordering::Relaxed);
            tracing::info!(model = %cell.model, slot, tokens = m.tokens, bytes = m.bytes, ms = m.ms, "KV state saved");
            cell.emit(KvEvent {
                slot: Some(slot),
                tokens: Some(m.tokens),
                bytes: Some(m.bytes),
                ms: Some(m.ms),
                ..KvEvent::new("kv_saved", &cell.model)
            });
        }
        Err(e) => {
            let _ = dir::remove(&plan.dir, &partial);
            cell.failed(Some(slot), e);
        }
    }
}

/// After a start, before the server is handed out: loads this model's files of this shape into
/// their slots, within `plan.timeout`; removes the files of another shape, cut-short saves and
/// files the server refuses (corrupt). False when a restore request got no answer: the server
/// may have died loading the file (the caller checks and starts it again without it).
pub async fn restore(
    plan: &KvPlan,
    cell: &KvCell,
    client: &UpstreamClient,
    endpoint: &Endpoint,
) -> bool {
    cell.state.locked().model_file.clone_from(&plan.model_file);
    if cell.is_off() {
        return true;
    }
    let mut answered = true;
    let mut files: Vec<_> = dir::list(&plan.dir)
        .into_iter()
        .filter(|f| f.name.starts_with(&plan.model_prefix))
        .collect();
    // Newest first: with the time running out, the latest conversations come back.
    files.sort_by_key(|f| std::cmp::Reverse(f.modified));
    let mut fewest: Option<u64> = None;
    let all = async {
        for f in &files {
            if f.name.ends_with(dir::PARTIAL) {
                // Our server is only now started: no save of this model is under way.
                cell.discard(
                    plan,
                    f,
                    "a save cut short (llmvisor or the server died during it)".into(),
                );
                continue;
            }
            let Some((slot, bytes)) = plan.slot_of(&f.name) else {
                cell.discard(plan, f, "saved by a server of another shape (model file, -c, -np or cache types changed)".into());
                continue;
            };
            if f.bytes != bytes {
                let why = format!("truncated: {} bytes of the {bytes} saved", f.bytes);
                cell.discard(plan, f, why);
                continue;
            }
            match slots::restore(client, endpoint, slot, &f.name).await {
                Ok(m) => {
                    let s = &cell.stats;
                    s.restores.fetch_add(1, Ordering::Relaxed);
                    s.bytes_restored.fetch_add(m.bytes, Ordering::Relaxed);
                    s.restore_ms
                        .fetch_add(m.ms.round() as u64, Ordering::Relaxed);
                    if m.tokens > 0 {
                        fewest = Some(fewest.map_or(m.tokens, |t| t.min(m.tokens)));
                    }
                    tracing::info!(model = %cell.model, slot, tokens = m.tokens, bytes = m.bytes, ms = m.ms, "KV state restored");
                    cell.emit(KvEvent {
                        slot: Some(slot),
                        tokens: Some(m.tokens),
                        bytes: Some(m.bytes),
                        ms: Some(m.ms),
                        ..KvEvent::new("kv_restored", &cell.model)
                    });
                }
                Err(e) => {
                    // An HTTP answer is a refusal; none at all, a server that may have died.
                    answered &= e.contains(" answered ");
                    cell.discard(plan, f, format!("the server refused it: {e}"));
                }
            }
        }
    };
    if tokio::time::timeout(plan.timeout, all).await.is_err() {
        tracing::warn!(model = %cell.model, "KV restore not done within kv_save_timeout ({}); serving with what was restored", crate::units::format_duration(plan.timeout));
    }
    cell.state.locked().check = fewest;
    cell.refresh_saved(plan);
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_save_path_is_added_once_and_files_name_their_shape_and_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = ModelConfig::new("m", vec![]);
        cfg.kv_persist = true;
        let mut spec = SpawnSpec {
            program: "llama-server".into(),
            args: ["-m", "x.gguf", "-c", "512"].map(String::from).to_vec(),
            env: Default::default(),
            cwd: None,
        };
        let plan = prepare(tmp.path(), &cfg, &mut spec).unwrap();
        let dir = tmp.path().join("kv").join("m");
        assert_eq!(plan.dir, dir);
        assert_eq!(
            spec.args[4..],
            [
                "--slot-save-path".to_string(),
                format!("{}/", dir.display())
            ]
        );
        let name = plan.file_name(3, 1234);
        assert_eq!(plan.slot_of(&name), Some((3, 1234)));
        let mut other = spec.clone();
        other.args[3] = "1024".into();
        let other_plan = prepare(tmp.path(), &cfg, &mut other).unwrap();
        assert_eq!(
            other_plan.slot_of(&name),
            None,
            "another -c is another shape"
        );
        let mut own = SpawnSpec {
            args: vec!["--slot-save-path".into(), "/tmp/mine".into()],
            ..spec
        };
        let own_plan = prepare(tmp.path(), &cfg, &mut own).unwrap();
        assert_eq!(own_plan.dir, PathBuf::from("/tmp/mine"));
        assert_eq!(
            own.args.len(),
            2,
            "the command's own path is kept and nothing added"
        );
    }
}
