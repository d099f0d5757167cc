//! One run per output path: [`OutputLock`].
//!
//! Two runs writing the same output would each rename a complete file over
//! it, and one's clean-up of stale temporary files could remove the other's
//! file in progress.  So `generate` and `merge` take an exclusive advisory
//! lock (`flock` on Unix, `LockFileEx` on Windows: `std::fs::File::try_lock`)
//! on a hidden lock file beside each output, `.<name>.lock`, before any
//! work, and a second run on the same output fails at once.  The lock is
//! the open file's: the operating system releases it when the process ends,
//! however it ends, so a killed run never leaves a stale lock.
//!
//! The lock file holds the holder's process id (for the error message) and
//! is removed when the lock is released.  Removing a lock file is safe
//! because a run that locked a file checks that the file is still the one at
//! the path (same device and inode) and starts over otherwise.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::SinkError;

/// An exclusive lock on an output path, held until dropped.
#[derive(Debug)]
pub struct OutputLock {
    target: PathBuf,
    path: PathBuf,
    // Holds the lock; closed (and so released) after the lock file is
    // removed in `drop`.
    file: Option<File>,
}

impl OutputLock {
    /// The lock file of `target`: `.<name>.lock` in its directory.
    pub fn lock_path(target: &Path) -> Result<PathBuf, SinkError> {
        let name = target
            .file_name()
            .ok_or_else(|| SinkError::invalid(target, "output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        Ok(target.with_file_name(format!(".{name}.lock")))
    }

    /// Locks `target` (creating its directory if needed), or fails at once
    /// with [`SinkError::InUse`] naming the process that holds it.
    pub fn acquire(target: impl AsRef<Path>) -> Result<Self, SinkError> {
        let target = target.as_ref().to_path_buf();
        let path = Self::lock_path(&target)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .map_err(|e| SinkError::io(dir, "creating the output directory", e))?;
        }
        // A holder that released and removed the file between our open and
        // our lock leaves us a lock on a removed file: start over.
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| SinkError::io(&path, "opening the output's lock file", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(SinkError::InUse {
                        path: target,
                        pid: holder_pid(&mut file),
                    })
                }
                Err(TryLockError::Error(e)) => {
                    return Err(SinkError::io(&path, "locking the output's lock file", e))
                }
            }
            if !same_file(&file, &path) {
                continue;
            }
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(|e| SinkError::io(&path, "writing the output's lock file", e))?;
            return Ok(OutputLock {
                target,
                path,
                file: Some(file),
            });
        }
        Err(SinkError::invalid(
            &path,
            "the lock file keeps being replaced by other runs",
        ))
    }

    /// Locks every path of `targets` (each once), in order; on a failure
    /// the locks already taken are released.
    pub fn acquire_all<'a>(
        targets: impl IntoIterator<Item = &'a Path>,
    ) -> Result<Vec<Self>, SinkError> {
        let mut locks: Vec<Self> = Vec::new();
        for t in targets {
            if locks.iter().any(|l| l.target == t) {
                continue;
            }
            locks.push(Self::acquire(t)?);
        }
        Ok(locks)
    }

    /// The locked output path.
    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked: whoever opened it meanwhile notices
        // (see `acquire`). Then closing the file releases the lock.
        let _ = fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

/// The process id a lock file holds (`None` when not written yet).
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether `file` is the file now at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_output_fails_at_once_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        let lock_file = dir.path().join(".out.json.lock");
        let held = OutputLock::acquire(&target).unwrap();
        assert_eq!(held.target(), target.as_path());
        assert_eq!(
            fs::read_to_string(&lock_file).unwrap().trim(),
            std::process::id().to_string()
        );
        // The same process, another open file description: refused too.
        let err = OutputLock::acquire(&target).unwrap_err();
        assert!(
            matches!(&err, SinkError::InUse { pid: Some(p), .. } if *p == std::process::id()),
            "{err}"
        );
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "output {} is in use by another leverflow run (pid {})",
                target.display(),
                std::process::id()
            )
        );
        // Other outputs are free.
        let other = OutputLock::acquire(dir.path().join("out.parquet")).unwrap();
        // Released on drop, and the lock file goes with it.
        drop(held);
        assert!(!lock_file.exists());
        let again = OutputLock::acquire(&target).unwrap();
        drop((again, other));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn all_or_nothing_and_a_left_over_lock_file_is_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sub/out.json");
        let parquet = dir.path().join("sub/out.parquet");
        // A lock file a killed run left (its lock went with its process).
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/.out.json.lock"), "999999\n").unwrap();
        let held = OutputLock::acquire(&parquet).unwrap();
        let err = OutputLock::acquire_all([json.as_path(), parquet.as_path()]).unwrap_err();
        assert!(err.to_string().contains("out.parquet is in use"), "{err}");
        // The JSON's lock taken on the way was released.
        drop(OutputLock::acquire(&json).unwrap());
        drop(held);
        let both =
            OutputLock::acquire_all([json.as_path(), parquet.as_path(), json.as_path()]).unwrap();
        assert_eq!(both.len(), 2);
        // The output's directory is created if needed.
        drop(OutputLock::acquire(dir.path().join("new/dir/out.json")).unwrap());
        assert!(dir.path().join("new/dir").is_dir());
    }
}
