//! Swap thrash, measured with real processes: FIFO admission vs swap-aware admission.
//!
//! ```text
//! cargo build --release -p fake-llm && cargo run --release --example thrash
//! ```
//!
//! The scenario of issue 14: models that take 0.5 s to load, agents that each send four
//! requests one after another (0.3 s each), three agents per model, all at once. Two setups:
//! two models with `max_loaded = 1`, and three models with `max_loaded = 2`. Each runs with
//! `max_wait_for_swap = 0` (FIFO: a start that needs room drains the busy model at once) and with
//! the default 30 s (the busy model serves its queue first), side by side, `ROUNDS` times
//! (default 3). Prints server starts, wall time and the slowest request, as medians.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmvisor::Supervisor;

const LOAD: &str = "500ms";
const ANSWER: Duration = Duration::from_millis(300);
const REQUESTS_PER_AGENT: usize = 4;
const AGENTS_PER_MODEL: usize = 3;

struct Outcome {
    starts: usize,
    wall: Duration,
    slowest: Duration,
}

#[tokio::main]
async fn main() {
    let fake =
        find_fake_llm().expect("build the fake server first: cargo build --release -p fake-llm");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("| models | max_loaded | rule | starts | wall | slowest request |");
    println!("|---|---|---|---|---|---|");
    for (models, max_loaded) in [(2, 1), (3, 2)] {
        let mut fifo = Vec::new();
        let mut aware = Vec::new();
        for _ in 0..rounds {
            // Interleaved, so both rules see the same machine noise.
            fifo.push(run(&fake, models, max_loaded, "0s").await);
            aware.push(run(&fake, models, max_loaded, "30s").await);
        }
        for (rule, outcomes) in [("FIFO", &fifo), ("swap-aware", &aware)] {
            println!(
                "| {models} | {max_loaded} | {rule} | {} | {:.2} s | {:.2} s |",
                median(outcomes.iter().map(|o| o.starts as f64)),
                median(outcomes.iter().map(|o| o.wall.as_secs_f64())),
                median(outcomes.iter().map(|o| o.slowest.as_secs_f64())),
            );
        }
        let ratio = median(aware.iter().map(|o| o.wall.as_secs_f64()))
            / median(fifo.iter().map(|o| o.wall.as_secs_f64()));
        println!("| {models} | {max_loaded} | wall ratio | | {ratio:.2}× | |");
    }
}

async fn run(fake: &Path, models: usize, max_loaded: usize, max_wait: &str) -> Outcome {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut text = format!(
        "state_dir = \"{}\"\nmax_loaded = {max_loaded}\nmax_wait_for_swap = \"{max_wait}\"\n\
         [defaults]\nhealth_interval = 0\nstop_timeout = \"2s\"\n",
        scratch.path().join("state").display()
    );
    let ids: Vec<String> = (0..models).map(|i| format!("m{i}")).collect();
    for id in &ids {
        text.push_str(&format!(
            "[models.{id}]\ncmd = [\"{}\", \"--port\", \"${{PORT}}\", \"--startup-delay\", \"{LOAD}\"]\n",
            fake.display()
        ));
    }
    let config = llmvisor::config::parse(&text, None).expect("valid config");
    let sup = Supervisor::new(&config).await.expect("supervisor");
    let began = Instant::now();
    let mut agents = Vec::new();
    for agent in 0..models * AGENTS_PER_MODEL {
        let (sup, id) = (sup.clone(), ids[agent % models].clone());
        agents.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for _ in 0..REQUESTS_PER_AGENT {
                let asked = Instant::now();
                let lease = sup.acquire(&id).await.expect("acquire");
                tokio::time::sleep(ANSWER).await;
                drop(lease);
                slowest = slowest.max(asked.elapsed());
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for a in agents {
        slowest = slowest.max(a.await.expect("agent"));
    }
    let wall = began.elapsed();
    let starts = sup
        .status()
        .iter()
        .map(|m| m.restarts as usize + usize::from(m.ready_ms.is_some()))
        .sum();
    sup.shutdown().await;
    Outcome {
        starts,
        wall,
        slowest,
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `$FAKE_LLM_BIN`, else target/release/fake-llm, else target/debug/fake-llm.
fn find_fake_llm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FAKE_LLM_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("fake-llm"))
        .find(|p| p.exists())
}
