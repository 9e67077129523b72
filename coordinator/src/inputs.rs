//! Submitted inputs: uploaded NIfTI bytes, or paths that must stay under the configured
//! data root ([`read_input`]).

use crate::error::{CoordinatorError, Result};
use dmqsm_proto::v1::{VolumeInput, volume_input::Source};
use std::path::{Path, PathBuf};

/// Largest input file accepted, in bytes (2 GiB: far above any brain volume).
pub const MAX_INPUT_BYTES: u64 = 2 << 30;

/// Resolves `path` against `root` and refuses anything that escapes it (`..`, absolute
/// paths elsewhere, symlinks pointing out). Returns the canonical file path.
pub fn resolve_under_root(root: &Path, path: &str, what: &str) -> Result<PathBuf> {
    let bad = |m: String| CoordinatorError::InvalidSubmission(m);
    let root = root.canonicalize().map_err(|e| {
        bad(format!(
            "{what}: the coordinator's data root {} is unusable: {e}",
            root.display()
        ))
    })?;
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    };
    let canon = joined.canonicalize().map_err(|e| {
        // Do not leak whether files outside the root exist: check the lexical form first.
        if !lexically_under(&root, &joined) {
            bad(format!(
                "{what}: path {path:?} is outside the data root {}",
                root.display()
            ))
        } else {
            bad(format!(
                "{what}: cannot open {path:?} under the data root: {e}"
            ))
        }
    })?;
    if !canon.starts_with(&root) {
        return Err(bad(format!(
            "{what}: path {path:?} is outside the data root {}",
            root.display()
        )));
    }
    if !canon.is_file() {
        return Err(bad(format!("{what}: {path:?} is not a file")));
    }
    Ok(canon)
}

fn lexically_under(root: &Path, p: &Path) -> bool {
    let mut parts: Vec<std::path::Component> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::CurDir => {}
            c => parts.push(c),
        }
    }
    parts.iter().collect::<PathBuf>().starts_with(root)
}

/// The bytes of an input: the upload itself, or the file at a path under `root`.
/// `Ok(None)` when the input is absent.
pub fn read_input(
    input: Option<&VolumeInput>,
    root: Option<&Path>,
    what: &str,
) -> Result<Option<Vec<u8>>> {
    let Some(source) = input.and_then(|i| i.source.as_ref()) else {
        return Ok(None);
    };
    match source {
        Source::Nifti(bytes) => {
            if bytes.is_empty() {
                return Err(CoordinatorError::InvalidSubmission(format!(
                    "{what}: the uploaded NIfTI is empty"
                )));
            }
            Ok(Some(bytes.to_vec()))
        }
        Source::Path(path) => {
            let root = root.ok_or_else(|| {
                CoordinatorError::InvalidSubmission(format!(
                    "{what}: path inputs are disabled on this coordinator (no --data-root); \
                     upload the file instead"
                ))
            })?;
            let file = resolve_under_root(root, path, what)?;
            let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            if len > MAX_INPUT_BYTES {
                return Err(CoordinatorError::InvalidSubmission(format!(
                    "{what}: {path:?} is {len} bytes, above the {MAX_INPUT_BYTES} limit"
                )));
            }
            std::fs::read(&file).map(Some).map_err(|e| {
                CoordinatorError::InvalidSubmission(format!("{what}: cannot read {path:?}: {e}"))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.nii"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.nii"), b"y").unwrap();
        assert!(resolve_under_root(&root, "sub/a.nii", "field").is_ok());
        let abs = root.join("sub/a.nii");
        assert!(resolve_under_root(&root, abs.to_str().unwrap(), "field").is_ok());
        for bad in ["../secret.nii", "sub/../../secret.nii", "/etc/passwd"] {
            let e = resolve_under_root(&root, bad, "field")
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside the data root"), "{bad}: {e}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret.nii"), root.join("link.nii"))
                .unwrap();
            let e = resolve_under_root(&root, "link.nii", "field")
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside the data root"), "{e}");
        }
        let e = resolve_under_root(&root, "missing.nii", "mask")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mask") && e.contains("cannot open"), "{e}");
        let input = VolumeInput {
            source: Some(Source::Path("sub/a.nii".into())),
        };
        let e = read_input(Some(&input), None, "field")
            .unwrap_err()
            .to_string();
        assert!(e.contains("path inputs are disabled"), "{e}");
        assert_eq!(
            read_input(Some(&input), Some(&root), "field")
                .unwrap()
                .unwrap(),
            b"x"
        );
        assert!(read_input(None, Some(&root), "mask").unwrap().is_none());
    }
}
