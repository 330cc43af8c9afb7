//! Split models: llama.cpp's `gguf-split` writes `NAME-00001-of-00003.gguf` … `-00003-of-00003`,
//! the first part holding the metadata, each part its share of the tensors (and `split.count`,
//! `split.tensors.count` saying how many there are in all).

use std::path::{Path, PathBuf};

use super::{Gguf, GgufError};

/// The most parts a split model may name (gguf-split numbers them with five digits).
const MAX_PARTS: u32 = 99_999;

/// The files of the model at `path`: all its parts in order if its name is a split part's,
/// else `path` alone.
pub fn parts(path: &Path) -> Result<Vec<PathBuf>, GgufError> {
    let Some((stem, count)) = split_name(path) else {
        return Ok(vec![path.to_owned()]);
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let files: Vec<PathBuf> = (1..=count)
        .map(|k| dir.join(format!("{stem}-{k:05}-of-{count:05}.gguf")))
        .collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(GgufError::Split {
            path: path.to_owned(),
            reason: format!(
                "part of a {count}-file split model, but {} is missing (download every part)",
                missing.display()
            ),
        });
    }
    Ok(files)
}

/// `(stem, N)` for a file named `stem-0000K-of-0000N.gguf` with 1 ≤ K ≤ N.
fn split_name(path: &Path) -> Option<(String, u32)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".gguf")?;
    let (rest, count) = name.rsplit_once("-of-")?;
    let (stem, no) = rest.rsplit_once('-')?;
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !five_digits(no) || !five_digits(count) || stem.is_empty() {
        return None;
    }
    let (no, count): (u32, u32) = (no.parse().ok()?, count.parse().ok()?);
    (1..=MAX_PARTS)
        .contains(&count)
        .then_some(())
        .filter(|_| (1..=count).contains(&no))?;
    Some((stem.to_owned(), count))
}

/// Fails if the parts' own metadata disagrees with what was read (a part from another split).
pub fn check_complete(path: &Path, model: &Gguf) -> Result<(), GgufError> {
    let fail = |reason: String| {
        Err(GgufError::Split {
            path: path.to_owned(),
            reason,
        })
    };
    if let Some(count) = model.get_u64("split.count") {
        if count != model.files.len() as u64 && count > 1 {
            return fail(format!(
                "says it is one of {count} parts but {} were found",
                model.files.len()
            ));
        }
    }
    if let Some(n) = model.get_u64("split.tensors.count") {
        if n != model.tensors.len() as u64 && model.files.len() > 1 {
            return fail(format!(
                "its parts should hold {n} tensors but hold {}",
                model.tensors.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        let p = |s: &str| split_name(Path::new(s));
        assert_eq!(p("/m/q-00002-of-00003.gguf"), Some(("q".into(), 3)));
        assert_eq!(p("a-b-00001-of-00001.gguf"), Some(("a-b".into(), 1)));
        assert_eq!(p("q-00004-of-00003.gguf"), None);
        assert_eq!(p("q-00000-of-00003.gguf"), None);
        assert_eq!(p("q-0001-of-0003.gguf"), None);
        assert_eq!(p("q.gguf"), None);
        assert_eq!(p("-00001-of-00002.gguf"), None);
    }
}
