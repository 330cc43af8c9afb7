//! `llmvisor ps`: the models of `GET /api/models` as an aligned table.

use serde::Deserialize;

/// One model as `GET /api/models` describes it (SPEC.md). Lenient: a field the daemon leaves out
/// takes its empty value, and fields this version does not know are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ModelInfo {
    pub id: String,
    pub aliases: Vec<String>,
    pub state: String,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub url: Option<String>,
    pub leases: u64,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub ready_ms: Option<u64>,
    pub error: Option<String>,
    /// Bytes the memory budget counts (declared, estimated or measured).
    pub memory: Option<u64>,
    /// What the budget's figure is: "declared", "estimated", "measured", "learned", "unknown".
    pub memory_source: Option<String>,
    /// The estimate and the measurement side by side (`memory_detail`).
    pub memory_detail: MemoryDetailInfo,
    /// The GPUs it runs on (`[]` on the CPU).
    pub gpus: Vec<u32>,
    /// Fleet mode: the node whose server this describes.
    pub node: Option<String>,
    /// Requests finished in the last minute (from `GET /api/activity`; None: not asked).
    #[serde(skip)]
    pub requests_per_min: Option<u64>,
    /// Generation speed of the last request that reported it (`GET /api/activity`).
    #[serde(skip)]
    pub last_tokens_per_s: Option<f64>,
}

/// The parts of `memory_detail` that `ps` shows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MemoryDetailInfo {
    pub estimate: Option<EstimateInfo>,
    pub measured: Option<MeasuredInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EstimateInfo {
    pub total: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MeasuredInfo {
    pub ram: u64,
}

/// Longest ERROR cell, in characters.
const MAX_ERROR_CHARS: usize = 100;

/// The table `llmvisor ps` prints: a header and one line per model, columns left-aligned and
/// separated by at least two spaces, no trailing whitespace. ERROR is there only when some model
/// has one.
pub fn render(models: &[ModelInfo]) -> String {
    let with_error = models.iter().any(|m| error_cell(m).is_some());
    // NODE only in fleet mode, where the daemon names the node; activity columns only when the
    // daemon reported activity (older daemons do not).
    let with_node = models.iter().any(|m| m.node.is_some());
    let with_activity = models.iter().any(|m| m.requests_per_min.is_some());
    // Estimate vs measured only when the daemon reports them; GPU only when a model has one.
    let with_detail = models
        .iter()
        .any(|m| m.memory_detail.estimate.is_some() || m.memory_detail.measured.is_some());
    let with_gpu = models.iter().any(|m| !m.gpus.is_empty());
    let mut header = vec![
        "MODEL", "STATE", "PID", "PORT", "LEASES", "RESTARTS", "READY", "MEMORY",
    ];
    if with_detail {
        header.extend(["ESTIMATE", "MEASURED"]);
    }
    if with_gpu {
        header.push("GPU");
    }
    if with_node {
        header.insert(1, "NODE");
    }
    if with_activity {
        header.extend(["REQ/MIN", "TOK/S"]);
    }
    if with_error {
        header.push("ERROR");
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for m in models {
        let mut row = vec![
            m.id.clone(),
            if m.state.is_empty() {
                "-".to_string()
            } else {
                m.state.clone()
            },
            opt(m.pid),
            opt(m.port),
            m.leases.to_string(),
            m.restarts.to_string(),
            m.ready_ms.map_or_else(|| "-".to_string(), format_ms),
            m.memory
                .map_or_else(|| "-".to_string(), crate::units::format_size_column),
        ];
        if with_detail {
            let d = &m.memory_detail;
            let size = |b: Option<u64>| {
                b.map_or_else(|| "-".to_string(), crate::units::format_size_column)
            };
            row.push(size(d.estimate.as_ref().map(|e| e.total)));
            row.push(size(d.measured.as_ref().map(|e| e.ram)));
        }
        if with_gpu {
            let gpus: Vec<String> = m.gpus.iter().map(u32::to_string).collect();
            row.push(if gpus.is_empty() {
                "-".to_string()
            } else {
                gpus.join(",")
            });
        }
        if with_node {
            row.insert(1, m.node.clone().unwrap_or_else(|| "-".to_string()));
        }
        if with_activity {
            row.push(opt(m.requests_per_min));
            row.push(
                m.last_tokens_per_s
                    .map_or_else(|| "-".to_string(), |t| format!("{t:.1}")),
            );
        }
        if with_error {
            row.push(error_cell(m).unwrap_or_else(|| "-".to_string()));
        }
        rows.push(row);
    }
    align(&rows)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub(super) fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < columns {
                let pad = widths[c] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

use crate::units::format_ms;

/// A model's error on one line: its first non-empty line, cut at [`MAX_ERROR_CHARS`], with `…`
/// when anything was left out.
fn error_cell(m: &ModelInfo) -> Option<String> {
    let err = m.error.as_deref()?.trim();
    if err.is_empty() {
        return None;
    }
    let mut lines = err.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("");
    let more_lines = lines.next().is_some();
    let mut cell: String = first
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect();
    if more_lines || first.chars().count() > MAX_ERROR_CHARS {
        cell.push('…');
    }
    Some(cell)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str, state: &str) -> ModelInfo {
        ModelInfo {
            id: id.into(),
            state: state.into(),
            ..ModelInfo::default()
        }
    }

    #[test]
    fn estimate_measured_and_gpu_columns_appear_when_the_daemon_reports_them() {
        let mut a = model("a", "ready");
        a.memory = Some(300 << 20);
        a.memory_detail.estimate = Some(EstimateInfo { total: 315 << 20 });
        a.memory_detail.measured = Some(MeasuredInfo { ram: 300 << 20 });
        a.gpus = vec![0, 1];
        let b = model("b", "stopped");
        assert_eq!(
            render(&[a, b]),
            "\
MODEL  STATE    PID  PORT  LEASES  RESTARTS  READY  MEMORY     ESTIMATE   MEASURED   GPU
a      ready    -    -     0       0         -      300.0 MiB  315.0 MiB  300.0 MiB  0,1
b      stopped  -    -     0       0         -      -          -          -          -
"
        );
    }

    #[test]
    fn columns_are_aligned_and_missing_values_are_dashes() {
        let mut gemma = model("gemma-3-270m", "ready");
        gemma.pid = Some(12345);
        gemma.port = Some(10500);
        gemma.leases = 2;
        gemma.restarts = 1;
        gemma.ready_ms = Some(1340);
        gemma.memory = Some(470 * 1024 * 1024);
        let qwen = model("qwen", "stopped");
        let table = render(&[gemma, qwen]);
        assert_eq!(
            table,
            "\
MODEL         STATE    PID    PORT   LEASES  RESTARTS  READY  MEMORY
gemma-3-270m  ready    12345  10500  2       1         1.3s   470.0 MiB
qwen          stopped  -      -      0       0         -      -
"
        );
    }

    #[test]
    fn the_error_column_appears_only_when_needed_and_stays_on_one_line() {
        let mut bad = model("bad", "failed");
        bad.error = Some("server exited during start (exit code 1)\nlast output:\nboom".into());
        let table = render(&[model("ok", "stopped"), bad]);
        assert_eq!(
            table,
            "\
MODEL  STATE    PID  PORT  LEASES  RESTARTS  READY  MEMORY  ERROR
ok     stopped  -    -     0       0         -      -       -
bad    failed   -    -     0       0         -      -       server exited during start (exit code 1)…
"
        );
        assert!(!render(&[model("ok", "stopped")]).contains("ERROR"));
    }

    #[test]
    fn fleet_mode_adds_a_node_column() {
        let mut a = model("a", "ready");
        a.node = Some("box-a".into());
        let table = render(&[a, model("b", "stopped")]);
        assert_eq!(
            table,
            "\
MODEL  NODE   STATE    PID  PORT  LEASES  RESTARTS  READY  MEMORY
a      box-a  ready    -    -     0       0         -      -
b      -      stopped  -    -     0       0         -      -
"
        );
    }

    #[test]
    fn long_errors_are_cut() {
        let mut bad = model("bad", "failed");
        bad.error = Some("x".repeat(500));
        let table = render(&[bad]);
        let line = table.lines().nth(1).unwrap();
        assert!(line.ends_with(&format!("{}…", "x".repeat(MAX_ERROR_CHARS))));
    }

    #[test]
    fn wide_characters_count_once() {
        let table = render(&[model("é", "ready"), model("ab", "ready")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[1],
            "é      ready  -    -     0       0         -      -"
        );
        assert_eq!(
            lines[2],
            "ab     ready  -    -     0       0         -      -"
        );
    }

    #[test]
    fn activity_columns_appear_when_the_daemon_reports_activity() {
        let mut a = model("a", "ready");
        a.requests_per_min = Some(12);
        a.last_tokens_per_s = Some(41.25);
        let mut b = model("b", "stopped");
        b.requests_per_min = Some(0);
        assert_eq!(
            render(&[a, b]),
            "\
MODEL  STATE    PID  PORT  LEASES  RESTARTS  READY  MEMORY  REQ/MIN  TOK/S
a      ready    -    -     0       0         -      -       12       41.2
b      stopped  -    -     0       0         -      -       0        -
"
        );
    }

    #[test]
    fn an_empty_list_is_just_the_header() {
        assert_eq!(
            render(&[]),
            "MODEL  STATE  PID  PORT  LEASES  RESTARTS  READY  MEMORY\n"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(format_ms(0), "0.0s");
        assert_eq!(format_ms(49), "0.0s");
        assert_eq!(format_ms(50), "0.1s");
        assert_eq!(format_ms(1300), "1.3s");
        assert_eq!(format_ms(1349), "1.3s");
        assert_eq!(format_ms(59_949), "59.9s");
        assert_eq!(format_ms(59_950), "1m00s");
        assert_eq!(format_ms(125_000), "2m05s");
        assert_eq!(format_ms(3_720_000), "1h02m");
    }

    #[test]
    fn status_json_parses_leniently() {
        let json = r#"[{"id":"a","aliases":["x"],"state":"ready","pid":7,"port":10500,
            "url":"http://127.0.0.1:10500","leases":1,"restarts":0,"last_exit":null,
            "ready_ms":900,"error":null,"something_new":true},{"id":"b"}]"#;
        let models: Vec<ModelInfo> = serde_json::from_str(json).unwrap();
        assert_eq!(models[0].pid, Some(7));
        assert_eq!(models[0].url.as_deref(), Some("http://127.0.0.1:10500"));
        assert_eq!(models[1].state, "");
    }
}
