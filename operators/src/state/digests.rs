//! Content digests (SHA-256) of input files, remembered across runs.
//!
//! Every result key depends on the content hashes of the run's input files
//! (checkpoints, beam data, embeddings, annotation files, a replay file):
//! hundreds of megabytes to gigabytes, hashed on every run. A rerun whose
//! inputs did not change pays that again for nothing. [`FileDigests`] keeps,
//! per file, the digest with the file's [`FileIdentity`] when it was hashed
//! (device, inode, size, modification and status-change times); a file
//! whose identity is unchanged is not read again. This is the check `git`,
//! `make` and `rsync` rely on. Writing a file changes its modification and
//! status-change times, and the status-change time cannot be set back by a
//! user (`touch -d` sets only the modification time), so an edited file is
//! hashed again.
//!
//! One case the identity cannot see: a file rewritten to the same size
//! within the timestamp granularity of its file system, right after it was
//! hashed. As git does for its index ("racy git"), a digest is remembered
//! only when the file's status-change time is at least
//! [`SETTLE`] older than the moment its hashing began; a newer file is hashed
//! again on the next run, and remembered then.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::tensor_io::{file_sha256, TensorIoError};

/// How much older than the start of its hashing a file's status-change time
/// must be for its digest to be remembered (covers file systems with
/// one-second timestamps).
pub const SETTLE: Duration = Duration::from_secs(2);

/// Identifies a file's current content without reading it: device, inode,
/// size, and the modification and status-change times (the status-change
/// time, unlike the modification time, cannot be set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_s: i64,
    mtime_ns: i64,
    ctime_s: i64,
    ctime_ns: i64,
}

impl FileIdentity {
    /// The identity of the regular file at `path` (`None`: missing, not a
    /// regular file, such as a pipe whose content the identity cannot
    /// describe, or not a Unix system; callers must then read the file).
    pub fn of(path: &Path) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            if !m.is_file() {
                return None;
            }
            Some(Self {
                dev: m.dev(),
                ino: m.ino(),
                len: m.size(),
                mtime_s: m.mtime(),
                mtime_ns: m.mtime_nsec(),
                ctime_s: m.ctime(),
                ctime_ns: m.ctime_nsec(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }

    /// The identity of the file at `path` for content keys (images):
    /// [`FileIdentity::of`] on Unix; elsewhere, the size and modification
    /// time only. `None`: missing or not a regular file.
    pub fn stamp(path: &Path) -> Option<Self> {
        #[cfg(unix)]
        {
            Self::of(path)
        }
        #[cfg(not(unix))]
        {
            let m = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            Some(Self {
                dev: 0,
                ino: 0,
                len: m.len(),
                mtime_s: mtime.as_secs() as i64,
                mtime_ns: mtime.subsec_nanos() as i64,
                ctime_s: 0,
                ctime_ns: 0,
            })
        }
    }

    /// Adds every field of the identity to a content key.
    pub fn add_to(&self, h: &mut super::KeyHasher) {
        h.u64(self.dev)
            .u64(self.ino)
            .u64(self.len)
            .u64(self.mtime_s as u64)
            .u64(self.mtime_ns as u64)
            .u64(self.ctime_s as u64)
            .u64(self.ctime_ns as u64);
    }

    /// The status-change time as a point in time (`None` before 1970).
    fn changed_at(&self) -> Option<SystemTime> {
        let s = u64::try_from(self.ctime_s).ok()?;
        let ns = u32::try_from(self.ctime_ns).ok()?;
        UNIX_EPOCH.checked_add(Duration::new(s, ns))
    }
}

/// A remembered digest: the file's identity when it was hashed, and the
/// lowercase hex SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDigest {
    /// The file's identity when it was hashed.
    pub identity: FileIdentity,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// The SHA-256 digests of a run's input files: those remembered by earlier
/// runs (served while the file's identity is unchanged) and those computed
/// in this run (to be remembered; see [`FileDigests::fresh`]). Shared by the
/// threads that load inputs.
#[derive(Debug, Default)]
pub struct FileDigests {
    known: HashMap<PathBuf, StoredDigest>,
    fresh: Mutex<BTreeMap<PathBuf, StoredDigest>>,
    served: std::sync::atomic::AtomicU64,
}

impl FileDigests {
    /// Digests remembered earlier, by absolute path.
    pub fn with_known(known: HashMap<PathBuf, StoredDigest>) -> Self {
        Self {
            known,
            ..Self::default()
        }
    }

    /// The lowercase hex SHA-256 of the file at `path`: the remembered one
    /// when the file's identity is the one it was hashed with, else read and
    /// hashed now (and remembered, see the module documentation).
    pub fn sha256(&self, path: &Path) -> Result<String, TensorIoError> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let before = FileIdentity::of(path);
        if let (Some(id), Some(stored)) = (before, self.known.get(&key)) {
            if stored.identity == id {
                self.served
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(stored.sha256.clone());
            }
        }
        if let (Some(id), Ok(fresh)) = (before, self.fresh.lock()) {
            // Hashed earlier in this run (another input names the same file).
            if let Some(stored) = fresh.get(&key).filter(|s| s.identity == id) {
                return Ok(stored.sha256.clone());
            }
        }
        let started = SystemTime::now();
        let sha256 = file_sha256(path)?;
        // Remember it only when the file did not change while it was read
        // and had settled before (see the module documentation).
        let after = FileIdentity::of(path);
        if let Some(id) = before.filter(|id| Some(*id) == after) {
            let settled = id
                .changed_at()
                .and_then(|t| t.checked_add(SETTLE))
                .is_some_and(|t| t <= started);
            if settled {
                let stored = StoredDigest {
                    identity: id,
                    sha256: sha256.clone(),
                };
                if let Ok(mut fresh) = self.fresh.lock() {
                    fresh.insert(key, stored);
                }
            }
        }
        Ok(sha256)
    }

    /// The digest of `path` remembered by an earlier run, when the file's
    /// identity is still the one it was hashed with; `None` otherwise. Never
    /// reads the file (for caches that are worth using only when their key
    /// costs nothing, such as the dataset snapshot).
    pub fn remembered(&self, path: &Path) -> Option<String> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let id = FileIdentity::of(path)?;
        self.known
            .get(&key)
            .filter(|stored| stored.identity == id)
            .map(|stored| stored.sha256.clone())
    }

    /// Digests computed by this run that may be remembered (files whose
    /// identity was stable), by absolute path.
    pub fn fresh(&self) -> Vec<(PathBuf, StoredDigest)> {
        match self.fresh.lock() {
            Ok(f) => f.iter().map(|(p, d)| (p.clone(), d.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// How many digests were served without reading the file.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn hash_of(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    #[test]
    fn a_known_digest_is_served_while_the_identity_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, b"first").unwrap();
        let id = FileIdentity::of(&path).unwrap();
        let abs = std::path::absolute(&path).unwrap();
        // A remembered digest that is deliberately not the content's: being
        // served proves the file was not read.
        let known = HashMap::from([(
            abs.clone(),
            StoredDigest {
                identity: id,
                sha256: "remembered".into(),
            },
        )]);
        let digests = FileDigests::with_known(known.clone());
        assert_eq!(digests.sha256(&path).unwrap(), "remembered");
        assert_eq!(digests.served(), 1);
        assert!(digests.fresh().is_empty());
        assert_eq!(digests.remembered(&path).as_deref(), Some("remembered"));
        assert_eq!(digests.remembered(&dir.path().join("none")), None);

        // Rewritten with the same size: new times, so it is read again. (Its
        // modification time set apart explicitly: a rewrite within the file
        // system's timestamp granularity could keep the old one.)
        std::fs::write(&path, b"secnd").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000_000))
            .unwrap();
        let digests = FileDigests::with_known(known.clone());
        assert_eq!(digests.remembered(&path), None, "another identity");
        assert_eq!(digests.sha256(&path).unwrap(), hash_of(b"secnd"));
        assert_eq!(digests.served(), 0);
        // Just written: not settled, so not remembered.
        assert!(digests.fresh().is_empty());

        // Appended to, and replaced by another file (new inode).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"!").unwrap();
        drop(f);
        let digests = FileDigests::with_known(known.clone());
        assert_eq!(digests.sha256(&path).unwrap(), hash_of(b"secnd!"));
        let other = dir.path().join("b.bin");
        std::fs::write(&other, b"first").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let digests = FileDigests::with_known(known);
        assert_eq!(digests.sha256(&path).unwrap(), hash_of(b"first"));

        let missing = FileDigests::default();
        assert!(missing.sha256(&dir.path().join("none")).is_err());
        // Only regular files have an identity.
        assert!(FileIdentity::of(dir.path()).is_none());
        assert!(FileIdentity::of(&path).is_some());
    }

    #[test]
    fn settled_files_are_remembered_and_then_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.bin");
        std::fs::write(&path, b"content").unwrap();
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        let digests = FileDigests::default();
        assert_eq!(digests.sha256(&path).unwrap(), hash_of(b"content"));
        let fresh = digests.fresh();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].0, std::path::absolute(&path).unwrap());
        assert_eq!(fresh[0].1.sha256, hash_of(b"content"));
        let next = FileDigests::with_known(fresh.into_iter().collect());
        assert_eq!(next.sha256(&path).unwrap(), hash_of(b"content"));
        assert_eq!(next.served(), 1);
    }
}
