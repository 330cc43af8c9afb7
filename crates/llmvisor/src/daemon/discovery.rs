//! Where the daemon's config comes from — a file, or none — with the discovered models added,
//! and the watcher that lists models as their files appear and unlists them as they go.
//!
//! One task ([`reloader`]) owns every reload: SIGHUP and file events both end in
//! [`Loader::reload`], one at a time, and after each the watched folders follow the config.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

use super::{with_overrides, AppState, DaemonError};
use crate::config::{self, Config};
use crate::discover::{self, Discovery};

/// A burst of file events (a copy in progress) ends when none came for this long.
const QUIET: Duration = Duration::from_millis(300);

/// How to build the config: the file (if any), the command line's overrides and folders.
#[derive(Debug, Clone, Default)]
pub struct Loader {
    /// `--config`, or the default config file when it exists; `None`: defaults only.
    pub path: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// `--models-dir`, added to the config's `models_dirs`.
    pub models_dirs: Vec<PathBuf>,
}

impl Loader {
    /// The config with its overrides and every discovered model; discovery's warnings are
    /// logged.
    pub fn load(&self) -> Result<(Config, Discovery), DaemonError> {
        let base = match &self.path {
            Some(p) => config::load(p)?,
            None => config::parse("", None)?,
        };
        let mut cfg = with_overrides(base, self.listen, self.state_dir.clone())?;
        cfg.discovery
            .models_dirs
            .extend(self.models_dirs.iter().cloned());
        let found = discover::apply(&mut cfg, &|name| std::env::var(name).ok())?;
        for w in &found.warnings {
            tracing::warn!("discovery: {w}");
        }
        Ok((cfg, found))
    }

    /// Loads again and applies the result (a config that fails changes nothing); the folders
    /// to watch now.
    pub async fn reload(&self, state: &AppState) -> Option<Vec<PathBuf>> {
        let (new, found) = match self.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload rejected; keeping the running config:\n{e}");
                return None;
            }
        };
        super::apply(state, new).await;
        Some(found.roots)
    }
}

/// The default config file: `$XDG_CONFIG_HOME/llmvisor/llmvisor.toml`, else
/// `~/.config/llmvisor/llmvisor.toml`, when it exists.
pub fn default_config_file() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let file = dir.join("llmvisor").join("llmvisor.toml");
    file.is_file().then_some(file)
}

/// Watches folders recursively (inotify); every event is a nudge on `tx`.
struct Watch {
    watcher: Option<notify::RecommendedWatcher>,
    watched: BTreeSet<PathBuf>,
}

impl Watch {
    fn new(tx: mpsc::UnboundedSender<()>) -> Self {
        let handler = move |res: notify::Result<notify::Event>| {
            if res.as_ref().is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        };
        let watcher = notify::recommended_watcher(handler)
            .map_err(|e| {
                tracing::warn!(
                    "cannot watch the model folders ({e}); restart or SIGHUP to see new models"
                )
            })
            .ok();
        Self {
            watcher,
            watched: BTreeSet::new(),
        }
    }

    /// Watches exactly `roots` from now on.
    fn follow(&mut self, roots: Vec<PathBuf>) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let want: BTreeSet<PathBuf> = roots.into_iter().collect();
        for gone in self.watched.difference(&want) {
            let _ = w.unwatch(gone);
        }
        for new in want.difference(&self.watched) {
            if let Err(e) = w.watch(new, notify::RecursiveMode::Recursive) {
                tracing::warn!("cannot watch {}: {e}", new.display());
            }
        }
        self.watched = want;
    }
}

/// Reloads on SIGHUP (`hup`) and when a watched folder changes, until `hup` closes.
pub async fn reloader(
    state: Arc<AppState>,
    loader: Loader,
    roots: Vec<PathBuf>,
    mut hup: mpsc::UnboundedReceiver<()>,
) {
    let (tx, mut changes) = mpsc::unbounded_channel();
    let mut watch = Watch::new(tx);
    watch.follow(roots);
    loop {
        tokio::select! {
            h = hup.recv() => if h.is_none() { return },
            Some(()) = changes.recv() => {
                // Let a burst settle: a file being copied in is read once it is whole.
                while let Ok(Some(())) = tokio::time::timeout(QUIET, changes.recv()).await {}
            }
        }
        if let Some(roots) = loader.reload(&state).await {
            watch.follow(roots);
        }
    }
}
