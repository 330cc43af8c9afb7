//! Spawning children: own process group, parent-death signal, marker in the environment.
//!
//! Every child is forked from one dedicated, long-lived thread (the *spawner thread*). This matters:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not when the process
//! does. tokio's blocking pool retires threads after ~10 s idle, and a task may run on any worker,
//! so a child forked from either would be SIGKILLed at some random later moment. The spawner thread
//! lives exactly as long as the [`Spawner`]; when it ends (the supervisor is gone, or the whole
//! process died, SIGKILL included) the kernel kills every child it forked.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::thread;

use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Environment variable carried by every child: the id of the llmvisor instance that started it,
/// so its origin can be proven later (see the orphan sweep).
pub const INSTANCE_ENV: &str = "LLMVISOR_INSTANCE";

/// What to run: already expanded, no shell involved.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start `{program}`: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("the spawner thread is gone (llmvisor is shutting down)")]
    SpawnerGone,
}

type Job = (SpawnSpec, oneshot::Sender<Result<Child, SpawnError>>);

/// Handle to the spawner thread. Cheap to clone; the thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Spawner {
    jobs: std_mpsc::Sender<Job>,
    instance_id: std::sync::Arc<str>,
}

impl Spawner {
    /// Starts the spawner thread. Must be called inside a tokio runtime: children are registered
    /// with that runtime's process driver so they can be awaited.
    pub fn start(instance_id: &str) -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let instance = instance_id.to_owned();
        thread::Builder::new()
            .name("llmvisor-spawner".into())
            .spawn(move || {
                let _enter = runtime.enter();
                let parent = rustix::process::getpid();
                while let Ok((spec, reply)) = rx.recv() {
                    let _ = reply.send(spawn_here(&spec, &instance, parent));
                }
            })?;
        Ok(Self {
            jobs,
            instance_id: instance_id.into(),
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Forks and execs `spec` on the spawner thread.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<Child, SpawnError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((spec, tx))
            .map_err(|_| SpawnError::SpawnerGone)?;
        rx.await.map_err(|_| SpawnError::SpawnerGone)?
    }
}

fn spawn_here(spec: &SpawnSpec, instance: &str, parent: Pid) -> Result<Child, SpawnError> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .env(INSTANCE_ENV, instance)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a stop signals the whole group, grandchildren included.
        .process_group(0)
        // We reap and kill explicitly; dropping a handle must not race that.
        .kill_on_drop(false);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing on success.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            still_child_of(parent)
        });
    }
    cmd.spawn().map_err(|source| SpawnError::Exec {
        program: spec.program.clone(),
        source,
    })
}

/// In the forked child: fails when `parent` is no longer our parent (llmvisor died between fork
/// and prctl, so the death signal will never come: refuse to run rather than become an orphan).
/// Runs between fork and exec, so it must not allocate: the error is a bare errno (`ESRCH`),
/// which `Command::spawn` reports to the parent through its pipe.
fn still_child_of(parent: Pid) -> io::Result<()> {
    if rustix::process::getppid() == Some(parent) {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::ESRCH))
    }
}

/// Sends `signal` to every process in the group led by `pgid`. A group that no longer exists is
/// not an error.
pub fn signal_group(pgid: u32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pgid as i32) {
        match rustix::process::kill_process_group(pid, signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => tracing::warn!(pgid, ?signal, "cannot signal process group: {e}"),
        }
    }
}

/// A human description of how a process ended: "exit code 3", "signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            1 => " (SIGHUP)",
            2 => " (SIGINT)",
            6 => " (SIGABRT)",
            9 => " (SIGKILL)",
            11 => " (SIGSEGV)",
            15 => " (SIGTERM)",
            _ => "",
        };
        format!("signal {sig}{name}")
    } else {
        format!("{status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_orphan_check_fails_with_a_bare_errno() {
        assert!(still_child_of(rustix::process::getppid().unwrap()).is_ok());
        let not_parent = Pid::from_raw(std::process::id() as i32).unwrap();
        let e = still_child_of(not_parent).unwrap_err();
        // A bare OS error carries no heap payload (nothing was allocated after fork).
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }
}
