//! A binary snapshot of a parsed training split (the dataset and its
//! official scoring index), kept in a run's state directory so that a rerun
//! on unchanged annotation files does not parse them again.
//!
//! Parsing VQAv2-sized question and annotation files (tens of megabytes of
//! JSON) is the longest step of loading a rerun; decoding the same records
//! from postcard takes a fraction of that. The snapshot is a cache and never
//! an input: it is used only when its [`snapshot_key`] (the content digests
//! of the files, every setting the parse reads, and the leverflow version)
//! is the one the run would parse with, and anything wrong with it (missing,
//! another key, truncated, undecodable) means "parse the files".
//!
//! File layout: [`MAGIC`], the 32-byte key, the body length (u64 LE), then
//! the postcard of `(VqaDataset, Option<ScoringIndex>)`. It is written under
//! a temporary name and renamed into place, so a reader never sees half of
//! one.

use std::io::Write;
use std::path::Path;

use super::{Key, KeyHasher};
use crate::accuracy::ScoringIndex;
use crate::dataset::{DatasetConfig, VqaDataset};
use crate::outputs::{AtomicFile, SinkError};

/// The snapshot's file name inside a state directory.
pub const SNAPSHOT_FILE: &str = "dataset.snapshot";

/// The first bytes of a snapshot file (format version in the last two).
pub const MAGIC: &[u8; 8] = b"LVFDS\x00\x01\n";

/// A parsed split: the dataset and, when the run scores answers against the
/// same files, their official scoring index.
pub type ParsedSplit = (VqaDataset, Option<ScoringIndex>);

/// The key of the parse of `cfg`: `questions_sha256` / `annotations_sha256`
/// are the SHA-256 digests of `cfg.questions` / `cfg.annotations`;
/// `with_scoring` says whether the scoring index is part of it.
pub fn snapshot_key(
    cfg: &DatasetConfig,
    with_scoring: bool,
    questions_sha256: Option<&str>,
    annotations_sha256: &str,
) -> Key {
    let mut h = KeyHasher::new("leverflow/dataset-snapshot/v1");
    h.str(env!("CARGO_PKG_VERSION"))
        .str(cfg.kind.name())
        .u64(with_scoring as u64)
        .opt_str(
            cfg.questions
                .as_deref()
                .map(|p| p.to_string_lossy())
                .as_deref(),
        )
        .opt_str(questions_sha256)
        .str(&cfg.annotations.to_string_lossy())
        .str(annotations_sha256)
        .str(&cfg.image_root.to_string_lossy())
        .str(&cfg.image_pattern);
    h.finish()
}

/// Writes the snapshot of a parse with key `key` to `path` (atomically).
pub fn write_snapshot(
    path: &Path,
    key: &Key,
    dataset: &VqaDataset,
    index: Option<&ScoringIndex>,
) -> Result<(), SinkError> {
    let body = postcard::to_stdvec(&(dataset, index))
        .map_err(|e| SinkError::invalid(path, format!("cannot encode the dataset: {e}")))?;
    let mut file = AtomicFile::create(path)?;
    let io = |e| SinkError::io(path, "writing the dataset snapshot", e);
    file.write_all(MAGIC).map_err(io)?;
    file.write_all(key).map_err(io)?;
    file.write_all(&(body.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&body).map_err(io)?;
    file.finish()
}

/// Why a snapshot was not used (for the debug log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotMiss {
    /// There is none.
    Missing,
    /// It was made from other files or settings.
    OtherKey,
    /// It is damaged or from another format version.
    Unreadable(String),
}

/// Reads the snapshot at `path` if it was made with `key`.
pub fn read_snapshot(path: &Path, key: &Key) -> Result<ParsedSplit, SnapshotMiss> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SnapshotMiss::Missing),
        Err(e) => return Err(SnapshotMiss::Unreadable(e.to_string())),
    };
    let head = MAGIC.len() + 32 + 8;
    if bytes.len() < head || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotMiss::Unreadable(
            "not a snapshot of this version".into(),
        ));
    }
    if &bytes[MAGIC.len()..MAGIC.len() + 32] != key {
        return Err(SnapshotMiss::OtherKey);
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[MAGIC.len() + 32..head]);
    let body = &bytes[head..];
    if u64::from_le_bytes(len) != body.len() as u64 {
        return Err(SnapshotMiss::Unreadable(format!(
            "body of {} bytes, header says {}",
            body.len(),
            u64::from_le_bytes(len)
        )));
    }
    postcard::from_bytes(body).map_err(|e| SnapshotMiss::Unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DatasetKind;

    /// A small official-style split on disk, and its config.
    fn split(dir: &Path) -> DatasetConfig {
        let q = dir.join("q.json");
        let a = dir.join("a.json");
        std::fs::write(
            &q,
            r#"{"questions": [
                {"question_id": 20, "image_id": 7, "question": "what color?"},
                {"question_id": 10, "image_id": 3, "question": "how many?"}]}"#,
        )
        .unwrap();
        let answers = |xs: &[&str]| {
            xs.iter()
                .enumerate()
                .map(|(i, x)| {
                    format!(
                        r#"{{"answer": "{x}", "answer_confidence": "yes", "answer_id": {}}}"#,
                        i + 1
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        std::fs::write(
            &a,
            format!(
                r#"{{"annotations": [
                {{"question_id": 20, "image_id": 7, "question_type": "what color", "answer_type": "other", "multiple_choice_answer": "red", "answers": [{}]}},
                {{"question_id": 10, "image_id": 3, "question_type": "how many", "answer_type": "number", "multiple_choice_answer": "2", "answers": [{}]}}]}}"#,
                answers(&["red", "red", "Red.", "blue"]),
                answers(&["2", "two", "2"])
            ),
        )
        .unwrap();
        DatasetConfig {
            kind: DatasetKind::Vqav2Local,
            questions: Some(q),
            annotations: a,
            image_root: dir.to_path_buf(),
            image_pattern: "COCO_train2014_{image_id:012d}.jpg".into(),
        }
    }

    #[test]
    fn a_snapshot_gives_back_the_parse_it_was_made_from() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = split(dir.path());
        let (dataset, index) = VqaDataset::load_with_scoring(&cfg).unwrap();
        let index = index.unwrap();
        let key = snapshot_key(&cfg, true, Some("qq"), "aa");
        let path = dir.path().join(SNAPSHOT_FILE);
        write_snapshot(&path, &key, &dataset, Some(&index)).unwrap();
        let (d2, i2) = read_snapshot(&path, &key).unwrap();
        assert_eq!(d2, dataset);
        assert_eq!(d2.len(), 2);
        let i2 = i2.unwrap();
        assert_eq!(i2.len(), index.len());
        assert_eq!(i2.questions_path(), index.questions_path());
        assert_eq!(i2.annotations_path(), index.annotations_path());
        for qid in [10, 20, 30] {
            assert_eq!(i2.types(qid), index.types(qid), "question {qid}");
        }
        // The restored index scores like the parsed one.
        let mut norm = crate::accuracy::Normalizer::default();
        for qid in [10, 20, 30] {
            for answer in ["red", "2", "two", "blue"] {
                assert_eq!(
                    i2.evaluate(qid, answer, &mut norm).map(f64::to_bits),
                    index.evaluate(qid, answer, &mut norm).map(f64::to_bits),
                    "question {qid}, answer {answer}"
                );
            }
        }
        assert!(i2.evaluate(20, "red", &mut norm).is_some_and(|a| a > 0.0));
    }

    #[test]
    fn another_key_or_a_damaged_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = split(dir.path());
        let dataset = VqaDataset::load(&cfg).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        assert_eq!(
            read_snapshot(&path, &[0; 32]).unwrap_err(),
            SnapshotMiss::Missing
        );
        let key = snapshot_key(&cfg, false, Some("qq"), "aa");
        write_snapshot(&path, &key, &dataset, None).unwrap();
        // Every input of the parse is part of the key.
        let mut other = cfg.clone();
        other.image_pattern = "{image_id}.png".into();
        for k in [
            snapshot_key(&cfg, true, Some("qq"), "aa"),
            snapshot_key(&cfg, false, Some("qq"), "ab"),
            snapshot_key(&cfg, false, None, "aa"),
            snapshot_key(&other, false, Some("qq"), "aa"),
        ] {
            assert_ne!(k, key);
            assert_eq!(
                read_snapshot(&path, &k).unwrap_err(),
                SnapshotMiss::OtherKey
            );
        }
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            read_snapshot(&path, &key).unwrap_err(),
            SnapshotMiss::Unreadable(_)
        ));
        let mut garbage = bytes.clone();
        let n = garbage.len();
        garbage[n - 40..].fill(0xff);
        std::fs::write(&path, &garbage).unwrap();
        assert!(read_snapshot(&path, &key).is_err());
    }
}
