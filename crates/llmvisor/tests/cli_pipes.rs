//! Every CLI output survives a reader that went away (`llmvisor gc | head -1`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, owned from here on.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

/// Runs `llmvisor args` with stdout and stderr on pipes whose read ends are already closed.
fn run_into_closed_pipes(args: &[&str]) -> std::process::Output {
    let (read_out, write_out) = pipe();
    let (read_err, write_err) = pipe();
    drop(read_out);
    drop(read_err);
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_out))
        .stderr(Stdio::from(write_err))
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn gc_check_and_errors_survive_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", empty.display().to_string()),
    )
    .unwrap();
    for args in [
        vec!["gc", "--state-dir", empty.to_str().unwrap()],
        vec!["check", "--config", config.to_str().unwrap()],
        // An error message, on a closed stderr.
        vec!["check", "--config", "/nonexistent/llmvisor.toml"],
    ] {
        let out = run_into_closed_pipes(&args);
        // A panic exits 101; a clean run 0, a reported error 1.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?}",
            out.status
        );
    }
}
