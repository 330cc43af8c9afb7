//! The Hugging Face hub cache: `models--<org>--<name>/snapshots/<rev>/…gguf`, the files being
//! symlinks into `blobs/`; `refs/main` names the revision served. Ids are `org/name`, plus
//! `:QUANT` when the repo holds several models (`unsloth/Qwen3-8B-GGUF:Q4_K_M`).

use std::path::{Path, PathBuf};

use super::folder::{found, gguf_files, sort_folder};
use super::{quant_of_file_name, Found, Source, Warning};

/// True when `root` holds at least one `models--…` repo folder.
pub fn has_repos(root: &Path) -> bool {
    std::fs::read_dir(root).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("models--")))
    })
}

pub fn find(root: &Path, out: &mut Vec<Found>, warnings: &mut Vec<Warning>) {
    find_as(root, Source::HuggingFace, out, warnings);
}

/// The repos of a cache in Hugging Face's layout, found as `source`.
pub fn find_as(root: &Path, source: Source, out: &mut Vec<Found>, warnings: &mut Vec<Warning>) {
    let Some(repos) = super::sorted_entries(root, warnings) else {
        return;
    };
    for repo_dir in repos {
        let name = repo_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(repo) = name.strip_prefix("models--") else {
            continue;
        };
        // `--` separates org and name (`/` cannot appear in a folder name).
        let repo_id = repo.replacen("--", "/", 1);
        let Some(snapshot) = snapshot(&repo_dir, warnings) else {
            continue;
        };
        let mut models: Vec<(PathBuf, String, Option<PathBuf>)> = Vec::new();
        for (_, files) in gguf_files(&snapshot, warnings) {
            let folder = sort_folder(&files);
            for (file, stem) in folder.models {
                models.push((file, stem, folder.projector.clone()));
            }
        }
        let several = models.len() > 1;
        for (file, stem, mmproj) in models {
            let id = if several {
                let tag = quant_of_file_name(&stem).unwrap_or_else(|| stem.clone());
                format!("{repo_id}:{tag}")
            } else {
                repo_id.clone()
            };
            out.push(found(id, source, &file, mmproj.as_ref()));
        }
    }
}

/// The snapshot `refs/main` names; without `refs/main`, the newest snapshot.
fn snapshot(repo_dir: &Path, warnings: &mut Vec<Warning>) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    let refs_main = repo_dir.join("refs").join("main");
    if let Ok(rev) = std::fs::read_to_string(&refs_main) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
        warnings.push(Warning {
            path: refs_main,
            message: format!("names revision {} that is not in snapshots/", rev.trim()),
        });
    }
    let newest = std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?;
    Some(newest.path())
}
