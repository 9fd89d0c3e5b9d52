//! Atomic file writes: a temporary file unique to this process and call, synced, then renamed
//! over the destination, so a crash leaves either the old file or the new one, and two
//! processes writing the same destination never share a temporary file.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name next to `path`, unique to this process and call:
/// `.<file name>.<pid>.<n>.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically (unique temporary file, fsync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| file_error(path, e))
    })
}

/// Has `write` create the file at the temporary path it is given, then syncs it and renames it
/// over `path` (see [`write_atomically`]); the temporary file is removed on failure.
pub fn write_atomically_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let written = write(&tmp).and_then(|()| {
        let sync = || -> std::io::Result<()> {
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        sync().map_err(|e| file_error(path, e))
    });
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written
}

/// A state file error: `path` and why.
pub(crate) fn file_error(path: &Path, reason: impl ToString) -> Error {
    Error::StateFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_unique_and_writes_replace_whole_files() {
        let dir = std::env::temp_dir().join(format!("frugal-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.json");
        let (a, b) = (temp_path(&path), temp_path(&path));
        assert_ne!(a, b);
        assert_eq!(a.parent(), path.parent());
        let pid = std::process::id().to_string();
        assert!(a.to_string_lossy().contains(&pid));
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary files left behind");
        std::fs::remove_dir_all(&dir).ok();
    }
}
