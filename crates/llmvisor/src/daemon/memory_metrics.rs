//! `llmvisor_model_memory_bytes{model,device,kind}` of `GET /metrics`: per model and device
//! (`ram`, `gpu0`, `gpu1`, …) what the estimate says (`kind="estimate"`), what the running
//! server measures (`kind="measured"`: PSS of its process group, and each GPU's figure), and what
//! the memory budget counts (`kind="counted"`, device `ram`).

use std::fmt::Write;

use crate::metrics::label;
use crate::supervisor::MemoryDetail;

pub const NAME: &str = "llmvisor_model_memory_bytes";

/// One model's figures: its id, what the budget counts, its memory detail.
pub struct ModelMemory<'a> {
    pub id: &'a str,
    pub counted: Option<u64>,
    pub detail: &'a MemoryDetail,
}

pub fn render<'a>(out: &mut String, models: impl IntoIterator<Item = ModelMemory<'a>>) {
    let _ = writeln!(
        out,
        "# HELP {NAME} Memory per model and device: kind=\"estimate\" (from the GGUF and the command), \"measured\" (the running server), \"counted\" (what the memory budget counts).\n# TYPE {NAME} gauge"
    );
    for m in models {
        let model = label(m.id);
        let mut line = |device: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "{NAME}{{model=\"{model}\",device=\"{device}\",kind=\"{kind}\"}} {v}"
            );
        };
        line("ram", "counted", m.counted.unwrap_or(0));
        if let Some(e) = &m.detail.estimate {
            line("ram", "estimate", e.total);
            for (gpu, b) in &e.gpu {
                line(&format!("gpu{gpu}"), "estimate", *b);
            }
        }
        if let Some(measured) = &m.detail.measured {
            line("ram", "measured", measured.ram);
            for (gpu, b) in &measured.gpu {
                line(&format!("gpu{gpu}"), "measured", *b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::Estimate;
    use crate::supervisor::Measured;

    #[test]
    fn one_line_per_device_and_kind() {
        let estimate = Estimate {
            weights: 600,
            kv_cache: 200,
            compute: 100,
            overhead: 100,
            total: 1000,
            gpu: [(0, 5000), (1, 3000)].into(),
            ctx: 2048,
            shape: String::new(),
            file: Default::default(),
        };
        let running = MemoryDetail {
            estimate: Some(estimate),
            measured: Some(Measured {
                ram: 1100,
                gpu: [(1, 3300)].into(),
                buffers: Default::default(),
            }),
            learned: None,
        };
        let stopped = MemoryDetail {
            estimate: None,
            measured: None,
            learned: Some(9),
        };
        let mut out = String::new();
        render(
            &mut out,
            [
                ModelMemory {
                    id: "a\"b",
                    counted: Some(1100),
                    detail: &running,
                },
                ModelMemory {
                    id: "c",
                    counted: None,
                    detail: &stopped,
                },
            ],
        );
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                r#"llmvisor_model_memory_bytes{model="a\"b",device="ram",kind="counted"} 1100"#,
                r#"llmvisor_model_memory_bytes{model="a\"b",device="ram",kind="estimate"} 1000"#,
                r#"llmvisor_model_memory_bytes{model="a\"b",device="gpu0",kind="estimate"} 5000"#,
                r#"llmvisor_model_memory_bytes{model="a\"b",device="gpu1",kind="estimate"} 3000"#,
                r#"llmvisor_model_memory_bytes{model="a\"b",device="ram",kind="measured"} 1100"#,
                r#"llmvisor_model_memory_bytes{model="a\"b",device="gpu1",kind="measured"} 3300"#,
                r#"llmvisor_model_memory_bytes{model="c",device="ram",kind="counted"} 0"#,
            ]
        );
        assert!(out.starts_with("# HELP llmvisor_model_memory_bytes "));
        assert!(out.contains("# TYPE llmvisor_model_memory_bytes gauge\n"));
    }
}
