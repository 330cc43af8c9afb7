//! The `llmvisor` command line: argument types (clap) and what each subcommand does.
//!
//! `main.rs` parses [`Cli`], sets up logging with [`log_filter`], builds a runtime and awaits
//! [`run`]. Client commands (`ps`, `load`, `unload`, `logs`) talk to a running daemon over its
//! `/api/*` routes through [`client::Daemon`]; errors come back as values whose `Display` is the
//! sentence a person should read.

pub mod client;
pub mod json;
mod models;
pub mod progress;
pub mod table;
pub mod top;
pub mod url;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use http::Method;
use http_body_util::BodyExt;

use crate::config::{self, Config};
use client::{ClientError, Daemon};
use progress::Progress;
use table::ModelInfo;
use url::encode_segment;

/// The environment variable holding the API key client commands send.
pub const API_KEY_ENV: &str = "LLMVISOR_API_KEY";

/// Crash-safe supervisor and OpenAI-compatible router for local LLM servers.
#[derive(Debug, Parser)]
#[command(name = "llmvisor", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level: trace, debug, info, warn, error or off, or RUST_LOG-style directives
    /// [default: RUST_LOG, else info for serve and warn for the other commands]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (SIGINT/SIGTERM stop it and every server it started)
    Serve(ServeArgs),
    /// Validate a config file: exit 0 if fine, 1 with every problem found
    Check(CheckArgs),
    /// List the models a config and discovery give (id, where found, file, size, estimate)
    Models(ModelsArgs),
    /// Show the daemon's models and their state
    Ps(PsArgs),
    /// Start a model and wait until it is ready
    Load(LoadArgs),
    /// Stop a model (waits for its leases unless --force)
    Unload(UnloadArgs),
    /// Print a model's server output
    Logs(LogsArgs),
    /// A live view of the daemon's models, queue and requests (q quits)
    Top(TopArgs),
    /// Find and stop servers left behind by a dead llmvisor
    Gc(GcArgs),
    /// Print a llama-swap config (YAML) as the equivalent llmvisor TOML (warnings on stderr)
    Convert(ConvertArgs),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The llama-swap config file (YAML)
    #[arg(value_name = "FILE.yaml")]
    pub file: PathBuf,
}

impl Command {
    /// True for `serve`, the one long-running command.
    pub fn is_serve(&self) -> bool {
        matches!(self, Command::Serve(_))
    }

    /// The log level used when neither `--log-level` nor `RUST_LOG` names one.
    pub fn default_log_level(&self) -> &'static str {
        if self.is_serve() {
            "info"
        } else {
            "warn"
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file (TOML) [default: ~/.config/llmvisor/llmvisor.toml if it exists, else
    /// none: every model found is served with defaults]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A folder whose every GGUF is a model (repeatable; added to the config's models_dirs)
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<PathBuf>,
    /// Address to listen on, overriding the config's `listen`
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for state (sockets, instance records), overriding the config's `state_dir`
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// The config file [default: ~/.config/llmvisor/llmvisor.toml if it exists]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A folder whose every GGUF is a model (repeatable)
    #[arg(long = "models-dir", value_name = "DIR")]
    pub models_dirs: Vec<PathBuf>,
    /// Print JSON (`{"models": [...], "warnings": [...]}`) instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config file (TOML, or llama-swap's YAML)
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

/// How a client command finds and authenticates to the daemon.
#[derive(Debug, Clone, Default, Args)]
pub struct DaemonArgs {
    /// The daemon's URL [default: the `listen` of --config, else $LLMVISOR_URL, else
    /// http://127.0.0.1:8080]
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// A config file: its `listen` gives the URL and its admin/API keys the key
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API key to send as `Authorization: Bearer KEY`
    #[arg(long, value_name = "KEY", env = API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print the daemon's JSON (the array of GET /api/models) instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The model's id or alias
    pub model: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    /// The model's id or alias
    pub model: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Stop it now, without waiting for its leases and in-flight requests
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The model's id or alias
    pub model: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Keep printing new output as it comes
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print one screen after the first snapshot and exit
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The state directory of the llmvisor that died (default: the config's, else the default)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Read `state_dir` from this config
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only show what would be stopped
    #[arg(long)]
    pub dry_run: bool,
}

/// An error that was already shown to the user (e.g. config diagnostics): [`run`] turns it into
/// its exit code without printing anything more.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
struct Reported(u8);

/// The tracing filter: `--log-level` if given, else `RUST_LOG` if set and valid, else `default`.
pub fn log_filter(
    log_level: Option<&str>,
    rust_log: Option<&str>,
    default: &str,
) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    use tracing_subscriber::EnvFilter;
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if let Some(level) = log_level {
        let level = level.trim();
        let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level));
        // A bare word that is not a level would silently be taken as a target name.
        if !is_level && !level.contains('=') {
            anyhow::bail!(
                "invalid --log-level `{level}`: use one of {} (or RUST_LOG-style directives \
                 such as `llmvisor=debug`)",
                LEVELS.join(", ")
            );
        }
        return EnvFilter::try_new(level.to_ascii_lowercase())
            .with_context(|| format!("invalid --log-level `{level}`"));
    }
    if let Some(filter) = rust_log
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
    {
        return Ok(filter);
    }
    Ok(EnvFilter::new(default))
}

/// Runs one command. `Ok` carries the exit code (problems already printed, as `check` does);
/// `Err` is for the caller to print as `error: …` and exit 1.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let result = match cli.command {
        Command::Serve(args) => serve(&args).await,
        Command::Check(args) => Ok(check(&args.config)),
        Command::Models(args) => list_models(&args),
        Command::Ps(args) => ps(&args).await,
        Command::Load(args) => load(&args).await,
        Command::Unload(args) => unload(&args).await,
        Command::Logs(args) => logs(&args).await,
        Command::Top(args) => top::run(&daemon_for(&args.daemon)?, args.once).await,
        Command::Gc(args) => gc(&args).await,
        Command::Convert(args) => Ok(convert(&args.file)),
    };
    match result {
        Err(e) => match e.downcast_ref::<Reported>() {
            Some(Reported(code)) => Ok(ExitCode::from(*code)),
            None => Err(e),
        },
        ok => ok,
    }
}

/// Loads a config, printing its diagnostics (and failing with [`Reported`]) when it is invalid.
/// Warnings (a llama-swap config's keys that llmvisor does not do) go to stderr too.
fn load_config_or_report(path: &Path) -> anyhow::Result<Config> {
    let (config, warnings) = load_config_with_warnings(path)?;
    print_warnings(&warnings);
    Ok(config)
}

fn print_warnings(warnings: &[config::Diagnostic]) {
    let mut err = std::io::stderr().lock();
    for w in warnings {
        let _ = writeln!(err, "{}", config::llama_swap::render_warning(w));
    }
}

/// [`load_config_or_report`] without printing the warnings.
fn load_config_with_warnings(path: &Path) -> anyhow::Result<(Config, Vec<config::Diagnostic>)> {
    config::load_with_warnings(path).map_err(|errors| {
        let _ = writeln!(std::io::stderr().lock(), "{errors}");
        if errors.len() > 1 {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{} errors in {}",
                errors.len(),
                path.display()
            );
        }
        anyhow::Error::new(Reported(1))
    })
}

async fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .config
        .clone()
        .or_else(crate::daemon::discovery::default_config_file);
    if let Some(path) = &path {
        // A bad config reads exactly as `llmvisor check` shows it.
        load_config_or_report(path)?;
    }
    let loader = crate::daemon::discovery::Loader {
        path,
        listen: args.listen,
        state_dir: args.state_dir.clone(),
        models_dirs: args.models_dirs.clone(),
    };
    crate::daemon::serve_forever(loader).await?;
    Ok(ExitCode::SUCCESS)
}

/// `llmvisor models`: the config's models and the discovered ones, without starting anything.
fn list_models(args: &ModelsArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .config
        .clone()
        .or_else(crate::daemon::discovery::default_config_file);
    let mut config = match &path {
        Some(p) => load_config_or_report(p)?,
        None => config::parse("", None).map_err(anyhow::Error::new)?,
    };
    models::add_dirs(&mut config, &args.models_dirs);
    let found = crate::discover::apply(&mut config, &|name| std::env::var(name).ok())?;
    let text = if args.json {
        format!("{:#}\n", models::json(&config, &found))
    } else {
        models::table(&config, &found)
    };
    print_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// What `memory_budget = "auto"` and `gpu_budget` make of this machine now (the daemon reads
/// it when it starts), one line each; empty when the config asks for neither.
fn machine_budgets(config: &config::Config) -> String {
    use crate::units::format_size;
    let mut text = String::new();
    if config.budgets.memory_auto {
        let machine = crate::supervisor::Machine {
            mem_available: crate::procfs::mem_available(),
            gpus: Vec::new(),
        };
        let b = machine.memory_budget(config);
        match (b.bytes, b.origin) {
            (Some(bytes), Some(origin)) => text.push_str(&format!(
                "  memory_budget: {} on this machine now ({origin})\n",
                format_size(bytes)
            )),
            _ => text.push_str("  memory_budget: auto, but MemAvailable of /proc/meminfo is unreadable here: no budget\n"),
        }
    }
    if config.budgets.gpu.is_some() {
        let machine = crate::supervisor::Machine::read(&*crate::gpu::probe());
        let budgets = machine.gpu_budgets(config);
        if machine.gpus.is_empty() {
            text.push_str("  gpu_budget: no GPU found (NVML): RAM only\n");
        }
        for g in &machine.gpus {
            let b = budgets.get(&g.index).copied().unwrap_or(0);
            text.push_str(&format!(
                "  gpu_budget: GPU {} ({}): {} of {}\n",
                g.index,
                g.name,
                format_size(b),
                format_size(g.total)
            ));
        }
    }
    text
}

/// `llmvisor check`: prints `FILE: ok (N models: a, b)` and each model's memory (the estimate
/// and its parts), or every diagnostic. For a llama-swap config, also how each model maps, and
/// its warnings (on stderr).
pub fn check(path: &Path) -> ExitCode {
    match load_config_or_report(path) {
        Ok(mut config) => {
            let mut text = format!("{}: ok ({})\n", path.display(), models_summary(&config));
            text.push_str(&machine_budgets(&config));
            for m in &config.models {
                if let Some(line) = crate::supervisor::Memory::for_config(m).summary() {
                    text.push_str(&format!("  {}: {line}\n", m.id));
                }
            }
            if config::llama_swap::is_yaml_path(path) {
                text.push_str("llama-swap models as llmvisor runs them:\n");
                text.push_str(&config::llama_swap::mapping_summary(&config));
            }
            match crate::discover::apply(&mut config, &|name| std::env::var(name).ok()) {
                Ok(found) => text.push_str(&models::check_summary(&found)),
                Err(e) => text.push_str(&format!("warning: {e}\n")),
            }
            let _ = print_stdout(&text);
            ExitCode::SUCCESS
        }
        Err(_) => ExitCode::from(1),
    }
}

/// `llmvisor convert FILE.yaml`: the equivalent TOML on stdout, warnings on stderr; exit 1 with
/// the diagnostics when the YAML is not a valid config.
pub fn convert(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}: error: cannot read: {e}",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let converted = match config::llama_swap::convert(&text, Some(path), &env) {
        Ok(c) => c,
        Err(errors) => {
            let _ = writeln!(std::io::stderr().lock(), "{errors}");
            return ExitCode::from(1);
        }
    };
    // The TOML must itself be a valid config: report what is wrong at the YAML's positions.
    if let Err(errors) = config::llama_swap::parse_yaml(&text, Some(path), &env) {
        let _ = writeln!(std::io::stderr().lock(), "{errors}");
        return ExitCode::from(1);
    }
    print_warnings(&converted.warnings);
    let _ = print_stdout(&converted.toml);
    ExitCode::SUCCESS
}

fn models_summary(config: &Config) -> String {
    let names = config.model_names();
    match names.len() {
        0 => "no models".to_string(),
        1 => format!("1 model: {}", names[0]),
        n => format!("{n} models: {}", names.join(", ")),
    }
}

/// The daemon a client command talks to: URL per [`url::resolve`], key from `--api-key` /
/// `LLMVISOR_API_KEY`, else the config's first admin key, else its first API key.
fn daemon_for(args: &DaemonArgs) -> anyhow::Result<Daemon> {
    let config = args
        .config
        .as_deref()
        .map(load_config_or_report)
        .transpose()?;
    let env_url = std::env::var(url::URL_ENV).ok();
    let base = url::resolve(
        args.url.as_deref(),
        config.as_ref().map(|c| c.listen),
        env_url.as_deref(),
    )?;
    let api_key = args.api_key.clone().filter(|k| !k.is_empty()).or_else(|| {
        config
            .as_ref()
            .and_then(|c| c.admin_keys.first().or_else(|| c.api_keys.first()).cloned())
    });
    tracing::debug!(url = %base, with_key = api_key.is_some(), "daemon");
    Ok(Daemon::new(base, api_key))
}

fn model_path(model: &str, action: &str) -> String {
    format!("/api/models/{}{action}", encode_segment(model))
}

/// Writes `text` to stdout; a closed pipe (`llmvisor ps | head -1`) is not an error.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

async fn ps(args: &PsArgs) -> anyhow::Result<ExitCode> {
    let daemon = daemon_for(&args.daemon)?;
    if args.json {
        let body = daemon.bytes(Method::GET, "/api/models").await?;
        let text = String::from_utf8_lossy(&body);
        let mut out = json::pretty(&text).ok_or_else(|| ClientError::BadAnswer {
            url: daemon.url().join("/api/models"),
            reason: "not JSON".to_string(),
        })?;
        out.push('\n');
        print_stdout(&out)?;
    } else {
        let mut models: Vec<ModelInfo> = daemon.json(Method::GET, "/api/models").await?;
        // Request activity, when the daemon has it (an older one answers 404: no columns).
        if let Ok(activity) = daemon
            .json::<Vec<serde_json::Value>>(Method::GET, "/api/activity")
            .await
        {
            for m in &mut models {
                let a = activity.iter().find(|a| a["model"] == m.id.as_str());
                m.requests_per_min =
                    Some(a.and_then(|a| a["requests_per_min"].as_u64()).unwrap_or(0));
                m.last_tokens_per_s = a.and_then(|a| a["last_tokens_per_s"].as_f64());
            }
        }
        print_stdout(&table::render(&models))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `(pid 123, http://127.0.0.1:10500)`, or less when the daemon did not say.
fn where_it_runs(m: &ModelInfo) -> String {
    let parts: Vec<String> = m
        .pid
        .map(|p| format!("pid {p}"))
        .into_iter()
        .chain(m.url.clone())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn shown_id<'a>(m: &'a ModelInfo, asked: &'a str) -> &'a str {
    if m.id.is_empty() {
        asked
    } else {
        &m.id
    }
}

async fn load(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    let daemon = daemon_for(&args.daemon)?;
    let name = args.model.as_str();
    // Already running? Then say so instead of "loaded in 0.0s". An unknown model, a connection
    // or a key problem ends it here; any other answer is left for the load request to report.
    let before = match daemon
        .json::<ModelInfo>(Method::GET, &model_path(name, ""))
        .await
    {
        Ok(m) => Some(m),
        Err(
            e @ (ClientError::NotRunning { .. }
            | ClientError::Connect { .. }
            | ClientError::NeedsKey { .. }
            | ClientError::BadKey { .. }
            | ClientError::Api {
                status: http::StatusCode::NOT_FOUND,
                ..
            }),
        ) => return Err(e.into()),
        Err(_) => None,
    };
    if let Some(m) = before.filter(|m| m.state == "ready") {
        let m: ModelInfo = daemon
            .json(Method::POST, &model_path(name, "/load"))
            .await
            .unwrap_or(m);
        print_stdout(&format!(
            "{} is already loaded{}\n",
            shown_id(&m, name),
            where_it_runs(&m)
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::start(&format!("loading {name}"));
    let result = daemon
        .json::<ModelInfo>(Method::POST, &model_path(name, "/load"))
        .await;
    let elapsed = progress.finish();
    let m = result?;
    print_stdout(&format!(
        "loaded {} in {}{}\n",
        shown_id(&m, name),
        crate::units::format_elapsed(elapsed),
        where_it_runs(&m)
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn unload(args: &UnloadArgs) -> anyhow::Result<ExitCode> {
    let daemon = daemon_for(&args.daemon)?;
    let name = args.model.as_str();
    let path = model_path(
        name,
        if args.force {
            "/unload?force=true"
        } else {
            "/unload"
        },
    );
    let progress = Progress::start_spinner_only(&format!("unloading {name}"));
    let result = daemon.bytes(Method::POST, &path).await;
    let elapsed = progress.finish();
    let body = result?;
    let id = serde_json::from_slice::<ModelInfo>(&body)
        .ok()
        .map(|m| m.id)
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| name.to_string());
    print_stdout(&format!(
        "unloaded {id} in {}\n",
        crate::units::format_elapsed(elapsed)
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn logs(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let daemon = daemon_for(&args.daemon)?;
    let path = model_path(
        &args.model,
        if args.follow {
            "/logs?follow=true"
        } else {
            "/logs"
        },
    );
    let mut body = daemon.send(Method::GET, &path).await?.into_body();
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| daemon.transfer_error(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match out.write_all(&data).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(anyhow::Error::new(e).context("cannot write to stdout")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Finds and stops what dead llmvisor instances left behind, proving each process is theirs
/// first; prints what it found and did.
async fn gc(args: &GcArgs) -> anyhow::Result<ExitCode> {
    let dir = match (&args.state_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => load_config_or_report(path)?.state_dir,
        (None, None) => {
            config::parse("", None)
                .map_err(|e| anyhow::anyhow!("cannot work out the default state dir: {e}"))?
                .state_dir
        }
    };
    if !dir.join("state.db").exists() {
        print_stdout(&format!(
            "nothing to clean up (no llmvisor state in {})\n",
            dir.display()
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let store = crate::store::Store::open(&dir).await?;
    let report = crate::sweep::run(&dir, &store, None, args.dry_run).await;
    print_stdout(&format!("{report}\n"))?;
    if !args.dry_run {
        // Saved KV state: of models no longer configured (when the config is known), and
        // saves a dead instance cut short.
        let keep: Option<Vec<String>> = match &args.config {
            Some(path) => Some(
                load_config_or_report(path)?
                    .models
                    .into_iter()
                    .filter(|m| m.kv_persist)
                    .map(|m| m.id)
                    .collect(),
            ),
            None => None,
        };
        for gone in crate::supervisor::kv::dir::clean(&dir, keep.as_deref()) {
            print_stdout(&format!("removed saved KV state {}\n", gone.display()))?;
        }
    }
    Ok(if report.has_errors() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Joins an error and its sources with `": "`, skipping a source whose text the previous
/// message already ends with (errors that repeat their cause).
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_as_the_spec_writes_them() {
        let cli = Cli::try_parse_from([
            "llmvisor",
            "serve",
            "--config",
            "a.toml",
            "--listen",
            "127.0.0.1:9",
            "--state-dir",
            "/s",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.listen, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(s.state_dir.as_deref(), Some(Path::new("/s")));

        let cli = Cli::try_parse_from([
            "llmvisor",
            "unload",
            "gemma",
            "--url",
            "http://h:1/",
            "--force",
        ])
        .unwrap();
        let Command::Unload(u) = cli.command else {
            panic!()
        };
        assert!(u.force);
        assert_eq!(u.model, "gemma");
        assert_eq!(u.daemon.url.as_deref(), Some("http://h:1/"));

        let cli =
            Cli::try_parse_from(["llmvisor", "logs", "m", "-f", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert!(matches!(
            cli.command,
            Command::Logs(LogsArgs { follow: true, .. })
        ));

        let cli = Cli::try_parse_from(["llmvisor", "gc", "--dry-run"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Gc(GcArgs { dry_run: true, .. })
        ));
        assert!(Cli::try_parse_from(["llmvisor", "check"]).is_err());
    }

    #[test]
    fn log_levels() {
        assert!(log_filter(Some("debug"), None, "warn").is_ok());
        assert!(log_filter(Some("WARN"), None, "warn").is_ok());
        assert!(log_filter(Some("llmvisor=trace,hyper=off"), None, "warn").is_ok());
        let err = log_filter(Some("verbose"), None, "warn").unwrap_err();
        assert!(err.to_string().contains("invalid --log-level `verbose`"));
        // A broken RUST_LOG falls back to the default instead of failing the command.
        assert!(log_filter(None, Some("=[["), "info").is_ok());
        assert_eq!(log_filter(None, None, "info").unwrap().to_string(), "info");
        assert_eq!(
            log_filter(None, Some("debug"), "info").unwrap().to_string(),
            "debug"
        );
    }

    #[test]
    fn error_chains_are_joined_without_repeats() {
        let inner = std::io::Error::other("connection reset");
        let err = anyhow::Error::new(inner).context("reading the answer");
        assert_eq!(error_chain(&err), "reading the answer: connection reset");
        let err = anyhow::anyhow!("a: b").context("c");
        assert_eq!(error_chain(&err), "c: a: b");
    }

    #[test]
    fn where_a_model_runs() {
        let mut m = ModelInfo {
            id: "g".into(),
            pid: Some(12),
            url: Some("http://127.0.0.1:10500".into()),
            ..ModelInfo::default()
        };
        assert_eq!(where_it_runs(&m), " (pid 12, http://127.0.0.1:10500)");
        m.url = None;
        assert_eq!(where_it_runs(&m), " (pid 12)");
        m.pid = None;
        assert_eq!(where_it_runs(&m), "");
    }

    #[test]
    fn model_paths_are_encoded() {
        assert_eq!(model_path("a/b", "/load"), "/api/models/a%2Fb/load");
        assert_eq!(model_path("gemma", ""), "/api/models/gemma");
    }
}
