//! ggml tensor types: how many bytes a tensor of each type takes (block size and bytes per
//! block, as in ggml's type table, ggml/src/ggml.c and ggml-common.h).

/// Elements per block and bytes per block of ggml type `id`; `None` for ids that are unknown or
/// were removed from the format.
pub fn block_layout(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 => (1, 4),     // f32
        1 => (1, 2),     // f16
        2 => (32, 18),   // q4_0
        3 => (32, 20),   // q4_1
        6 => (32, 22),   // q5_0
        7 => (32, 24),   // q5_1
        8 => (32, 34),   // q8_0
        9 => (32, 36),   // q8_1
        10 => (256, 84), // q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        16 => (256, 66), // iq2_xxs
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18), // iq4_nl
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1), // i8
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8), // f64
        29 => (256, 56),
        30 => (1, 2), // bf16
        34 => (256, 54),
        35 => (256, 66),
        39 => (32, 17),  // mxfp4
        40 => (64, 36),  // nvfp4
        41 => (128, 18), // q1_0
        42 => (64, 18),  // q2_0
        _ => return None,
    })
}

/// ggml's name for type `id` (as llama-server prints it), or "type N".
pub fn type_name(id: u32) -> String {
    const NAMES: [&str; 43] = [
        "f32", "f16", "q4_0", "q4_1", "", "", "q5_0", "q5_1", "q8_0", "q8_1", "q2_K", "q3_K",
        "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s",
        "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64", "f64", "iq1_m", "bf16", "", "", "", "tq1_0",
        "tq2_0", "", "", "", "mxfp4", "nvfp4", "q1_0", "q2_0",
    ];
    match NAMES.get(id as usize) {
        Some(n) if !n.is_empty() => (*n).to_owned(),
        _ => format!("type {id}"),
    }
}

/// ggml type id for a KV cache type name as `--cache-type-k` takes it.
pub fn type_by_name(name: &str) -> Option<u32> {
    (0..43).find(|&id| block_layout(id).is_some() && type_name(id).eq_ignore_ascii_case(name))
}

/// Bytes of `elements` values of type `id` (rounded up to whole blocks).
pub fn bytes_for(id: u32, elements: u64) -> Option<u64> {
    let (block, size) = block_layout(id)?;
    elements.div_ceil(block).checked_mul(size)
}
