//! fake-llm starts, reports its port, answers health, and exits on SIGTERM.
//! (Also makes `cargo test --workspace` build the fake-llm binary that llmvisor's tests run.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn starts_answers_health_and_exits_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-llm"))
        .args(["--port", "0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("fake-llm ended early").unwrap();
        if let Some(a) = line.strip_prefix("fake-llm: listening on http://") {
            break a.to_owned();
        }
    };
    let mut conn = TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("x-fake-pid"), "{resp}");
    let pid = send_sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{pid}: {status}");
}

/// SIGTERM by pid via kill(1) (this crate has no signal library).
fn send_sigterm(pid: u32) -> u32 {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    pid
}
