//! llmvisor: a crash-safe supervisor and OpenAI-compatible router for local LLM inference
//! servers.
//!
//! The library does the work; the `llmvisor` binary is a thin layer over it.
//! Data flows config → supervisor (spawn / ports / readiness / child) → router → cli.

pub mod child;
#[cfg(feature = "daemon")]
pub mod cli;
pub mod cluster;
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod discover;
pub(crate) mod escalate;
pub mod estimate;
pub mod events;
mod fork_guard;
pub mod gguf;
pub mod gpu;
pub mod ids;
pub mod logs;
pub(crate) mod metrics;
pub mod owner;
pub(crate) mod pidfd;
pub(crate) mod ports;
pub mod procfs;
pub(crate) mod readiness;
pub mod reaper;
pub mod spawn;
pub(crate) mod statedir;
pub mod store;
pub mod supervisor;
pub mod sweep;
pub(crate) mod sync;
pub(crate) mod units;
pub mod upstream;

pub use config::Config;
pub use supervisor::{AcquireError, Lease, ModelStatus, Phase, Supervisor};
