//! llmvisor: a crash-safe supervisor and OpenAI-compatible router for local LLM inference
//! servers.
//!
//! The library does the work; the `llmvisor` binary is a thin layer over it.
//! Data flows config → supervisor (spawn / ports / readiness / child) → router → cli.

pub mod child;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod escalate;
pub mod events;
pub mod ids;
pub mod logs;
pub mod metrics;
pub mod owner;
pub mod pidfd;
pub mod ports;
pub mod procfs;
pub mod readiness;
pub mod reaper;
pub mod spawn;
pub mod statedir;
pub mod store;
pub mod supervisor;
pub mod sweep;
pub mod units;
pub mod upstream;

pub use config::Config;
pub use supervisor::{AcquireError, Lease, ModelStatus, Phase, Supervisor};
