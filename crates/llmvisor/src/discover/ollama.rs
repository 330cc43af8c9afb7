//! Ollama's store (`$OLLAMA_MODELS`, else `~/.ollama/models`): manifests under
//! `manifests/<registry>/<namespace>/<name>/<tag>` list layers by media type; the layer
//! `application/vnd.ollama.image.model` is the GGUF blob (`blobs/sha256-<hex>`), `…params` its
//! stop words and sampling defaults, `…projector` its `--mmproj`. Ids as Ollama names them:
//! `gemma3:270m` (`registry.ollama.ai/library/` left out), `user/model:tag`, `host/ns/model:tag`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::folder::found;
use super::{Found, OllamaExtras, Source, Warning};

const DEFAULT_REGISTRY: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const PARAMS_LAYER: &str = "application/vnd.ollama.image.params";
const PROJECTOR_LAYER: &str = "application/vnd.ollama.image.projector";
/// Largest manifest or params layer read (they are a few hundred bytes).
const MAX_SMALL_FILE: u64 = 1 << 20;

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

/// Ollama's name of the model whose manifest is at `registry/namespace/name/tag`.
pub fn model_id(registry: &str, namespace: &str, name: &str, tag: &str) -> String {
    match (registry, namespace) {
        (DEFAULT_REGISTRY, DEFAULT_NAMESPACE) => format!("{name}:{tag}"),
        (DEFAULT_REGISTRY, ns) => format!("{ns}/{name}:{tag}"),
        (host, ns) => format!("{host}/{ns}/{name}:{tag}"),
    }
}

/// `sha256:<hex>` → `blobs/sha256-<hex>`.
fn blob_path(root: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| root.join("blobs").join(format!("sha256-{hex}")))
}

fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_SMALL_FILE)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

pub fn find(root: &Path, out: &mut Vec<Found>, warnings: &mut Vec<Warning>) {
    let manifests = root.join("manifests");
    if !manifests.exists() {
        return;
    }
    // registry / namespace / name / tag: four levels of folders, the last holding files.
    let mut level = vec![(manifests, Vec::<String>::new())];
    for depth in 0..4 {
        let mut next = Vec::new();
        for (dir, parts) in level {
            let Some(entries) = super::sorted_entries(&dir, warnings) else {
                continue;
            };
            for path in entries {
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let is_file = path.is_file();
                if (depth == 3) != is_file {
                    continue;
                }
                let mut parts = parts.clone();
                parts.push(name);
                next.push((path, parts));
            }
        }
        level = next;
    }
    for (path, parts) in level {
        let id = model_id(&parts[0], &parts[1], &parts[2], &parts[3]);
        if let Some(f) = read_manifest(root, &path, id, warnings) {
            out.push(f);
        }
    }
}

fn read_manifest(
    root: &Path,
    path: &Path,
    id: String,
    warnings: &mut Vec<Warning>,
) -> Option<Found> {
    let warn = |warnings: &mut Vec<Warning>, message: String| {
        warnings.push(Warning {
            path: path.to_owned(),
            message,
        })
    };
    let manifest: Manifest = match read_small(path).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            warn(
                warnings,
                format!("not served: not a manifest Ollama writes: {e}"),
            );
            return None;
        }
        Err(e) => {
            warn(warnings, format!("not served: cannot read: {e}"));
            return None;
        }
    };
    let layer = |media: &str| manifest.layers.iter().find(|l| l.media_type == media);
    let Some(model) = layer(MODEL_LAYER) else {
        warn(
            warnings,
            format!("not served: `{id}` has no layer of type {MODEL_LAYER}"),
        );
        return None;
    };
    let Some(blob) = blob_path(root, &model.digest) else {
        warn(
            warnings,
            format!("not served: bad digest {:?}", model.digest),
        );
        return None;
    };
    if !blob.is_file() {
        warn(
            warnings,
            format!(
                "not served: `{id}` names blob {} which is missing",
                blob.display()
            ),
        );
        return None;
    }
    let params = layer(PARAMS_LAYER)
        .and_then(|l| blob_path(root, &l.digest))
        .and_then(
            |p| match read_small(&p).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(serde_json::Value::Object(map))) => Some(map),
                _ => {
                    warn(
                        warnings,
                        format!("its params layer {} is unreadable; ignored", p.display()),
                    );
                    None
                }
            },
        )
        .unwrap_or_default();
    let projector = layer(PROJECTOR_LAYER)
        .and_then(|l| blob_path(root, &l.digest))
        .filter(|p| p.is_file());
    let mut f = found(id, Source::Ollama, &blob, projector.as_ref());
    f.modified = super::modified_secs(path);
    f.ollama = Some(OllamaExtras {
        digest: model.digest.trim_start_matches("sha256:").to_owned(),
        params,
    });
    Some(f)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_as_ollama_names_them() {
        use super::model_id;
        assert_eq!(
            model_id("registry.ollama.ai", "library", "gemma3", "270m"),
            "gemma3:270m"
        );
        assert_eq!(
            model_id("registry.ollama.ai", "me", "m", "latest"),
            "me/m:latest"
        );
        assert_eq!(
            model_id("hf.co", "unsloth", "Qwen3-8B-GGUF", "Q4_K_M"),
            "hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M"
        );
    }
}
