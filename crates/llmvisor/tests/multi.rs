//! Several llmvisor processes on one state dir act as one: one server per model across all of
//! them, shared through remote leases, taken over when its owner dies.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::http::request;
use support::serve::ServeProcess;
use support::{assert_gone, fake_llm, Scratch};

const WITHIN: Duration = Duration::from_secs(10);

fn config(s: &Scratch, ttl: &str) -> PathBuf {
    let text = format!(
        "state_dir = {:?}\nport_range = [{}, {}]\n[models.m]\ncmd = \"{} --port ${{PORT}} --pid-file {} --startup-delay 300ms\"\nttl = {ttl:?}\n",
        s.state_dir().display().to_string(),
        s.ports.0,
        s.ports.1,
        fake_llm().display(),
        s.path("m.pids").display()
    );
    let path = s.path(&format!("llmvisor-{ttl}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn burst(url: &str, n: usize) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let url = format!("{url}/v1/completions");
            tokio::spawn(async move {
                request(
                    "POST",
                    &url,
                    &[("content-type", "application/json")],
                    r#"{"model":"m"}"#,
                )
                .await
                .status
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_one_server_and_a_takeover_when_the_owner_dies() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let s = Scratch::new();
    let a = ServeProcess::start(&config(&s, "10m"));
    let b = ServeProcess::start(&config(&s, "10m"));

    let mut all = burst(&a.url, 50).await;
    all.extend(burst(&b.url, 50).await);
    for t in all {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        s.pids("m.pids").len(),
        1,
        "exactly one server for both daemons"
    );
    let server = s.pids("m.pids")[0];

    // Whose child is it?
    let parent = llmvisor::procfs::stat(server).unwrap().ppid;
    let (owner, other) = if parent == a.pid() { (a, b) } else { (b, a) };
    assert_eq!(parent, owner.pid());
    let seen_by_other = request("GET", &format!("{}/api/models/m", other.url), &[], "")
        .await
        .json();
    assert_eq!(seen_by_other["state"], "ready");
    assert_eq!(seen_by_other["pid"], server);

    let mut owner = owner;
    owner.signal(Signal::KILL);
    owner.child.wait().unwrap();
    assert_gone(&[server], Duration::from_secs(1)).await;

    // The other serves the model again on its very next request.
    let r = request(
        "POST",
        &format!("{}/v1/completions", other.url),
        &[],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.pids("m.pids").len(), 2);
    let new_server = s.pids("m.pids")[1];
    assert_eq!(
        llmvisor::procfs::stat(new_server).unwrap().ppid,
        other.pid()
    );

    let mut other = other;
    assert_eq!(other.terminate(WITHIN).code(), Some(0));
    s.assert_all_gone(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_does_not_idle_out_a_server_another_instance_uses() {
    let s = Scratch::new();
    let mut owner = ServeProcess::start(&config(&s, "300ms"));
    let r = request("POST", &format!("{}/api/models/m/load", owner.url), &[], "").await;
    assert_eq!(r.status, 200);
    let mut user = ServeProcess::start(&config(&s, "10m"));
    let r = request(
        "POST",
        &format!("{}/v1/completions", user.url),
        &[],
        r#"{"model":"m"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.pids("m.pids").len(),
        1,
        "the second daemon used the first one's server"
    );

    // Well past the owner's TTL: still running, because the other instance holds a lease.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let m = request("GET", &format!("{}/api/models/m", owner.url), &[], "")
            .await
            .json();
        assert_eq!(m["state"], "ready", "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The user lets go; now the owner's TTL applies.
    let r = request(
        "POST",
        &format!("{}/api/models/m/unload", user.url),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + WITHIN;
    loop {
        let m = request("GET", &format!("{}/api/models/m", owner.url), &[], "")
            .await
            .json();
        if m["state"] == "stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "owner never idled it out: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(user.terminate(WITHIN).code(), Some(0));
    assert_eq!(owner.terminate(WITHIN).code(), Some(0));
    s.assert_all_gone(WITHIN).await;
}

/// An owner killed a moment ago still holds its lock for a few milliseconds after its server
/// died: its record must not be taken as a server to attach to (seen from the Python package's
/// kill -9 test: the next process was handed a dead URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_owners_dead_server_is_not_attached_to() {
    use llmvisor::owner::OwnerLock;
    use llmvisor::store::{ChildRecord, InstanceRecord, Store};

    let s = Scratch::new();
    let owner = format!("lv-test-owner-{}", llmvisor::ids::random_hex(6));
    std::fs::create_dir_all(s.state_dir()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(s.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let _lock = OwnerLock::acquire(&s.state_dir(), &owner).unwrap();
    let store = Store::open(&s.state_dir()).await.unwrap();
    store
        .register_instance(&InstanceRecord::current(&owner))
        .await
        .unwrap();
    // Its server: recorded ready, then dead (killed and reaped).
    let mut server = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let rec = ChildRecord::of_process(&owner, "m", server.id(), Some(s.ports.0), None, "ready");
    // Killed (by pid: exactly this child) and reaped before anything here can fail.
    server.kill().unwrap();
    server.wait().unwrap();
    store.record_child(&rec.unwrap()).await.unwrap();
    store.claim_model("m", &owner).await.unwrap();
    drop(store);

    let mut m = s.model("m", &[]);
    m.startup_timeout = Duration::from_secs(1);
    let cfg = s.config(vec![m]);
    let sup = llmvisor::Supervisor::new(&cfg).await.unwrap();
    let got = sup.acquire("m").await;
    assert!(
        got.is_err(),
        "attached to a dead server: {:?}",
        got.map(|l| l.url())
    );
    sup.shutdown().await;
    s.assert_all_gone(WITHIN).await;
}
