use std::time::{Duration, SystemTime};

use super::*;
use crate::owner::OwnerLock;

fn child(instance: &str, model: &str, pid: u32) -> ChildRecord {
    let at = now();
    ChildRecord {
        instance_id: instance.into(),
        model: model.into(),
        pid,
        start_time: 1234,
        pgid: pid,
        port: Some(10500),
        socket: None,
        boot_id: "boot".into(),
        state: "starting".into(),
        started_at: at,
        updated_at: at,
    }
}

#[test]
fn times_round_trip_to_the_millisecond() {
    let t = now();
    assert_eq!(from_ms(to_ms(t)), t);
    let before = UNIX_EPOCH - Duration::from_millis(5);
    assert_eq!(from_ms(to_ms(before)), before);
}

#[tokio::test]
async fn children_are_recorded_updated_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let mut a = child("lv-a", "gemma", 100);
    a.socket = Some("/tmp/x.sock".into());
    a.port = None;
    store.record_child(&a).await.unwrap();
    store
        .record_child(&child("lv-b", "qwen", 200))
        .await
        .unwrap();
    assert_eq!(store.children().await.unwrap()[0], a);
    assert!(store.set_child_state("lv-a", 100, "ready").await.unwrap());
    assert!(!store.set_child_state("lv-a", 999, "ready").await.unwrap());
    let rows = store.children().await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].state, "ready");
    store.remove_child("lv-a", 100).await.unwrap();
    assert_eq!(store.children().await.unwrap().len(), 1);
    store.close().await;
}

#[tokio::test]
async fn remove_instance_forgets_everything_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let _a = OwnerLock::acquire(dir.path(), "lv-a").unwrap();
    let _b = OwnerLock::acquire(dir.path(), "lv-b").unwrap();
    for id in ["lv-a", "lv-b"] {
        store
            .register_instance(&InstanceRecord::current(id))
            .await
            .unwrap();
        store.record_child(&child(id, id, 7)).await.unwrap();
        assert!(store.claim_model(id, id).await.unwrap().is_ours());
        store
            .put_remote_lease(&RemoteLease {
                id: format!("lease-{id}"),
                model: "m".into(),
                holder: id.into(),
                expires_at: SystemTime::now() + Duration::from_secs(60),
            })
            .await
            .unwrap();
    }
    assert!(store.claim_port(10500, "lv-a", "lv-a").await.unwrap());
    store.remove_instance("lv-a").await.unwrap();
    let ids: Vec<String> = store
        .instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["lv-b"]);
    assert!(store
        .children()
        .await
        .unwrap()
        .iter()
        .all(|c| c.instance_id == "lv-b"));
    assert_eq!(store.claim_holder("lv-a").await.unwrap(), None);
    assert_eq!(
        store.claim_holder("lv-b").await.unwrap().as_deref(),
        Some("lv-b")
    );
    assert!(store.claim_port(10500, "lv-b", "x").await.unwrap());
    let leases = store.live_remote_leases("m").await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].holder, "lv-b");
}

#[tokio::test]
async fn remote_leases_expire_and_die_with_their_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let holder = OwnerLock::acquire(dir.path(), "lv-h").unwrap();
    let soon = SystemTime::now() + Duration::from_millis(300);
    let lease = |id: &str, expires_at| RemoteLease {
        id: id.into(),
        model: "gemma".into(),
        holder: "lv-h".into(),
        expires_at,
    };
    store.put_remote_lease(&lease("l1", soon)).await.unwrap();
    store
        .put_remote_lease(&lease("l2", SystemTime::now() + Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(store.live_remote_leases("gemma").await.unwrap().len(), 2);
    assert!(store.live_remote_leases("other").await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let live = store.live_remote_leases("gemma").await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, "l2");
    // Renewal keeps one alive; a removed one cannot be renewed.
    assert!(store
        .renew_remote_lease("l2", SystemTime::now() + Duration::from_secs(120))
        .await
        .unwrap());
    assert!(!store
        .renew_remote_lease("l1", SystemTime::now())
        .await
        .unwrap());
    // The holder dies: its leases no longer count, whatever their expiry.
    drop(holder);
    assert!(store.live_remote_leases("gemma").await.unwrap().is_empty());
    store.remove_remote_lease("l2").await.unwrap();
}

#[tokio::test]
async fn release_only_what_one_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let _a = OwnerLock::acquire(dir.path(), "lv-a").unwrap();
    let _b = OwnerLock::acquire(dir.path(), "lv-b").unwrap();
    assert_eq!(
        store.claim_model("m", "lv-a").await.unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store.claim_model("m", "lv-a").await.unwrap(),
        ClaimOutcome::Claimed
    );
    assert!(!store.release_claim("m", "lv-b").await.unwrap());
    assert_eq!(
        store.claim_model("m", "lv-b").await.unwrap(),
        ClaimOutcome::HeldBy("lv-a".into())
    );
    assert!(store.release_claim("m", "lv-a").await.unwrap());
    assert!(store.claim_model("m", "lv-b").await.unwrap().is_ours());

    assert!(store.claim_port(10600, "lv-a", "m").await.unwrap());
    store.release_port(10600, "lv-b").await.unwrap();
    assert!(!store.claim_port(10600, "lv-b", "m").await.unwrap());
    store.release_port(10600, "lv-a").await.unwrap();
    assert!(store.claim_port(10600, "lv-b", "m").await.unwrap());
}

#[tokio::test]
async fn a_closed_store_answers_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let other = store.clone();
    store.close().await;
    assert!(matches!(
        other.children().await,
        Err(StoreError::Closed { .. })
    ));
}

#[tokio::test]
async fn an_unusable_state_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let bad = file.join("state");
    let err = Store::open(&bad).await.unwrap_err();
    assert!(matches!(err, StoreError::StateDir { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&bad.display().to_string()), "{text}");
}

#[test]
fn a_store_can_be_opened_without_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_blocking(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    });
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(garbage.path().join(DB_FILE), vec![7u8; 4096]).unwrap();
    assert!(matches!(
        Store::open_blocking(garbage.path()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn learned_memory_keeps_the_largest_per_file_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    assert_eq!(
        store.learned_memory("/m.gguf:9", "c=2048").await.unwrap(),
        None
    );
    store
        .remember_memory("/m.gguf:9", "c=2048", 300)
        .await
        .unwrap();
    store
        .remember_memory("/m.gguf:9", "c=2048", 200)
        .await
        .unwrap();
    store
        .remember_memory("/m.gguf:9", "c=4096", 500)
        .await
        .unwrap();
    assert_eq!(
        store.learned_memory("/m.gguf:9", "c=2048").await.unwrap(),
        Some(300)
    );
    assert_eq!(
        store.learned_memory("/m.gguf:9", "c=4096").await.unwrap(),
        Some(500)
    );
    store.close().await;
}

/// A state dir written by a build before issue 20 (schema v1) opens, migrated, with its rows.
#[tokio::test]
async fn a_v1_state_dir_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;
             INSERT INTO claims (model, instance_id, claimed_at) VALUES ('gemma', 'lv-a', 1);"
        ))
        .unwrap();
    }
    let store = Store::open(dir.path()).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    store.remember_memory("f", "s", 1).await.unwrap();
    assert_eq!(store.learned_memory("f", "s").await.unwrap(), Some(1));
    let claims: i64 = store
        .call(|db| {
            db.conn
                .query_row("SELECT count(*) FROM claims", [], |r| r.get(0))
        })
        .await
        .unwrap();
    assert_eq!(claims, 1);
    store.close().await;
}
