//! Crash-safe file writes: the one home of "temporary sibling, fsync, rename" used for
//! every file the project writes that a reader must never see half-written (NIfTI results,
//! model cards and weights, training checkpoints, cohort manifests, the job store's
//! exported files).
//!
//! A reader sees either the old file or the whole new one, also after a power loss: the
//! data is fsynced before the rename, and the directory after it (POSIX rename is atomic
//! within a file system).

use std::path::{Path, PathBuf};

const TEMP_PREFIX: &str = ".dmqsm-";
const TEMP_SUFFIX: &str = ".tmp";

/// A file being written atomically: write it at [`AtomicFile::path`] (by any means, e.g.
/// libtorch's own `save`), then [`AtomicFile::commit`] moves it over the destination.
/// Dropped without a commit, the temporary is removed and the destination is untouched.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::TempPath,
    dest: PathBuf,
    dir: PathBuf,
}

impl AtomicFile {
    /// A temporary sibling of `dest` (same directory, so the rename stays on one file
    /// system). The directory must exist.
    pub fn new(dest: &Path) -> std::io::Result<Self> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(&dir)?
            .into_temp_path();
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            dir,
        })
    }

    /// Where to write the new contents.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Makes the new contents durable (fsync) and moves them over the destination, then
    /// syncs the directory entry.
    pub fn commit(self) -> std::io::Result<()> {
        std::fs::File::open(&self.tmp)?.sync_all()?;
        self.tmp.persist(&self.dest).map_err(|e| e.error)?;
        // The rename is durable once the directory entry is; a directory that cannot be
        // opened for syncing (some network file systems) keeps the data, so this is best
        // effort.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Removes the temporaries an [`AtomicFile`] leaves in `dir` when its process is killed
/// before the commit (`.dmqsm-*.tmp`); returns how many. Only for a directory no other
/// process is writing to.
pub fn remove_stale_temporaries(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            std::fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file = AtomicFile::new(path)?;
    std::fs::write(file.path(), bytes)?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn an_uncommitted_file_leaves_the_destination_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"old").unwrap();
        {
            let f = AtomicFile::new(&p).unwrap();
            std::fs::write(f.path(), b"new").unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A temporary a killed process left behind is found and removed.
        let f = AtomicFile::new(&p).unwrap();
        std::fs::write(f.path(), b"half").unwrap();
        std::mem::forget(f);
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_nothing_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("a.json");
        assert!(write_atomic(&p, b"x").is_err());
        assert!(!p.exists());
    }
}
