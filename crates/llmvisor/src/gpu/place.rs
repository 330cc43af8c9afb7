//! Where a model's GPU memory goes, and whether it fits: per GPU, against each GPU's budget.
//!
//! A model pinned to GPUs (`gpus = [...]`) needs its estimated bytes on each of them. One that
//! is not is placed on a single GPU: the one with the most memory left after placing it (ties:
//! the lowest index), so the next model finds the most room in one piece.

use std::collections::BTreeMap;

use crate::units::format_size;

/// What a model needs on the GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GpuNeed {
    /// Nothing counted on a GPU (CPU only, no GPU found, or a figure we cannot split).
    #[default]
    Nothing,
    /// These bytes on each of these GPUs (`gpus = [...]`).
    Pinned(BTreeMap<u32, u64>),
    /// This many bytes on one GPU, any of them.
    Anywhere(u64),
}

/// One GPU as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuRoom {
    pub index: u32,
    /// What the budget allows on it.
    pub budget: u64,
    /// What the models counted against it hold.
    pub held: u64,
}

impl GpuRoom {
    fn free(&self) -> u64 {
        self.budget.saturating_sub(self.held)
    }
}

/// Why a model does not fit the GPUs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoFit {
    /// Not even with every other model stopped.
    #[error("{0}")]
    Never(String),
    /// Not now: other models hold the room.
    #[error("{0}")]
    NotNow(String),
}

/// The bytes per GPU model `id` would take, given what `rooms` hold now.
pub fn place(id: &str, need: &GpuNeed, rooms: &[GpuRoom]) -> Result<BTreeMap<u32, u64>, NoFit> {
    match need {
        GpuNeed::Nothing => Ok(BTreeMap::new()),
        GpuNeed::Pinned(per_gpu) => {
            for (&gpu, &bytes) in per_gpu {
                let Some(room) = rooms.iter().find(|r| r.index == gpu) else {
                    return Err(NoFit::Never(format!(
                        "model `{id}` is pinned to GPU {gpu}, which this machine does not have (fix: change its `gpus`; found: {})",
                        list(rooms)
                    )));
                };
                if bytes > room.budget {
                    return Err(NoFit::Never(format!(
                        "model `{id}` needs {} on GPU {gpu} but its gpu_budget is {}: it can never fit (fix: raise gpu_budget, lower -ngl or the context, or pin it to more GPUs)",
                        format_size(bytes),
                        format_size(room.budget)
                    )));
                }
                if bytes > room.free() {
                    return Err(NoFit::NotNow(format!(
                        "model `{id}` needs {} on GPU {gpu}, which has {} free",
                        format_size(bytes),
                        format_size(room.free())
                    )));
                }
            }
            Ok(per_gpu.clone())
        }
        GpuNeed::Anywhere(bytes) => {
            if rooms.iter().all(|r| *bytes > r.budget) {
                return Err(NoFit::Never(format!(
                    "model `{id}` needs {} on one GPU, more than the gpu_budget of any ({}): it can never fit (fix: raise gpu_budget, lower -ngl or the context, or pin it to several GPUs with `gpus`)",
                    format_size(*bytes),
                    list(rooms)
                )));
            }
            let best = rooms
                .iter()
                .filter(|r| *bytes <= r.free())
                .max_by_key(|r| (r.free() - bytes, std::cmp::Reverse(r.index)));
            match best {
                Some(r) => Ok(BTreeMap::from([(r.index, *bytes)])),
                None => Err(NoFit::NotNow(format!(
                    "model `{id}` needs {} on one GPU and none has that free ({})",
                    format_size(*bytes),
                    rooms
                        .iter()
                        .map(|r| format!("GPU {}: {} free", r.index, format_size(r.free())))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    }
}

fn list(rooms: &[GpuRoom]) -> String {
    if rooms.is_empty() {
        return "no GPU".to_owned();
    }
    rooms
        .iter()
        .map(|r| format!("GPU {}: {}", r.index, format_size(r.budget)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Two 24 GiB GPUs, nothing held.
    fn two() -> Vec<GpuRoom> {
        (0..2)
            .map(|index| GpuRoom {
                index,
                budget: 24 * GIB,
                held: 0,
            })
            .collect()
    }

    /// Places each model in turn, holding what it took.
    fn fill(rooms: &mut [GpuRoom], id: &str, need: GpuNeed) -> Result<BTreeMap<u32, u64>, NoFit> {
        let placed = place(id, &need, rooms)?;
        for (gpu, b) in &placed {
            rooms.iter_mut().find(|r| r.index == *gpu).unwrap().held += b;
        }
        Ok(placed)
    }

    #[test]
    fn models_of_14_8_and_20_gib_on_two_24_gib_gpus() {
        let mut rooms = two();
        // 14 GiB: both empty, the tie goes to GPU 0.
        let a = fill(&mut rooms, "a", GpuNeed::Anywhere(14 * GIB)).unwrap();
        assert_eq!(a, BTreeMap::from([(0, 14 * GIB)]));
        // 8 GiB: GPU 1 keeps 16 GiB free after it, GPU 0 would keep 2.
        let b = fill(&mut rooms, "b", GpuNeed::Anywhere(8 * GIB)).unwrap();
        assert_eq!(b, BTreeMap::from([(1, 8 * GIB)]));
        // 20 GiB: 10 and 16 GiB free, fits neither now, though it would fit an empty one.
        let c = fill(&mut rooms, "c", GpuNeed::Anywhere(20 * GIB)).unwrap_err();
        assert_eq!(
            c,
            NoFit::NotNow("model `c` needs 20 GiB on one GPU and none has that free (GPU 0: 10 GiB free, GPU 1: 16 GiB free)".into())
        );
        // Once a is gone, c takes GPU 0 (the most left after it: 4 GiB vs GPU 1's -4).
        rooms[0].held = 0;
        assert_eq!(
            fill(&mut rooms, "c", GpuNeed::Anywhere(20 * GIB)).unwrap(),
            BTreeMap::from([(0, 20 * GIB)])
        );
    }

    #[test]
    fn pinned_models_go_where_they_are_pinned_or_wait() {
        let mut rooms = two();
        fill(&mut rooms, "a", GpuNeed::Anywhere(14 * GIB)).unwrap();
        // Pinned to GPU 0: it goes there although GPU 1 has more room.
        let p = fill(&mut rooms, "p", GpuNeed::Pinned([(0, 8 * GIB)].into())).unwrap();
        assert_eq!(p, BTreeMap::from([(0, 8 * GIB)]));
        // Pinned to GPU 0 again: 2 GiB free there, so not now, even though GPU 1 is empty.
        let q = fill(&mut rooms, "q", GpuNeed::Pinned([(0, 8 * GIB)].into())).unwrap_err();
        assert!(
            matches!(&q, NoFit::NotNow(m) if m.contains("on GPU 0, which has 2 GiB free")),
            "{q}"
        );
        // Split over both (as llama.cpp splits layers): each part must fit its GPU.
        let split = fill(
            &mut rooms,
            "s",
            GpuNeed::Pinned([(0, GIB), (1, 12 * GIB)].into()),
        )
        .unwrap();
        assert_eq!(split.values().sum::<u64>(), 13 * GIB);
        assert_eq!(rooms[0].held, 23 * GIB);
    }

    #[test]
    fn a_model_that_fits_no_gpu_ever_says_so_and_how_to_fix_it() {
        let rooms = two();
        let e = place("big", &GpuNeed::Anywhere(30 * GIB), &rooms).unwrap_err();
        assert_eq!(
            e,
            NoFit::Never("model `big` needs 30 GiB on one GPU, more than the gpu_budget of any (GPU 0: 24 GiB, GPU 1: 24 GiB): it can never fit (fix: raise gpu_budget, lower -ngl or the context, or pin it to several GPUs with `gpus`)".into())
        );
        let e = place("p", &GpuNeed::Pinned([(1, 25 * GIB)].into()), &rooms).unwrap_err();
        assert!(
            matches!(&e, NoFit::Never(m) if m.contains("needs 25 GiB on GPU 1 but its gpu_budget is 24 GiB")),
            "{e}"
        );
        let e = place("p", &GpuNeed::Pinned([(2, GIB)].into()), &rooms).unwrap_err();
        assert!(
            matches!(&e, NoFit::Never(m) if m.contains("pinned to GPU 2, which this machine does not have")),
            "{e}"
        );
        // CPU only: nothing to place, whatever the GPUs.
        assert_eq!(place("cpu", &GpuNeed::Nothing, &[]), Ok(BTreeMap::new()));
    }
}
