//! Durations and sizes, both ways: every place that reads or writes one goes through here.
//!
//! Parsing: durations (`"250ms"`, `"30s"`, `"10m"`, `"1h"`, bare seconds) and sizes (`"400MiB"`,
//! `"1.5GiB"`, bare bytes), exactly (decimal fractions are not rounded through floating point).
//!
//! Formatting, in two forms:
//! * **exact**, for messages and logs: [`format_duration`] (`250ms`, `5s`, `1.5s`, `10m`, `1h`)
//!   and [`format_size`] (`512 B`, `400 MiB`, `1.5 GiB`): what is printed parses back to the same
//!   value (sizes to two decimals), in the form a config would write it;
//! * **column**, for tables and live readouts, fixed precision so that values line up and do not
//!   jitter: [`format_elapsed`] (`0.4s`, `59.9s`, `2m05s`, `1h02m`) and [`format_size_column`]
//!   (`512 B`, `470.0 MiB`).

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

/// `now + d`, never overflowing: a `d` beyond what an instant can hold (only a programmatic config
/// can carry one: the parser caps durations at [`MAX_DURATION`]) is taken as [`MAX_DURATION`],
/// which every monotonic clock holds with centuries to spare. Use it for every deadline computed
/// from a configured duration.
pub fn deadline(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now.checked_add(d).unwrap_or_else(|| now + MAX_DURATION)
}

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

// ----- formatting -------------------------------------------------------------------------------

/// Binary size units above bytes, each 1024 times the one before.
const SIZE_UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];

/// `bytes` in the largest binary unit it reaches (up to TiB): the value in that unit and the
/// unit's name; `None` below 1 KiB.
fn size_in_unit(bytes: u64) -> Option<(f64, &'static str)> {
    let mut value = bytes as f64;
    let mut unit = None;
    for u in SIZE_UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = Some(u);
    }
    unit.map(|u| (value, u))
}

/// A size for messages: `512 B`, `400 MiB`, `1.5 GiB`, `1.33 GiB` (at most two decimals, no
/// trailing zeros). Parses back with [`parse_size`].
pub fn format_size(bytes: u64) -> String {
    match size_in_unit(bytes) {
        None => format!("{bytes} B"),
        Some((value, unit)) => {
            let s = format!("{value:.2}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            format!("{s} {unit}")
        }
    }
}

/// A size for a table column: `512 B`, `470.0 MiB`, `1.5 GiB` (always one decimal above bytes).
#[cfg(any(feature = "daemon", test))] // the daemon and the CLI only
pub fn format_size_column(bytes: u64) -> String {
    match size_in_unit(bytes) {
        None => format!("{bytes} B"),
        Some((value, unit)) => format!("{value:.1} {unit}"),
    }
}

/// A duration for messages, exact and in the form a config would write it: `0s`, `250ms`, `5s`,
/// `1.5s`, `10m`, `1h`, `90m` — the largest of h, m, s that holds it whole, else milliseconds
/// below a second, else seconds with a fraction. Parses back with [`parse_duration`] to the same value.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    for (unit, scale) in [
        ("h", 3600 * NS_PER_SEC),
        ("m", 60 * NS_PER_SEC),
        ("s", NS_PER_SEC),
    ] {
        if ns % scale == 0 {
            return format!("{}{unit}", ns / scale);
        }
    }
    if ns < NS_PER_SEC && ns % 1_000_000 == 0 {
        return format!("{}ms", ns / 1_000_000);
    }
    let frac = format!("{:09}", ns % NS_PER_SEC);
    format!("{}.{}s", ns / NS_PER_SEC, frac.trim_end_matches('0'))
}

/// An elapsed time for a column or a live readout: `0.4s`, `1.3s`, `59.9s`, `2m05s`, `1h02m`
/// (tenths of a second below a minute, then whole seconds, then whole minutes; rounded).
pub fn format_elapsed(d: Duration) -> String {
    format_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// [`format_elapsed`] of a number of milliseconds.
pub fn format_ms(ms: u64) -> String {
    if ms < 60_000 {
        // One decimal, rounded; 59_960 ms would round to "60.0s", so show it as a minute.
        let tenths = (ms + 50) / 100;
        if tenths < 600 {
            return format!("{}.{}s", tenths / 10, tenths % 10);
        }
    }
    let secs = ms.saturating_add(500) / 1000;
    if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_never_overflows() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(deadline(now, Duration::MAX), now + MAX_DURATION);
    }

    #[test]
    fn durations_format_exactly_and_parse_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(5), "5s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(5400), "90m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(100), "0.0001s"),
            (Duration::from_nanos(1_000_000_001), "1.000000001s"),
            (MAX_DURATION, "8760h"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn sizes_format_in_two_forms() {
        for (bytes, exact, column) in [
            (0, "0 B", "0 B"),
            (512, "512 B", "512 B"),
            (1 << 30, "1 GiB", "1.0 GiB"),
            (3 << 29, "1.5 GiB", "1.5 GiB"),
            (470 << 20, "470 MiB", "470.0 MiB"),
            (10 << 30, "10 GiB", "10.0 GiB"),
            (5 << 40, "5 TiB", "5.0 TiB"),
        ] {
            assert_eq!(format_size(bytes), exact);
            assert_eq!(format_size_column(bytes), column);
            assert_eq!(parse_size(exact), Ok(bytes), "{exact}");
        }
        assert_eq!(format_size(u64::MAX), "16777216 TiB");
    }

    #[test]
    fn elapsed_times_read_as_a_column() {
        assert_eq!(format_elapsed(Duration::ZERO), "0.0s");
        assert_eq!(format_elapsed(Duration::from_millis(1349)), "1.3s");
        assert_eq!(format_elapsed(Duration::from_millis(59_950)), "1m00s");
        assert_eq!(format_elapsed(Duration::from_secs(3720)), "1h02m");
        assert_eq!(format_elapsed(Duration::MAX), format_ms(u64::MAX));
    }
}
