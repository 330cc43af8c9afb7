//! Macros in `cmd`, `env` values and `cwd`: `${PORT}`, `${SOCKET}`, `${MODEL_ID}`, `${env.NAME}`.
//!
//! `$` not followed by `{` is literal (and `$$` is not special); there is no escape for a literal
//! `${`. Expanded values are inserted as they are: they are never scanned for macros again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;

use super::diagnostic::closest;
use super::{MacroValues, ModelConfig};

/// The known macros, for help messages.
pub const KNOWN_MACROS: &str = "${PORT}, ${SOCKET}, ${MODEL_ID}, ${env.NAME}";

/// Why a template could not be expanded for one start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("${{PORT}} cannot be expanded: this start has no port (the model is reached over a unix socket)")]
    NoPort,
    #[error("${{SOCKET}} cannot be expanded: this start has no unix socket path (the model is reached over TCP)")]
    NoSocket,
    #[error("${{SOCKET}} cannot be expanded: the socket path {} is not valid UTF-8", .0.display())]
    SocketNotUtf8(PathBuf),
    #[error("${{env.{0}}} cannot be expanded: environment variable {0} is not set in llmvisor's environment")]
    EnvNotSet(String),
    /// The template itself is malformed (never the case for templates from a validated config).
    #[error("invalid template {template:?}: {message}")]
    Invalid { template: String, message: String },
}

/// Replaces the macros of `template` with `values` and, for `${env.NAME}`, with `env_lookup(NAME)`
/// (normally [`process_env`]).
pub fn expand(
    template: &str,
    values: &MacroValues<'_>,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let pieces = scan(template).map_err(|e| ExpandError::Invalid {
        template: template.to_string(),
        message: e.message,
    })?;
    let mut out = String::with_capacity(template.len() + 16);
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Macro { name, .. } => match name {
                Macro::Port => {
                    let port = values.port.ok_or(ExpandError::NoPort)?;
                    let _ = write!(out, "{port}");
                }
                Macro::Socket => {
                    let path = values.socket.ok_or(ExpandError::NoSocket)?;
                    let s = path
                        .to_str()
                        .ok_or_else(|| ExpandError::SocketNotUtf8(path.to_path_buf()))?;
                    out.push_str(s);
                }
                Macro::ModelId => out.push_str(values.model_id),
                Macro::Env(var) => {
                    let v = env_lookup(var).ok_or_else(|| ExpandError::EnvNotSet(var.into()))?;
                    out.push_str(&v);
                }
            },
        }
    }
    Ok(out)
}

/// llmvisor's own environment, as an `env_lookup` for [`expand`] (a variable whose value is not
/// UTF-8 counts as unset).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A model's templates, expanded for one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandedCommand {
    /// Never empty; `argv[0]` is the program.
    pub argv: Vec<String>,
    /// The variables of the config's `env` (to be added to llmvisor's environment).
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

impl ModelConfig {
    /// Expands `cmd`, `env` and `cwd` for one start (see [`expand`]).
    pub fn expand(
        &self,
        values: &MacroValues<'_>,
        env_lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ExpandedCommand, ExpandError> {
        let argv = self
            .cmd
            .iter()
            .map(|t| expand(t, values, env_lookup))
            .collect::<Result<Vec<_>, _>>()?;
        let env = self
            .env
            .iter()
            .map(|(k, t)| Ok((k.clone(), expand(t, values, env_lookup)?)))
            .collect::<Result<BTreeMap<_, _>, ExpandError>>()?;
        let cwd = match &self.cwd {
            Some(t) => Some(expand(t, values, env_lookup)?),
            None => None,
        };
        Ok(ExpandedCommand { argv, env, cwd })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Macro<'a> {
    Port,
    Socket,
    ModelId,
    Env(&'a str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Text(&'a str),
    /// `range` is the byte range of `${...}` in the template.
    Macro {
        name: Macro<'a>,
        range: Range<usize>,
    },
}

/// A malformed macro at byte `offset` of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MacroError {
    pub offset: usize,
    pub message: String,
    pub help: String,
}

/// Splits a template into literal text and macros; the first malformed macro is an error.
pub(crate) fn scan(t: &str) -> Result<Vec<Piece<'_>>, MacroError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(rel) = t[pos..].find("${") {
        let start = pos + rel;
        if start > pos {
            out.push(Piece::Text(&t[pos..start]));
        }
        let inner_start = start + 2;
        let Some(close) = t[inner_start..].find('}') else {
            return Err(MacroError {
                offset: start,
                message: "unterminated macro `${`".into(),
                help: format!("a macro ends with `}}`; known macros: {KNOWN_MACROS}"),
            });
        };
        let end = inner_start + close + 1;
        let inner = &t[inner_start..end - 1];
        let name = classify(inner).map_err(|(message, help)| MacroError {
            offset: start,
            message,
            help,
        })?;
        out.push(Piece::Macro {
            name,
            range: start..end,
        });
        pos = end;
    }
    if pos < t.len() {
        out.push(Piece::Text(&t[pos..]));
    }
    Ok(out)
}

fn classify(inner: &str) -> Result<Macro<'_>, (String, String)> {
    match inner {
        "PORT" => return Ok(Macro::Port),
        "SOCKET" => return Ok(Macro::Socket),
        "MODEL_ID" => return Ok(Macro::ModelId),
        _ => {}
    }
    let known = format!("known macros: {KNOWN_MACROS}");
    if let Some(var) = inner.strip_prefix("env.") {
        if is_env_name(var) {
            return Ok(Macro::Env(var));
        }
        return Err((
            format!("invalid macro `${{{inner}}}`"),
            format!(
                "`{var}` is not an environment variable name: a name is letters, digits and `_`, \
                 and does not start with a digit"
            ),
        ));
    }
    let hint = if let Some(m) = closest(inner.trim(), ["PORT", "SOCKET", "MODEL_ID"]) {
        format!("did you mean `${{{m}}}`? {known}")
    } else if is_env_name(inner) {
        format!("to use an environment variable, write `${{env.{inner}}}`; {known}")
    } else if let Some(var) = inner
        .strip_prefix("ENV.")
        .or_else(|| inner.strip_prefix("env:"))
        .or_else(|| inner.strip_prefix("ENV:"))
        .filter(|v| is_env_name(v))
    {
        format!("did you mean `${{env.{var}}}`? {known}")
    } else {
        known
    };
    Err((format!("unknown macro `${{{inner}}}`"), hint))
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub(crate) fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
