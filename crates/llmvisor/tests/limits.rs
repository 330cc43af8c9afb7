//! Process limits of `llmvisor serve` (its own test binary: it lowers its own rlimit, which the
//! daemon inherits).

mod support;

use std::time::Duration;

use support::serve::ServeProcess;
use support::Scratch;

/// The soft and hard "Max open files" of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_owned(), f[4].to_owned())
}

#[test]
fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = Some(256);
    setrlimit(Resource::Nofile, lim).unwrap();
    let s = Scratch::new();
    let config = s.write_config(&[], "");
    let mut d = ServeProcess::start(&config);
    let (soft, hard) = nofile(d.pid());
    assert_eq!(soft, hard, "soft limit of the daemon");
    assert!(d.terminate(Duration::from_secs(10)).success());
}
