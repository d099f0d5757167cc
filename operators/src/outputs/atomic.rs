//! Atomic file output: write to a temporary file beside the target, then
//! rename it over the target, so the output path never holds a half-written
//! file (a crash or an error leaves either the old file or nothing).
//!
//! The temporary file is created exclusively (`O_EXCL`: never an existing
//! file or a symbolic link planted under its name) with an unpredictable
//! name, `.<name>.<16 random hex digits>.tmp`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::TryRngCore;

use super::SinkError;

/// Random hex digits in a temporary file's name.
const TEMP_RANDOM_HEX: usize = 16;
const TEMP_SUFFIX: &str = ".tmp";

/// A file written under a temporary name (`.<name>.<random>.tmp` in the
/// target's directory, created exclusively) and moved to its target by
/// [`AtomicFile::finish`].  Dropping it without `finish` removes the
/// temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// The file name of `target` (an error for a path without one).
fn file_name_of(target: &Path) -> Result<String, SinkError> {
    Ok(target
        .file_name()
        .ok_or_else(|| SinkError::invalid(target, "output path has no file name"))?
        .to_string_lossy()
        .into_owned())
}

/// The directory holding `target` (`.` for a bare file name).
fn dir_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `file` is one of [`AtomicFile`]'s temporary names for the
/// target named `name`: `.<name>.<16 hex digits>.tmp`, or the
/// `.<name>.tmp-<pid>` of earlier leverflow versions.
fn is_temp_name(file: &str, name: &str) -> bool {
    let Some(rest) = file
        .strip_prefix('.')
        .and_then(|f| f.strip_prefix(name))
        .and_then(|f| f.strip_prefix('.'))
    else {
        return false;
    };
    if let Some(pid) = rest.strip_prefix("tmp-") {
        return !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    }
    rest.strip_suffix(TEMP_SUFFIX).is_some_and(|r| {
        r.len() == TEMP_RANDOM_HEX && r.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

impl AtomicFile {
    /// Creates the temporary file for `target`: exclusively, under a name
    /// with 64 random bits from the operating system.
    ///
    /// Hand-written rather than `tempfile::Builder`: tempfile draws its names
    /// from `fastrand` (predictable, by its own documentation) and creates
    /// files with mode 0600, where outputs need the usual umask-based mode;
    /// the rest of this type's life cycle (rename, removal) is its own
    /// anyway.
    pub fn create(target: impl AsRef<Path>) -> Result<Self, SinkError> {
        let target = target.as_ref().to_path_buf();
        let name = file_name_of(&target)?;
        let mut attempt = 0;
        let (tmp, file) = loop {
            let mut random = [0u8; TEMP_RANDOM_HEX / 2];
            rand::rngs::OsRng.try_fill_bytes(&mut random).map_err(|e| {
                SinkError::io(
                    &target,
                    "naming the temporary output file",
                    io::Error::other(e.to_string()),
                )
            })?;
            let tmp =
                target.with_file_name(format!(".{name}.{}{TEMP_SUFFIX}", hex::encode(random)));
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(file) => break (tmp, file),
                // 64 random bits: a clash is someone else's file.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(SinkError::io(&tmp, "creating temporary output file", e)),
            }
        };
        Ok(AtomicFile {
            target,
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Removes temporary files that a killed earlier run left for `target`
    /// (`.<name>.<random>.tmp` beside it, and the `.<name>.tmp-<pid>` of
    /// earlier versions; nothing else). Call only while holding the lock
    /// of `target` ([`OutputLock`](super::OutputLock), or the state store
    /// for files inside the state directory), so no live run's file is
    /// removed. Returns how many were removed.
    pub fn remove_stale_temps(target: &Path) -> usize {
        let Ok(name) = file_name_of(target) else {
            return 0;
        };
        let Ok(entries) = fs::read_dir(dir_of(target)) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| is_temp_name(&e.file_name().to_string_lossy(), &name))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter(|e| fs::remove_file(e.path()).is_ok())
            .count()
    }

    /// Appends bytes `offset..offset + len` of `src` (in the kernel where
    /// it can: `copy_file_range` on Linux, no copy through user space).
    pub fn copy_range_from(&mut self, src: &File, offset: u64, len: u64) -> io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let writer = self.writer.as_mut().ok_or_else(io_other)?;
        let mut from = src;
        from.seek(SeekFrom::Start(offset))?;
        let copied = io::copy(&mut from.take(len), writer)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{copied} of {len} bytes copied"),
            ));
        }
        Ok(())
    }

    /// Cuts the file back to its first `len` bytes and continues writing
    /// there (to drop what was written speculatively).
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let writer = self.writer.as_mut().ok_or_else(io_other)?;
        writer.flush()?;
        writer.get_ref().set_len(len)?;
        writer.get_mut().seek(SeekFrom::Start(len))?;
        Ok(())
    }

    /// Hands everything written so far to the kernel and starts writing it
    /// to disk without waiting (`sync_file_range` on Linux; elsewhere only
    /// the buffer is flushed). Durability still comes from the fsync of
    /// [`AtomicFile::seal`], which then has little left to wait for: called
    /// between the segments of a large output, the disk writes overlap
    /// producing the rest.
    pub fn start_writeback(&mut self) -> io::Result<()> {
        let writer = self.writer.as_mut().ok_or_else(io_other)?;
        writer.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = writer.get_ref().as_raw_fd();
            // SAFETY: `fd` is the open file this writer owns; the call only
            // reads its arguments. Offset 0 and length 0 mean the whole file.
            let rc = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The final output path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes, fsyncs, renames the temporary file over the target and fsyncs
    /// the directory.  On error the temporary file is removed.
    pub fn finish(self) -> Result<(), SinkError> {
        self.seal()?.publish()
    }

    /// Flushes and fsyncs the temporary file: its content is durable but not
    /// yet at the target ([`SealedFile::publish`] moves it there).  Sealing
    /// several outputs before publishing any lets their fsyncs overlap other
    /// work, and no output appears until all of them are complete.  On error
    /// the temporary file is removed.
    pub fn seal(mut self) -> Result<SealedFile, SinkError> {
        let Some(writer) = self.writer.take() else {
            return Err(SinkError::io(&self.tmp, "finishing", io_other()));
        };
        let tmp = std::mem::take(&mut self.tmp);
        let target = std::mem::take(&mut self.target);
        let sealed = writer
            .into_inner()
            .map_err(|e| SinkError::io(&tmp, "flushing", e.into_error()))
            .and_then(|file| file.sync_all().map_err(|e| SinkError::io(&tmp, "fsync", e)));
        match sealed {
            Ok(()) => Ok(SealedFile {
                target,
                tmp: Some(tmp),
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// A complete, fsynced temporary output waiting to be moved to its target.
/// Dropping it without [`SealedFile::publish`] removes the temporary file.
#[derive(Debug)]
pub struct SealedFile {
    target: PathBuf,
    tmp: Option<PathBuf>,
}

impl SealedFile {
    /// The final output path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temporary file over the target and fsyncs the directory.
    /// On error the temporary file is removed.
    pub fn publish(mut self) -> Result<(), SinkError> {
        let Some(tmp) = self.tmp.take() else {
            return Err(SinkError::io(&self.target, "publishing", io_other()));
        };
        let result = fs::rename(&tmp, &self.target)
            .map_err(|e| SinkError::io(&self.target, "renaming temporary file over", e))
            .and_then(|()| sync_dir(&self.target));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl Drop for SealedFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.writer.as_mut() {
            Some(w) => w.write(buf),
            None => Err(io_other()),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.write_all(buf),
            None => Err(io_other()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w);
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn io_other() -> io::Error {
    io::Error::other("atomic file already finished")
}

/// fsync the directory holding `path`, so the rename itself is durable.
fn sync_dir(path: &Path) -> Result<(), SinkError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SinkError::io(&dir, "fsync of directory", e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn finish_moves_the_file_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        let mut f = AtomicFile::create(&target).unwrap();
        let tmp = f.temp_path().file_name().unwrap().to_string_lossy();
        assert!(is_temp_name(&tmp, "out.json"), "{tmp}");
        f.write_all(b"hello").unwrap();
        assert!(!target.exists(), "nothing at the target before finish");
        assert_eq!(temps(dir.path()).len(), 1);
        f.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn drop_without_finish_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.parquet");
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(&[0u8; 4096]).unwrap();
        }
        assert!(!target.exists());
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn drop_without_finish_keeps_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        fs::write(&target, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(b"new, half written").unwrap();
        }
        assert_eq!(fs::read(&target).unwrap(), b"old");
        let f = {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(b"new").unwrap();
            f
        };
        f.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn a_sealed_file_appears_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        fs::write(&target, b"old").unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        let sealed = f.seal().unwrap();
        assert_eq!(sealed.target(), target.as_path());
        assert_eq!(
            fs::read(&target).unwrap(),
            b"old",
            "sealed, not yet published"
        );
        assert_eq!(temps(dir.path()).len(), 1);
        sealed.publish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn a_sealed_file_dropped_unpublished_leaves_the_old_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.parquet");
        fs::write(&target, b"old").unwrap();
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        drop(f.seal().unwrap());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("no/such/dir/out.json");
        let err = AtomicFile::create(&target).unwrap_err().to_string();
        assert!(err.contains("no/such/dir"), "{err}");
    }

    #[test]
    fn temporary_names_are_unpredictable_and_created_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        let a = AtomicFile::create(&target).unwrap();
        let b = AtomicFile::create(&target).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
        for f in [&a, &b] {
            let name = f.temp_path().file_name().unwrap().to_string_lossy();
            assert!(
                name.starts_with(".out.json.") && name.ends_with(".tmp") && name.len() == 30,
                "{name}"
            );
        }
        drop((a, b));
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn stale_temps_are_removed_by_pattern_only() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.json");
        let stale = [
            ".out.json.0123456789abcdef.tmp",
            ".out.json.fedcba9876543210.tmp",
            ".out.json.tmp-12345",
        ];
        let kept = [
            "out.json",
            ".out.json.lock",
            ".out.json.0123456789ABCDEF.tmp",
            ".out.json.0123456789abcde.tmp",
            ".out.json.x.0123456789abcdef.tmp",
            ".out.json.tmp-",
            ".out.json.tmp-12a",
            ".out.0123456789abcdef.tmp",
            ".other.json.0123456789abcdef.tmp",
            "notes.tmp",
        ];
        for n in stale.iter().chain(&kept) {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        // A file being written by this run is one of them too: callers
        // hold the output's lock, so no live run has one.
        assert_eq!(AtomicFile::remove_stale_temps(&target), stale.len());
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(left, want);
        // The pattern of a target named "out": not "out.json"'s files.
        fs::write(dir.path().join(".out.json.0123456789abcdef.tmp"), b"x").unwrap();
        assert_eq!(AtomicFile::remove_stale_temps(&dir.path().join("out")), 1);
        assert!(!dir.path().join(".out.0123456789abcdef.tmp").exists());
        assert!(dir.path().join(".out.json.0123456789abcdef.tmp").exists());
    }
}
