//! Durations (`"250ms"`, `"30s"`, `"10m"`, `"1h"`, bare seconds) and sizes (`"400MiB"`, `"1.5GiB"`,
//! bare bytes), parsed exactly (decimal fractions are not rounded through floating point).

use std::time::Duration;

/// The accepted forms of a duration, for help messages.
pub const DURATION_FORMS: &str = "write a duration as \"250ms\", \"30s\", \"10m\", \"1h\", \
     or a bare number of seconds (e.g. 30 or 1.5)";

/// The accepted forms of a size, for help messages.
pub const SIZE_FORMS: &str = "write a size as a bare number of bytes, or a number with a unit: \
     B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), \
     e.g. \"400MiB\" or \"1.5GiB\"";

const NS_PER_SEC: u128 = 1_000_000_000;

/// The longest duration a config may give: one year (365 days). Longer values are refused, so
/// that no deadline computed from a configured duration (`Instant::now() + ttl`) can overflow —
/// an `Instant` plus a year is far inside its range. `0` still means "never" where a key says so.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The reason given for a duration over [`MAX_DURATION`].
fn too_long() -> String {
    "it is too large: the longest duration allowed is 8760h (365 days)".to_string()
}

/// Parses a duration: `"250ms"`, `"30s"`, `"10m"`, `"1h"`, or a bare (integer or decimal) number of
/// seconds such as `"30"` or `"1.5"`. A number may have a fraction with any unit (`"1.5h"`) and be
/// separated from its unit by spaces. Units are lower-case. Negative durations are refused.
///
/// The error is a complete sentence naming the input and the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    duration(s).map_err(|reason| format!("invalid duration {s:?}: {reason}; {DURATION_FORMS}"))
}

/// Parses a size in bytes: a bare integer (`"1024"`), or a number (fraction allowed) followed by
/// an optional space and a case-insensitive unit: `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000),
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024). Fractions of a byte are truncated.
///
/// The error is a complete sentence naming the input and the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    size(s).map_err(|reason| format!("invalid size {s:?}: {reason}; {SIZE_FORMS}"))
}

/// Like [`parse_duration`], but the error is only the reason (for diagnostics with a help line).
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("it is empty".into());
    }
    if t.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    let (num, unit) = split_number(t);
    if num.is_empty() {
        return Err("it does not start with a number".into());
    }
    let scale: u128 = match unit {
        "" | "s" => NS_PER_SEC,
        "ms" => 1_000_000,
        "m" => 60 * NS_PER_SEC,
        "h" => 3600 * NS_PER_SEC,
        other => return Err(format!("unknown unit `{other}`")),
    };
    let ns = decimal_scaled(num, scale).map_err(|e| if e == TOO_LARGE { too_long() } else { e })?;
    nanos_to_duration(ns)
}

/// A TOML float as a duration in seconds (exact decimal, like the string form).
pub(crate) fn duration_from_f64(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() {
        return Err("it is not a finite number".into());
    }
    if secs < 0.0 {
        return Err("a duration cannot be negative".into());
    }
    // `Display` of an f64 never uses an exponent, and is the shortest exact round-trip form.
    let ns = decimal_scaled(&format!("{secs}"), NS_PER_SEC).map_err(|e| {
        if e == TOO_LARGE {
            too_long()
        } else {
            e
        }
    })?;
    nanos_to_duration(ns)
}

/// Like [`parse_size`], but the error is only the reason (for diagnostics with a help line).
pub(crate) fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("it is empty".into());
    }
    if t.starts_with('-') {
        return Err("a size cannot be negative".into());
    }
    let (num, unit) = split_number(t);
    if num.is_empty() {
        return Err("it does not start with a number".into());
    }
    let scale: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "m" | "g" | "t" => {
            let u = unit.to_ascii_uppercase();
            return Err(format!(
                "unit `{unit}` is ambiguous: write {u}B (powers of 1000) or {u}iB (powers of 1024)"
            ));
        }
        _ => return Err(format!("unknown unit `{unit}`")),
    };
    if scale == 1 {
        if let Some((_, frac)) = num.split_once('.') {
            if frac.bytes().any(|b| b != b'0') {
                return Err("a number of bytes must be whole".into());
            }
        }
    }
    let bytes = decimal_scaled(num, scale)?;
    u64::try_from(bytes).map_err(|_| TOO_LARGE.to_string())
}

/// Splits `"1.5 GiB"` into `("1.5", "GiB")`: the leading run of digits and dots, then the rest
/// with leading spaces removed.
fn split_number(t: &str) -> (&str, &str) {
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    (&t[..end], t[end..].trim_start())
}

const TOO_LARGE: &str = "it is too large";

/// `num` (`DIGITS` or `DIGITS.DIGITS`) times `scale`, truncated to an integer, computed exactly.
fn decimal_scaled(num: &str, scale: u128) -> Result<u128, String> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) {
        return Err(format!("`{num}` is not a number"));
    }
    let too_large = || TOO_LARGE.to_string();
    let int: u128 = int.parse().map_err(|_| too_large())?;
    let mut value = int.checked_mul(scale).ok_or_else(too_large)?;
    if let Some(frac) = frac {
        // 20 digits keep `frac * scale` far below u128::MAX for every scale used here.
        let frac = &frac[..frac.len().min(20)];
        let f: u128 = frac.parse().map_err(|_| too_large())?;
        let denom = 10u128.pow(frac.len() as u32);
        value = value.checked_add(f * scale / denom).ok_or_else(too_large)?;
    }
    Ok(value)
}

/// A whole number of seconds (a TOML integer) as a duration, capped like every other form.
pub(crate) fn duration_from_secs(secs: i64) -> Result<Duration, String> {
    let secs = u64::try_from(secs).map_err(|_| "a duration cannot be negative".to_string())?;
    capped(Duration::from_secs(secs))
}

fn nanos_to_duration(ns: u128) -> Result<Duration, String> {
    let secs = u64::try_from(ns / NS_PER_SEC).map_err(|_| too_long())?;
    capped(Duration::new(secs, (ns % NS_PER_SEC) as u32))
}

fn capped(d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        Err(too_long())
    } else {
        Ok(d)
    }
}
