//! Bounded-memory reordering of records: workers finish queries in any
//! order, but the outputs list them in ascending query index.  Each record is
//! serialised to a temporary spill file as it arrives; only
//! `query index → (offset, length)` stays in memory, and [`SortedSpill::finish`]
//! re-reads the records in ascending index order.  When records arrive
//! already in order the re-read is one sequential scan.

use std::collections::btree_map::{self, BTreeMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use leverflow_schemas::RlRecord;

use super::SinkError;

static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes its file when dropped.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Records spilled to disk, re-read in ascending query index by [`SortedSpill::finish`].
///
/// The spill file is `.leverflow-spill-<pid>-<n>` in the directory given to
/// [`SortedSpill::create`]; it is removed when the spill (or the iterator
/// returned by `finish`) is dropped.
#[derive(Debug)]
pub struct SortedSpill {
    file: RemoveOnDrop,
    writer: BufWriter<File>,
    offset: u64,
    index: BTreeMap<u64, (u64, u32)>,
    buf: Vec<u8>,
}

impl SortedSpill {
    /// Creates an empty spill file in `dir` (use the output's directory, so the
    /// spill lives on the same disk as the outputs).
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, SinkError> {
        let dir = dir.as_ref();
        let n = SPILL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".leverflow-spill-{}-{n}", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| SinkError::io(&path, "creating spill file", e))?;
        Ok(SortedSpill {
            file: RemoveOnDrop(path),
            writer: BufWriter::with_capacity(1 << 20, f),
            offset: 0,
            index: BTreeMap::new(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// The spill file's path.
    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// Appends `record` under `query_index`; a query index seen before is an error.
    pub fn push(&mut self, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let result = serde_json::to_writer(&mut buf, record)
            .map_err(|e| {
                SinkError::json(
                    &self.file.0,
                    format!("serialising record of query {query_index}"),
                    e,
                )
            })
            .and_then(|()| self.push_bytes(query_index, &buf));
        self.buf = buf;
        result
    }

    /// Appends an already serialised record (the JSON of an [`RlRecord`], as
    /// the dataflow's workers produce it in parallel) under `query_index`.
    pub fn push_bytes(&mut self, query_index: u64, bytes: &[u8]) -> Result<(), SinkError> {
        let path = &self.file.0;
        let btree_map::Entry::Vacant(slot) = self.index.entry(query_index) else {
            return Err(SinkError::DuplicateQuery {
                path: path.clone(),
                index: query_index,
            });
        };
        let len = u32::try_from(bytes.len()).map_err(|_| {
            SinkError::invalid(
                path,
                format!(
                    "record of query {query_index} is {} bytes, over the 4 GiB spill limit",
                    bytes.len()
                ),
            )
        })?;
        self.writer
            .write_all(bytes)
            .map_err(|e| SinkError::io(path, "appending to spill file", e))?;
        slot.insert((self.offset, len));
        self.offset += u64::from(len);
        Ok(())
    }

    /// Number of records pushed.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// True when `query_index` was pushed.
    pub fn contains(&self, query_index: u64) -> bool {
        self.index.contains_key(&query_index)
    }

    /// Flushes the spill and returns the records in ascending query index.
    pub fn finish(mut self) -> Result<SpillIter, SinkError> {
        let path = self.file.0.clone();
        self.writer
            .flush()
            .map_err(|e| SinkError::io(&path, "flushing spill file", e))?;
        let reader =
            File::open(&path).map_err(|e| SinkError::io(&path, "re-opening spill file", e))?;
        let len = self.index.len();
        Ok(SpillIter {
            reader: BufReader::with_capacity(1 << 20, reader),
            pos: 0,
            entries: std::mem::take(&mut self.index).into_iter(),
            remaining: len,
            buf: Vec::new(),
            file: self.file,
        })
    }
}

/// The records of a [`SortedSpill`] in ascending query index; removes the
/// spill file when dropped.
#[derive(Debug)]
pub struct SpillIter {
    reader: BufReader<File>,
    pos: u64,
    entries: btree_map::IntoIter<u64, (u64, u32)>,
    remaining: usize,
    buf: Vec<u8>,
    file: RemoveOnDrop,
}

impl SpillIter {
    fn read(&mut self, index: u64, offset: u64, len: u32) -> Result<RlRecord, SinkError> {
        let path = &self.file.0;
        if offset != self.pos {
            // seek_relative keeps the buffer for short forward jumps.
            let delta = i64::try_from(offset).unwrap_or(i64::MAX)
                - i64::try_from(self.pos).unwrap_or(i64::MAX);
            self.reader
                .seek_relative(delta)
                .or_else(|_| self.reader.seek(SeekFrom::Start(offset)).map(|_| ()))
                .map_err(|e| SinkError::io(path, "seeking in spill file", e))?;
        }
        self.buf.resize(len as usize, 0);
        self.reader
            .read_exact(&mut self.buf)
            .map_err(|e| SinkError::io(path, &format!("reading record of query {index}"), e))?;
        self.pos = offset + u64::from(len);
        serde_json::from_slice(&self.buf)
            .map_err(|e| SinkError::json(path, format!("re-reading record of query {index}"), e))
    }
}

/// A spilled record with its serialised JSON bytes.
pub type SpilledRecord = (u64, RlRecord, Vec<u8>);

impl SpillIter {
    /// Like [`Iterator::next`], also returning the record's serialised JSON
    /// exactly as it was pushed (so a JSON sink can copy it instead of
    /// serialising the record again).
    pub fn next_with_bytes(&mut self) -> Option<Result<SpilledRecord, SinkError>> {
        let (index, (offset, len)) = self.entries.next()?;
        self.remaining -= 1;
        Some(
            self.read(index, offset, len)
                .map(|r| (index, r, self.buf.clone())),
        )
    }
}

impl Iterator for SpillIter {
    type Item = Result<(u64, RlRecord), SinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (index, (offset, len)) = self.entries.next()?;
        self.remaining -= 1;
        Some(self.read(index, offset, len).map(|r| (index, r)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for SpillIter {}

#[cfg(test)]
mod tests {
    use super::*;
    use leverflow_schemas::{CandidateRecord, PointerLayout, QueryRecord};

    fn record(i: u64) -> RlRecord {
        let c = CandidateRecord::new(
            &[i % 7, i % 11 + 7],
            &[i % 7, i % 11 + 7],
            PointerLayout::SharedPool {
                positions_are_indices: true,
            },
            "beam",
            -(i as f64) / 3.0,
        )
        .unwrap();
        RlRecord {
            query: QueryRecord {
                query_id: i,
                question_id: i.wrapping_mul(1000).wrapping_add(5),
                image_id: i.wrapping_add(1),
                question: format!("question {i} \u{e9}\"\n"),
                gt_answers_raw: vec![format!("a{i}")],
                gt_answers_norm: vec![format!("a{i}")],
            },
            candidate_pool_ids: None,
            pointer_candidates: vec![c; (i % 4) as usize],
        }
    }

    fn spill_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".leverflow-spill-")
            })
            .count()
    }

    #[test]
    fn out_of_order_pushes_come_back_ascending() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SortedSpill::create(dir.path()).unwrap();
        // A fixed permutation of 0..500 (multiplicative: 7 is coprime with 500).
        let order: Vec<u64> = (0..500u64).map(|k| (k * 7 + 3) % 500).collect();
        for &i in &order {
            spill.push(i, &record(i)).unwrap();
        }
        assert_eq!(spill.len(), 500);
        assert!(spill.contains(42));
        let it = spill.finish().unwrap();
        assert_eq!(it.len(), 500);
        let got: Vec<(u64, RlRecord)> = it.map(Result::unwrap).collect();
        assert_eq!(got.len(), 500);
        for (k, (i, r)) in got.iter().enumerate() {
            assert_eq!(*i, k as u64);
            assert_eq!(r, &record(k as u64));
        }
    }

    #[test]
    fn in_order_pushes_and_sparse_indices() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SortedSpill::create(dir.path()).unwrap();
        let idx = [3u64, 10, 11, 1_000_000, u64::MAX];
        for &i in &idx {
            spill.push(i, &record(i)).unwrap();
        }
        let got: Vec<u64> = spill.finish().unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got, idx);
    }

    #[test]
    fn duplicate_index_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SortedSpill::create(dir.path()).unwrap();
        spill.push(5, &record(5)).unwrap();
        spill.push(2, &record(2)).unwrap();
        let err = spill.push(5, &record(5)).unwrap_err();
        assert!(
            matches!(err, SinkError::DuplicateQuery { index: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("query index 5"));
    }

    #[test]
    fn spill_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spill = SortedSpill::create(dir.path()).unwrap();
            spill.push(1, &record(1)).unwrap();
            assert_eq!(spill_files(dir.path()), 1);
        }
        assert_eq!(spill_files(dir.path()), 0);
        let mut spill = SortedSpill::create(dir.path()).unwrap();
        spill.push(1, &record(1)).unwrap();
        let mut it = spill.finish().unwrap();
        assert!(it.next().is_some());
        assert_eq!(spill_files(dir.path()), 1);
        drop(it);
        assert_eq!(spill_files(dir.path()), 0);
    }
}
