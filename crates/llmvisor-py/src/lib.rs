//! `llmvisor._native`: the Rust supervisor embedded in a Python process.
//!
//! ```text
//! Python thread ──(GIL released)──▶ Handle::block_on(slice of 50 ms) ──▶ tokio runtime
//!        ▲                                   │                             (owned by Core)
//!        └── with the GIL between slices: log_callback, check_signals, deadline
//! ```
//!
//! Every call that may wait runs its future as a task on the supervisor's own multi-thread
//! runtime and waits for it in slices with the GIL released. Between two slices it takes the GIL
//! back to hand log lines to `log_callback`, to let Python run its signal handlers (Ctrl-C raises
//! `KeyboardInterrupt` there) and to check the caller's timeout. Leaving early drops the task's
//! handle: a lease it had already obtained is dropped with it (released), and the start itself
//! belongs to the model's actor, so it goes on for other callers.
//!
//! The pure-Python part (`python/llmvisor/__init__.py`) adds the asyncio face, the global
//! manager and the exit hook.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use llmvisor::config::{self, Config, ConfigErrors};
use llmvisor::{AcquireError, Lease, Phase, Supervisor};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyRuntimeError, PyTimeoutError, PyTypeError};
use pyo3::prelude::*;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::broadcast;

create_exception!(
    llmvisor,
    LlmvisorError,
    PyException,
    "Base class of llmvisor's errors (UnknownModelError is a KeyError and StartTimeoutError a TimeoutError instead)."
);
create_exception!(
    llmvisor,
    ConfigError,
    LlmvisorError,
    "The config is invalid; the message is what `llmvisor check` prints (file:line:col: error: ...)."
);
create_exception!(
    llmvisor,
    UnknownModelError,
    PyKeyError,
    "No model has this id or alias; the message names the known models."
);
create_exception!(
    llmvisor,
    StartError,
    LlmvisorError,
    "The model's server could not be started (or the model is unavailable); carries the reason and the server's last output."
);
create_exception!(
    llmvisor,
    StartTimeoutError,
    PyTimeoutError,
    "The model did not become ready in time (its startup_timeout, or the caller's timeout)."
);
create_exception!(
    llmvisor,
    ClosedError,
    LlmvisorError,
    "The Supervisor was closed."
);

/// How long one wait with the GIL released lasts before signals and deadlines are checked.
const SLICE: Duration = Duration::from_millis(50);
/// The same off the main thread, where no signal handler can run: only the deadline matters.
const NO_SIGNALS_SLICE: Duration = Duration::from_secs(3600);
/// How long closing waits for the runtime's worker threads once every server is stopped.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

/// What one `Supervisor` object owns: the runtime, the supervisor, and the app leases that
/// `ensure_server_running` holds.
struct Core {
    /// `None` only while dropping.
    sup: Option<Supervisor>,
    handle: Handle,
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    /// Model id → the lease `ensure_server_running` keeps until `shutdown_server` or `close`.
    held: Mutex<HashMap<String, Lease>>,
    /// The process that made this; a forked child must not touch the parent's runtime.
    pid: u32,
}

impl Core {
    fn sup(&self) -> &Supervisor {
        match &self.sup {
            Some(sup) => sup,
            None => unreachable!("the supervisor is only taken out in Drop"),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `lease` as the app lease of its model and returns its URL. An app lease already
    /// held on the same server is kept instead (the new one is dropped); one on an earlier
    /// server (it exited, or its owner process died) is replaced.
    fn hold(&self, lease: Lease) -> String {
        let url = lease.url();
        let mut held = self.held();
        let keep_current = held
            .get(lease.model())
            .is_some_and(|current| current.is_up() && current.endpoint() == lease.endpoint());
        let dropped = if keep_current {
            Some(lease)
        } else {
            held.insert(lease.model().to_owned(), lease)
        };
        drop(held);
        drop(dropped);
        url
    }

    /// A lease on `model`: at once when it is ready, else after starting it or joining the start
    /// under way, within `timeout` seconds. `log_callback` gets the start's output: the lines so
    /// far when joining a start, then each new one.
    fn acquire(
        &self,
        py: Python<'_>,
        model: &str,
        timeout: Option<f64>,
        log_callback: Option<&PyObject>,
    ) -> PyResult<Lease> {
        let cell = self.sup().model(model).map_err(|e| acquire_error(py, e))?;
        if let Some(lease) = cell.try_acquire_ready() {
            return Ok(lease);
        }
        let logs = match log_callback {
            Some(callback) => {
                let (recent, rx) = cell.logs.follow();
                // Joining a start under way: its lines so far come first.
                if cell.phase() == Phase::Starting {
                    deliver(py, Some(callback), current_start(recent, &cell.id))?;
                }
                Some(rx)
            }
            None => None,
        };
        let deadline = deadline_after(timeout)?;
        let waiting = cell.clone();
        let outcome = wait(
            py,
            self.handle()?,
            async move { waiting.acquire(false).await },
            deadline,
            logs,
            log_callback,
        )?;
        match outcome {
            Some(acquired) => acquired.map_err(|e| acquire_error(py, e)),
            None => Err(caller_timeout(&cell.id, timeout)),
        }
    }

    /// The runtime, unless this is a forked child of the process that made it (a child has
    /// the parent's memory but none of its threads: waiting on the runtime would hang).
    fn handle(&self) -> PyResult<&Handle> {
        if self.forked() {
            return Err(LlmvisorError::new_err(
                "this Supervisor belongs to the parent process (the process was forked): \
                 make a new llmvisor.Supervisor in the child",
            ));
        }
        Ok(&self.handle)
    }

    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if self.forked() {
            // A forked child has the memory but not the threads: touching the runtime would
            // hang, and the servers are the parent's. Leak it all.
            std::mem::forget(self.sup.take());
            std::mem::forget(self.runtime.take());
            std::mem::forget(std::mem::take(&mut *self.held()));
            return;
        }
        std::mem::take(&mut *self.held());
        {
            // The supervisor's own Drop SIGKILLs whatever `close` did not stop.
            let _in_runtime = self.handle.enter();
            drop(self.sup.take());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(RUNTIME_SHUTDOWN);
        }
    }
}

/// The supervisor of one config, in-process. See the package's documentation.
#[pyclass(module = "llmvisor._native", name = "Supervisor")]
struct PySupervisor {
    /// `None` once closed.
    core: Mutex<Option<Arc<Core>>>,
}

#[pymethods]
impl PySupervisor {
    #[new]
    #[pyo3(signature = (path=None, *, config_text=None, state_dir=None))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        config_text: Option<String>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let config = load_config(path, config_text, state_dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("llmvisor")
            .build()
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start llmvisor's async runtime: {e}"))
            })?;
        let handle = runtime.handle().clone();
        let sup = py
            .allow_threads(|| handle.block_on(Supervisor::new(&config)))
            .map_err(|e| LlmvisorError::new_err(e.to_string()))?;
        let core = Core {
            sup: Some(sup),
            handle,
            runtime: Some(runtime),
            held: Mutex::new(HashMap::new()),
            pid: std::process::id(),
        };
        Ok(Self {
            core: Mutex::new(Some(Arc::new(core))),
        })
    }

    /// Starts `model` if needed, waits until it is ready and returns its base URL. The model is
    /// kept up (an app lease) until `shutdown_server(model)` or `close()`.
    #[pyo3(signature = (model, log_callback=None, timeout=None))]
    fn ensure_server_running(
        &self,
        py: Python<'_>,
        model: &str,
        log_callback: Option<PyObject>,
        timeout: Option<f64>,
    ) -> PyResult<String> {
        let core = self.core()?;
        let lease = core.acquire(py, model, timeout, log_callback.as_ref())?;
        Ok(core.hold(lease))
    }

    /// Gives up the app lease of `ensure_server_running` and stops the model's server: once
    /// its other leases end, or at once with `force=True`. Returns when it is stopped.
    #[pyo3(signature = (model, force=false, timeout=None))]
    fn shutdown_server(
        &self,
        py: Python<'_>,
        model: &str,
        force: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let core = self.core()?;
        let cell = core.sup().model(model).map_err(|e| acquire_error(py, e))?;
        let released = core.held().remove(&*cell.id);
        drop(released);
        let deadline = deadline_after(timeout)?;
        let sup = core.sup().clone();
        let id = cell.id.to_string();
        let outcome = wait(
            py,
            core.handle()?,
            async move { sup.unload(&id, force).await },
            deadline,
            None,
            None,
        )?;
        match outcome {
            Some(done) => done.map(drop).map_err(|e| acquire_error(py, e)),
            None => Err(StartTimeoutError::new_err(format!(
                "model `{}` was not stopped within {}s (its leases are still held; force=True does not wait for them)",
                cell.id,
                timeout.unwrap_or_default()
            ))),
        }
    }

    /// A lease on `model`: starts it if needed and waits until it is ready. The model is not
    /// stopped while the lease lives; `release()` (or leaving its `with` block) ends it.
    #[pyo3(signature = (model, timeout=Some(120.0)))]
    fn lease(&self, py: Python<'_>, model: &str, timeout: Option<f64>) -> PyResult<PyLease> {
        let lease = self.core()?.acquire(py, model, timeout, None)?;
        Ok(PyLease::new(lease))
    }

    /// Every model's status: a list of dicts with the fields of `GET /api/models`.
    fn status(&self, py: Python<'_>) -> PyResult<PyObject> {
        let core = self.core()?;
        let text = serde_json::to_string(&core.sup().status())
            .map_err(|e| PyRuntimeError::new_err(format!("cannot encode the status: {e}")))?;
        let json = PyModule::import(py, "json")?;
        Ok(json.call_method1("loads", (text,))?.unbind())
    }

    /// The model's recent server output (up to the last 1000 lines), oldest first.
    fn logs(&self, py: Python<'_>, model: &str) -> PyResult<Vec<String>> {
        let core = self.core()?;
        let sink = core.sup().logs(model).map_err(|e| acquire_error(py, e))?;
        Ok(sink.tail(llmvisor::logs::RING_LINES))
    }

    /// The configured model ids, in order.
    fn models(&self) -> PyResult<Vec<String>> {
        Ok(self.core()?.sup().model_ids())
    }

    /// The state directory this supervisor uses.
    #[getter]
    fn state_dir(&self) -> PyResult<PathBuf> {
        Ok(self.core()?.sup().state_dir().to_owned())
    }

    /// The id of this llmvisor instance (carried by its servers as LLMVISOR_INSTANCE).
    #[getter]
    fn instance_id(&self) -> PyResult<String> {
        Ok(self.core()?.sup().instance_id().to_owned())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.lock().is_none()
    }

    /// Stops every server this supervisor started and waits for them. Idempotent; afterwards
    /// every other call raises ClosedError.
    fn close(&self, py: Python<'_>) {
        let Some(core) = self.lock().take() else {
            return;
        };
        if core.forked() {
            return; // Core's Drop leaks it: the parent owns those servers.
        }
        let leases = std::mem::take(&mut *core.held());
        drop(leases);
        py.allow_threads(move || {
            core.handle.block_on(core.sup().shutdown());
            // The last reference (unless a call on another thread still runs): shuts the
            // runtime down here, with the GIL released.
            drop(core);
        });
    }

    fn __repr__(&self) -> String {
        match &*self.lock() {
            Some(core) => format!(
                "<llmvisor.Supervisor state_dir={:?} models={:?}>",
                core.sup().state_dir().display().to_string(),
                core.sup().model_ids()
            ),
            None => "<llmvisor.Supervisor closed>".to_owned(),
        }
    }
}

impl PySupervisor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Core>>> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live core; in a forked child an error before anything is touched: even a ready
    /// model's lease (which needs no runtime) would be one the parent does not know of.
    fn core(&self) -> PyResult<Arc<Core>> {
        let core = self
            .lock()
            .clone()
            .ok_or_else(|| ClosedError::new_err("this llmvisor.Supervisor is closed"))?;
        core.handle()?;
        Ok(core)
    }
}

/// A lease on a model: while it lives the model's server is not stopped.
#[pyclass(module = "llmvisor._native", name = "Lease")]
struct PyLease {
    lease: Mutex<Option<Lease>>,
    #[pyo3(get)]
    url: String,
    #[pyo3(get)]
    model: String,
}

impl PyLease {
    fn new(lease: Lease) -> Self {
        Self {
            url: lease.url(),
            model: lease.model().to_owned(),
            lease: Mutex::new(Some(lease)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Lease>> {
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl PyLease {
    /// Ends the lease (idempotent).
    fn release(&self) {
        let lease = self.lock().take();
        drop(lease);
    }

    /// True until the lease is released or its server has exited or been stopped.
    #[getter]
    fn active(&self) -> bool {
        self.lock().as_ref().is_some_and(Lease::is_up)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "<llmvisor.Lease model={:?} url={:?} active={}>",
            self.model,
            self.url,
            self.active()
        )
    }
}

/// Runs `fut` as a task on the runtime and waits for it in slices with the GIL released.
/// Between slices, with the GIL: log lines from `logs` go to `callback`, Python's signal
/// handlers run (an exception they raise, e.g. KeyboardInterrupt, is returned and the task's
/// handle dropped), and `deadline` is checked (`Ok(None)` once it has passed).
fn wait<T: Send + 'static>(
    py: Python<'_>,
    handle: &Handle,
    fut: impl Future<Output = T> + Send + 'static,
    deadline: Option<Instant>,
    mut logs: Option<broadcast::Receiver<String>>,
    callback: Option<&PyObject>,
) -> PyResult<Option<T>> {
    enum Step<T> {
        Done(Result<T, tokio::task::JoinError>),
        Lines(Vec<String>),
        Tick,
    }
    // Python runs signal handlers on its main thread only: other threads need not wake up to
    // check (with a thousand waiting threads, their wake-ups would fight over the GIL).
    let slice_len = if on_main_thread(py)? {
        SLICE
    } else {
        NO_SIGNALS_SLICE
    };
    let mut task = handle.spawn(fut);
    loop {
        let slice = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left.min(slice_len),
                None => return Ok(None),
            },
            None => slice_len,
        };
        let step = py.allow_threads(|| {
            handle.block_on(async {
                tokio::select! {
                    biased;
                    out = &mut task => Step::Done(out),
                    lines = next_lines(&mut logs) => Step::Lines(lines),
                    () = tokio::time::sleep(slice) => Step::Tick,
                }
            })
        });
        match step {
            Step::Done(Ok(out)) => {
                // Lines the server printed up to the end of the wait, then nothing more.
                let rest = drain(&mut logs);
                deliver(py, callback, rest)?;
                return Ok(Some(out));
            }
            Step::Done(Err(e)) => {
                return Err(PyRuntimeError::new_err(format!(
                    "llmvisor's task failed: {e}"
                )))
            }
            Step::Lines(lines) => deliver(py, callback, lines)?,
            Step::Tick => {}
        }
        py.check_signals()?;
    }
}

fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    let threading = PyModule::import(py, "threading")?;
    let main = threading.call_method0("main_thread")?;
    let current = threading.call_method0("current_thread")?;
    Ok(main.is(&current))
}

/// The next log lines: at least one (pending forever without a receiver or once it is closed).
async fn next_lines(logs: &mut Option<broadcast::Receiver<String>>) -> Vec<String> {
    let Some(rx) = logs.as_mut() else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(line) => {
            let mut lines = vec![line];
            lines.extend(drain(logs));
            lines
        }
        Err(broadcast::error::RecvError::Lagged(n)) => {
            vec![format!("[llmvisor: {n} lines of output skipped]")]
        }
        Err(broadcast::error::RecvError::Closed) => {
            *logs = None;
            std::future::pending().await
        }
    }
}

/// Whatever lines are already waiting, without blocking.
fn drain(logs: &mut Option<broadcast::Receiver<String>>) -> Vec<String> {
    let mut out = Vec::new();
    let Some(rx) = logs.as_mut() else {
        return out;
    };
    loop {
        match rx.try_recv() {
            Ok(line) => out.push(line),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                out.push(format!("[llmvisor: {n} lines of output skipped]"))
            }
            Err(_) => return out,
        }
    }
}

/// The lines of the start under way: from the supervisor's last "llmvisor: starting ID (…"
/// line on (none if it is not among `recent`).
fn current_start(recent: Vec<String>, id: &str) -> Vec<String> {
    let marker = format!("llmvisor: starting {id} (");
    match recent.iter().rposition(|l| l.starts_with(&marker)) {
        Some(at) => recent.into_iter().skip(at).collect(),
        None => Vec::new(),
    }
}

fn deliver(py: Python<'_>, callback: Option<&PyObject>, lines: Vec<String>) -> PyResult<()> {
    if let Some(cb) = callback {
        for line in lines {
            cb.call1(py, (line,))?;
        }
    }
    Ok(())
}

fn deadline_after(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Ok(Instant::now().checked_add(Duration::from_secs_f64(t.min(1e9))))
        }
        Some(t) => Err(PyTypeError::new_err(format!(
            "timeout must be a non-negative number of seconds or None, not {t}"
        ))),
    }
}

fn caller_timeout(model: &str, timeout: Option<f64>) -> PyErr {
    StartTimeoutError::new_err(format!(
        "model `{model}` was not ready within the {}s timeout (its start goes on for other callers)",
        timeout.unwrap_or_default()
    ))
}

/// The Python exception for an [`AcquireError`], message intact; `model`, `reason` and
/// `log_tail` are set as attributes where they exist.
fn acquire_error(py: Python<'_>, e: AcquireError) -> PyErr {
    let message = e.to_string();
    let (err, model, reason, tail) = match e {
        AcquireError::UnknownModel { name, known } => {
            let err = UnknownModelError::new_err(message);
            let _ = err.value(py).setattr("known", known);
            (err, name, None, None)
        }
        AcquireError::StartTimeout {
            model, log_tail, ..
        } => (
            StartTimeoutError::new_err(message),
            model,
            None,
            Some(log_tail),
        ),
        AcquireError::StartFailed {
            model,
            reason,
            log_tail,
            ..
        } => (
            StartError::new_err(message),
            model,
            Some(reason),
            Some(log_tail),
        ),
        AcquireError::NoRoom { model, reason, .. }
        | AcquireError::Unavailable { model, reason } => {
            (StartError::new_err(message), model, Some(reason), None)
        }
    };
    let value = err.value(py);
    let _ = value.setattr("model", model);
    let _ = value.setattr("reason", reason);
    let _ = value.setattr("log_tail", tail.unwrap_or_default());
    err
}

fn load_config(
    path: Option<PathBuf>,
    text: Option<String>,
    state_dir: Option<PathBuf>,
) -> PyResult<Config> {
    let loaded = match (&path, text) {
        (Some(p), None) => config::load(p),
        (None, Some(t)) => config::parse(&t, None),
        (Some(_), Some(_)) => {
            return Err(PyTypeError::new_err(
                "give either a config path or config_text=, not both",
            ))
        }
        (None, None) => {
            return Err(PyTypeError::new_err(
                "Supervisor() needs a config: a path to llmvisor.toml, or config_text=\"...\"",
            ))
        }
    };
    let mut config = loaded.map_err(|errors| ConfigError::new_err(render(&errors, &path)))?;
    if let Some(dir) = state_dir {
        config.state_dir = dir;
    }
    Ok(config)
}

/// The text `llmvisor check` prints for these errors.
fn render(errors: &ConfigErrors, path: &Option<PathBuf>) -> String {
    let mut text = errors.to_string();
    if errors.len() > 1 {
        let file = path
            .as_ref()
            .map_or_else(|| "<config>".to_owned(), |p| p.display().to_string());
        text.push_str(&format!("\n{} errors in {file}", errors.len()));
    }
    text
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PySupervisor>()?;
    m.add_class::<PyLease>()?;
    m.add("LlmvisorError", py.get_type::<LlmvisorError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("UnknownModelError", py.get_type::<UnknownModelError>())?;
    m.add("StartError", py.get_type::<StartError>())?;
    m.add("StartTimeoutError", py.get_type::<StartTimeoutError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    Ok(())
}
