//! llmvisor: a crash-safe supervisor and OpenAI-compatible router for local LLM inference
//! servers.
//!
//! The library does the work; the `llmvisor` binary is a thin layer over it.
//! Data flows config → supervisor (spawn / ports / readiness) → router → cli.

pub mod config;
