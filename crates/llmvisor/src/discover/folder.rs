//! Folders of GGUF files: `models_dirs`, llama.cpp's plain cache, LM Studio's folders.
//!
//! Every `*.gguf` below the root is a model, but: a split model (`name-00001-of-00003.gguf`)
//! is one model (its first part); a projector (`mmproj*.gguf`, or a `clip` header) is not
//! served alone but passed as `--mmproj` to the models in its folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{modified_secs, quant_of_file_name, Found, Source, Warning};

/// Folders deeper than this below a root are not read (a symlink loop ends here too).
const MAX_DEPTH: usize = 8;

/// How a folder's files are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The path below the root without `.gguf` (`sub/Qwen3-8B-Q4_K_M`).
    Path,
    /// LM Studio's `publisher/repo/file.gguf`: `publisher/repo`, plus `:QUANT` when the repo
    /// holds several models; other depths as [`Naming::Path`].
    Repo,
}

/// `name-00001-of-00003` → `name` (other names unchanged).
pub fn without_split_suffix(stem: &str) -> &str {
    split_part(stem).map_or(stem, |(base, _)| base)
}

/// `name-0000K-of-0000N` → (`name`, K).
fn split_part(stem: &str) -> Option<(&str, u32)> {
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (base, k) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(k) && digits(total)).then(|| (base, k.parse().unwrap_or(0)))
}

fn is_gguf(name: &str) -> bool {
    name.len() > 5 && name[name.len() - 5..].eq_ignore_ascii_case(".gguf")
}

fn is_projector_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains("mmproj")
}

/// Every `*.gguf` below `root` (symlinks followed), by folder; unreadable folders and dangling
/// links are warnings.
pub fn gguf_files(root: &Path, warnings: &mut Vec<Warning>) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut by_dir: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Some(paths) = super::sorted_entries(&dir, warnings) else {
            continue;
        };
        for path in paths {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            // Follows symlinks: the Hugging Face cache's files are links into its blobs.
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    if is_gguf(&name) {
                        warnings.push(Warning {
                            path,
                            message: format!("not served: {e} (a dangling symlink?)"),
                        });
                    }
                    continue;
                }
            };
            if meta.is_dir() {
                if !name.starts_with('.') && depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            } else if meta.is_file() && is_gguf(&name) {
                by_dir.entry(dir.clone()).or_default().push(path);
            }
        }
    }
    by_dir
}

/// One folder's models: split parts but the first dropped, projectors set aside.
pub struct FolderModels {
    /// (file, its name without `.gguf` and split suffix).
    pub models: Vec<(PathBuf, String)>,
    pub projector: Option<PathBuf>,
}

/// Sorts one folder's GGUF files into models and a projector (by name; the header's `clip`
/// architecture is checked when each is read).
pub fn sort_folder(files: &[PathBuf]) -> FolderModels {
    let mut models = Vec::new();
    let mut projector = None;
    for f in files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let stem = &name[..name.len() - 5];
        if is_projector_name(&name) {
            projector.get_or_insert_with(|| f.clone());
            continue;
        }
        match split_part(stem) {
            Some((base, 1)) => models.push((f.clone(), base.to_owned())),
            Some(_) => {} // a later part: read with the first
            None => models.push((f.clone(), stem.to_owned())),
        }
    }
    FolderModels { models, projector }
}

/// A model file found, its header not yet read (see `super::read_headers`).
pub fn found(id: String, source: Source, file: &Path, mmproj: Option<&PathBuf>) -> Found {
    Found {
        id,
        source,
        file: file.to_owned(),
        mmproj: mmproj.cloned(),
        size: 0,
        modified: modified_secs(file),
        facts: Default::default(),
        ollama: None,
    }
}

pub fn find(
    root: &Path,
    source: Source,
    naming: Naming,
    out: &mut Vec<Found>,
    warnings: &mut Vec<Warning>,
) {
    for (dir, files) in gguf_files(root, warnings) {
        let folder = sort_folder(&files);
        let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
        let rel_parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let several = folder.models.len() > 1;
        for (file, stem) in &folder.models {
            let id = match (naming, rel_parts.len()) {
                (Naming::Repo, 2) => {
                    let repo = rel_parts.join("/");
                    match quant_of_file_name(stem).filter(|_| several) {
                        Some(q) => format!("{repo}:{q}"),
                        None if several => format!("{repo}:{stem}"),
                        None => repo,
                    }
                }
                _ => rel_parts
                    .iter()
                    .map(String::as_str)
                    .chain([stem.as_str()])
                    .collect::<Vec<_>>()
                    .join("/"),
            };
            out.push(found(id, source, file, folder.projector.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(split_part("m-00001-of-00003"), Some(("m", 1)));
        assert_eq!(
            split_part("Qwen3-8B-Q4_K_M-00002-of-00002"),
            Some(("Qwen3-8B-Q4_K_M", 2))
        );
        assert_eq!(split_part("m-1-of-3"), None);
        assert_eq!(without_split_suffix("plain"), "plain");
    }
}
