//! Config errors with a position: `FILE:LINE:COL: error: MESSAGE` plus an optional help line.

use std::fmt;

use strsim::osa_distance;

/// One problem found in a config file.
///
/// `line` and `col` are 1-based (`col` counts characters, not bytes). A diagnostic that has no
/// position in the file (the file cannot be read, or no default can be computed) has `line == 0`
/// and `col == 0`, and is displayed as `FILE: error: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The config's path, or `"<config>"` when it was parsed from a string without one.
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic without a position in the file (`line == col == 0`).
    pub fn without_position(
        file: impl Into<String>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            col: 0,
            message: message.into(),
            help,
        }
    }

    /// True when `line`/`col` point into the file.
    pub fn has_position(&self) -> bool {
        self.line > 0
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.has_position() {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file, self.line, self.col, self.message
            )?;
        } else {
            write!(f, "{}: error: {}", self.file, self.message)?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a config: never empty.
///
/// Displayed as one diagnostic after another, each on its own line(s), in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct ConfigErrors {
    diagnostics: Vec<Diagnostic>,
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// One error.
    pub fn new(first: Diagnostic) -> Self {
        ConfigErrors {
            diagnostics: vec![first],
        }
    }

    /// `None` when `diagnostics` is empty.
    pub fn from_vec(diagnostics: Vec<Diagnostic>) -> Option<Self> {
        if diagnostics.is_empty() {
            None
        } else {
            Some(ConfigErrors { diagnostics })
        }
    }

    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.diagnostics
    }

    /// The first diagnostic (there always is one).
    pub fn first(&self) -> &Diagnostic {
        &self.diagnostics[0]
    }

    pub fn len(&self) -> usize {
        self.diagnostics.len()
    }

    /// Always false; here for the sake of `len`.
    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.diagnostics.iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.diagnostics.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.diagnostics.into_iter()
    }
}

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(src.len());
    while !src.is_char_boundary(off) {
        off -= 1;
    }
    let before = &src[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = src[line_start..off].chars().count() + 1;
    (line, col)
}

/// The candidate closest to `word` if it is close enough to be a likely typo: within an optimal
/// string alignment distance (Levenshtein plus adjacent transpositions) that grows with the
/// length, or a prefix of at least three characters.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let w = word.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for cand in candidates {
        let c = cand.to_lowercase();
        let d = osa_distance(&w, &c);
        let longest = w.chars().count().max(c.chars().count());
        let limit = match longest {
            0..=3 => 1,
            4..=6 => 2,
            _ => 3,
        };
        let prefix =
            w.chars().count() >= 3 && (c.starts_with(&w) || w.starts_with(&c)) && !c.is_empty();
        if d <= limit || prefix {
            let score = if prefix { d.min(limit) } else { d };
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, cand));
            }
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(osa_distance("tll", "ttl"), 1);
        assert_eq!(osa_distance("ab", "ba"), 1);
        assert_eq!(osa_distance("", "abc"), 3);
        assert_eq!(closest("tll", ["cmd", "ttl", "port"]), Some("ttl"));
        assert_eq!(closest("alias", ["aliases", "env"]), Some("aliases"));
        assert_eq!(closest("zzz", ["cmd", "ttl"]), None);
    }

    #[test]
    fn positions() {
        let s = "ab\ncdé f\n";
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 3), (2, 1));
        assert_eq!(line_col(s, 8), (2, 5)); // after the 2-byte é
        assert_eq!(line_col(s, 100), (3, 1));
    }
}
