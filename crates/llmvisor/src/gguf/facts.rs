//! The facts of a model read from its metadata under llama.cpp's key names
//! (`{arch}.block_count`, `{arch}.attention.head_count_kv`, …, see llama.cpp's src/llama-arch.cpp).

use super::{Gguf, Value};

/// A hyper-parameter given once for all layers or once per layer (head counts may be per-layer
/// arrays, as in OpenELM or models with layers of no attention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PerLayer {
    All(u64),
    Each(Vec<u64>),
}

impl PerLayer {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Array(items) => items
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()
                .map(Self::Each),
            v => v.as_u64().map(Self::All),
        }
    }

    /// The value for layer `il` (an array too short for it: 0).
    pub fn at(&self, il: usize) -> u64 {
        match self {
            Self::All(v) => *v,
            Self::Each(v) => v.get(il).copied().unwrap_or(0),
        }
    }

    pub fn max(&self) -> u64 {
        match self {
            Self::All(v) => *v,
            Self::Each(v) => v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// The sliding-window pattern llama.cpp uses for an architecture whose file gives none: every
/// `n`th layer is full attention, the others sliding (`dense_first`: the first of each `n` is
/// full rather than the last). From llama.cpp's src/models/*.cpp `load_swa_pattern` calls.
fn default_swa_pattern(arch: &str) -> Option<(u64, bool)> {
    Some(match arch {
        "gemma3" | "gemma-embedding" => (6, false),
        "gemma3n" => (5, false),
        "gemma2" | "gpt-oss" => (2, false),
        "cohere2" | "exaone4" | "olmo2" | "afmoe" | "exaone-moe" => (4, false),
        "smallthinker" | "cohere2moe" => (4, true),
        "modern-bert" => (3, true),
        "plamo3" => (8, false),
        _ => return None,
    })
}

impl Gguf {
    /// `general.architecture` ("llama", "gemma3", …).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    fn arch_key(&self, suffix: &str) -> Option<&Value> {
        self.get(&format!("{}.{suffix}", self.architecture()?))
    }

    fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.arch_key(suffix)?.as_u64()
    }

    pub fn block_count(&self) -> Option<u64> {
        self.arch_u64("block_count")
    }

    /// The context the model was trained for (what `-c 0` means).
    pub fn context_length(&self) -> Option<u64> {
        self.arch_u64("context_length")
    }

    pub fn embedding_length(&self) -> Option<u64> {
        self.arch_u64("embedding_length")
    }

    pub fn head_count(&self) -> Option<PerLayer> {
        PerLayer::from_value(self.arch_key("attention.head_count")?)
    }

    /// KV heads; absent means as many as query heads (no grouped-query attention).
    pub fn head_count_kv(&self) -> Option<PerLayer> {
        self.arch_key("attention.head_count_kv")
            .and_then(PerLayer::from_value)
            .or_else(|| self.head_count())
    }

    /// Size of one key head; absent means embedding_length / head_count.
    pub fn key_length(&self) -> Option<u64> {
        self.arch_u64("attention.key_length")
            .or_else(|| self.default_head_size())
    }

    pub fn value_length(&self) -> Option<u64> {
        self.arch_u64("attention.value_length")
            .or_else(|| self.default_head_size())
    }

    fn default_head_size(&self) -> Option<u64> {
        let heads = self.head_count()?.max();
        (heads > 0).then(|| self.embedding_length().map(|e| e / heads))?
    }

    /// Tokens a sliding-window layer attends to (`None`: no sliding window).
    pub fn sliding_window(&self) -> Option<u64> {
        self.arch_u64("attention.sliding_window").filter(|&w| w > 0)
    }

    /// For each layer, whether it is a sliding-window layer: from the file's
    /// `attention.sliding_window_pattern` (an array of bools, or every Nth layer full), else
    /// llama.cpp's default for the architecture; all false without a sliding window, or for an
    /// architecture whose pattern is not known (counting full layers over-estimates, never under).
    pub fn swa_layers(&self) -> Vec<bool> {
        let n = self.block_count().unwrap_or(0).min(1 << 16) as usize;
        if self.sliding_window().is_none() {
            return vec![false; n];
        }
        let pattern = self.arch_key("attention.sliding_window_pattern");
        if let Some(items) = pattern.and_then(Value::as_array) {
            return (0..n)
                .map(|il| {
                    items
                        .get(il)
                        .and_then(Value::as_u64)
                        .is_some_and(|b| b != 0)
                })
                .collect();
        }
        let (every, dense_first) = match pattern.and_then(Value::as_u64) {
            Some(p) => (p, false),
            None => match self.architecture().and_then(default_swa_pattern) {
                Some(d) => d,
                None => return vec![false; n],
            },
        };
        (0..n as u64)
            .map(|il| match (every, dense_first) {
                (0, _) => true,
                (p, true) => il % p != 0,
                (p, false) => il % p < p - 1,
            })
            .collect()
    }

    pub fn expert_count(&self) -> Option<u64> {
        self.arch_u64("expert_count").filter(|&n| n > 0)
    }

    pub fn expert_used_count(&self) -> Option<u64> {
        self.arch_u64("expert_used_count").filter(|&n| n > 0)
    }

    /// `general.file_type`: llama.cpp's LLAMA_FTYPE (15 = Q4_K_M, 3 = Q4_1, …).
    pub fn file_type(&self) -> Option<u64> {
        self.get_u64("general.file_type")
    }

    pub fn name(&self) -> Option<&str> {
        self.get_str("general.name")
    }

    /// `general.size_label` ("135M", "8x7B").
    pub fn size_label(&self) -> Option<&str> {
        self.get_str("general.size_label")
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.get_str("tokenizer.chat_template")
    }

    /// `{arch}.pooling_type` (set by embedding models: 1 mean, 2 cls, 3 last, 4 rank).
    pub fn pooling_type(&self) -> Option<u64> {
        self.arch_u64("pooling_type")
    }

    /// A multimodal projector (`--mmproj`) rather than a language model.
    pub fn is_mmproj(&self) -> bool {
        self.architecture() == Some("clip") || self.get_str("general.type") == Some("mmproj")
    }

    /// Bytes of the tensors of each layer (index = layer) and of those in no layer.
    pub fn bytes_by_layer(&self) -> (Vec<u64>, u64) {
        let n = self.block_count().unwrap_or(0).min(1 << 16) as usize;
        let mut layers = vec![0u64; n];
        let mut other = 0;
        for t in &self.tensors {
            match t.layer.map(|l| l as usize).filter(|&l| l < n) {
                Some(l) => layers[l] += t.bytes,
                None => other += t.bytes,
            }
        }
        (layers, other)
    }
}
