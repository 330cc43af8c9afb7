//! Issue 10 item 2: a state dir that is not ours alone is refused; links in it are not followed.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use llmvisor::Supervisor;
use support::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_llmvisor");

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_or_world_writable_state_dir_is_refused_with_the_fix() {
    let s = Scratch::new();
    let dir = s.state_dir();
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    let e = Supervisor::new(&s.config(vec![]))
        .await
        .err()
        .expect("a world-writable state dir must be refused")
        .to_string();
    assert!(e.contains(&format!("chmod 700 {}", dir.display())), "{e}");
    // Left as it was: refusing is not fixing behind the user's back.
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o777
    );

    // gc refuses it too, before reading any record.
    std::fs::write(dir.join("state.db"), b"").unwrap();
    let out = Command::new(BIN)
        .args(["gc", "--dry-run", "--state-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 700"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_owned_by_someone_else_is_refused() {
    if !rustix::process::geteuid().is_root() {
        return; // only root can give a directory away
    }
    let s = Scratch::new();
    let dir = s.state_dir();
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
    let e = Supervisor::new(&s.config(vec![]))
        .await
        .err()
        .expect("a state dir of another uid must be refused")
        .to_string();
    assert!(e.contains("owned by uid 65534"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_in_the_state_dir_are_not_followed() {
    let s = Scratch::new();
    let dir = s.state_dir();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    chmod(&dir, 0o700);
    let victim = s.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    // A log file that is a link elsewhere: the model's output must not land there.
    std::os::unix::fs::symlink(&victim, dir.join("logs/m.log")).unwrap();
    let sup = Supervisor::new(&s.config(vec![s.model("m", &["--log-lines", "3"])]))
        .await
        .unwrap();
    sup.load("m").await.unwrap();
    sup.shutdown().await;
    drop(sup);
    s.assert_all_gone(Duration::from_secs(5)).await;
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    // The database itself as a link: refused, the target untouched.
    let other = Scratch::new();
    let odir = other.state_dir();
    std::fs::create_dir(&odir).unwrap();
    chmod(&odir, 0o700);
    std::os::unix::fs::symlink(&victim, odir.join("state.db")).unwrap();
    assert!(llmvisor::store::Store::open(&odir).await.is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}
