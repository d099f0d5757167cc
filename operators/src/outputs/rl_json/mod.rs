//! The original project's JSON output: one object
//! `{"<query_idx>": record, ..., "_meta": meta}`.
//!
//! Queries are written in strictly ascending numeric index order, candidates
//! in the order given, and `_meta` last because it holds counts and timings
//! known only at the end.  JSON object key order carries no meaning for the
//! readers (the original reader walks the keys and skips the non-numeric
//! ones; [`read_rl_json`] accepts any order).  Output is compact by default;
//! floats use serde_json's shortest round-trip formatting (non-finite floats
//! become `null`).  Writes go through an [`AtomicFile`].

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use leverflow_schemas::{RlRecord, META_KEY};
use serde_json::Value;

use crate::outputs::{AtomicFile, SealedFile, SinkError};

pub mod lazy;
pub mod scan;

pub use lazy::{LazyRecords, RecordError};
pub use scan::{line_column, scan_object, ScannedEntry};

/// Options of [`JsonSink`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonOptions {
    /// Indent with two spaces (like the original's `json.dump(indent=2)`)
    /// instead of compact output.
    pub pretty: bool,
}

/// Streaming writer of the JSON output.
pub struct JsonSink {
    out: AtomicFile,
    path: PathBuf,
    options: JsonOptions,
    last: Option<u64>,
    buf: Vec<u8>,
    /// Bytes written so far.
    written: u64,
    /// Offset of the last record entry written (after its separator).
    last_entry_start: u64,
}

/// A position in a [`JsonSink`]'s output (see [`JsonSink::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonMark {
    last: Option<u64>,
    written: u64,
    last_entry_start: u64,
}

impl JsonSink {
    /// Opens the output (a temporary file until [`JsonSink::finish`]).
    pub fn create(path: impl AsRef<Path>, options: JsonOptions) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let mut out = AtomicFile::create(&path)?;
        out.write_all(b"{")
            .map_err(|e| SinkError::io(&path, "writing", e))?;
        Ok(JsonSink {
            out,
            path,
            options,
            last: None,
            buf: Vec::with_capacity(4096),
            written: 1,
            last_entry_start: 1,
        })
    }

    /// Writes `self.buf`, whose entry starts at `entry_at` (after the
    /// separator), and counts the bytes.
    fn put_buf(&mut self, entry_at: usize) -> Result<(), SinkError> {
        self.out
            .write_all(&self.buf)
            .map_err(|e| SinkError::io(&self.path, "writing", e))?;
        self.last_entry_start = self.written + entry_at as u64;
        self.written += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes written so far: after the last record, the end of its entry.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Where the last record's entry (`"<idx>": record`, pretty output's
    /// newline and indent included) starts in the file, after the `,` that
    /// separates it from the previous one. With [`JsonSink::bytes_written`]
    /// it delimits a run of entries that [`JsonSink::append_entries`] can
    /// copy into a later output.
    pub fn last_entry_start(&self) -> u64 {
        self.last_entry_start
    }

    /// [`JsonSink::append_entries`] from bytes `range` of `src` (an earlier
    /// output of the same options), copied without passing through memory
    /// where the system allows.
    pub fn append_entries_from(
        &mut self,
        first_query: u64,
        last_query: u64,
        src: &File,
        range: std::ops::Range<u64>,
    ) -> Result<std::ops::Range<u64>, SinkError> {
        self.check_follows(first_query, last_query)?;
        if self.last.is_some() {
            self.out
                .write_all(b",")
                .map_err(|e| SinkError::io(&self.path, "writing", e))?;
            self.written += 1;
        }
        let start = self.written;
        let len = range.end.saturating_sub(range.start);
        self.out
            .copy_range_from(src, range.start, len)
            .map_err(|e| SinkError::io(&self.path, "copying entries of the previous output", e))?;
        self.written += len;
        self.last_entry_start = start;
        self.last = Some(last_query);
        Ok(start..self.written)
    }

    /// Where the sink stands now, to come back to with [`JsonSink::rollback`].
    pub fn mark(&self) -> JsonMark {
        JsonMark {
            last: self.last,
            written: self.written,
            last_entry_start: self.last_entry_start,
        }
    }

    /// Drops everything written after `mark` (taken from this sink): the
    /// file is cut back and writing continues from there as if nothing had
    /// followed it.
    pub fn rollback(&mut self, mark: JsonMark) -> Result<(), SinkError> {
        if mark.written > self.written {
            return Err(SinkError::invalid(
                &self.path,
                "internal error: rollback to a mark ahead of the output",
            ));
        }
        self.out
            .truncate(mark.written)
            .map_err(|e| SinkError::io(&self.path, "cutting back", e))?;
        self.last = mark.last;
        self.written = mark.written;
        self.last_entry_start = mark.last_entry_start;
        Ok(())
    }

    /// Starts writing what the sink has produced so far to disk (see
    /// [`AtomicFile::start_writeback`]); call between segments.
    pub fn start_writeback(&mut self) -> Result<(), SinkError> {
        self.out
            .start_writeback()
            .map_err(|e| SinkError::io(&self.path, "writing", e))
    }

    fn check_follows(&self, first_query: u64, last_query: u64) -> Result<(), SinkError> {
        if self.last.is_some_and(|l| first_query <= l) || last_query < first_query {
            return Err(SinkError::invalid(
                &self.path,
                format!(
                    "copied queries {first_query}..={last_query} do not follow query {:?}",
                    self.last
                ),
            ));
        }
        Ok(())
    }

    /// Appends already serialised entries (a byte range of an earlier output
    /// of the same options, from one entry's start to another's end) for
    /// queries `first_query..=last_query`, which must follow every query
    /// written so far. Returns the range they occupy in this file.
    pub fn append_entries(
        &mut self,
        first_query: u64,
        last_query: u64,
        entries: &[u8],
    ) -> Result<std::ops::Range<u64>, SinkError> {
        self.check_follows(first_query, last_query)?;
        if self.last.is_some() {
            self.out
                .write_all(b",")
                .map_err(|e| SinkError::io(&self.path, "writing", e))?;
            self.written += 1;
        }
        let start = self.written;
        self.out
            .write_all(entries)
            .map_err(|e| SinkError::io(&self.path, "writing", e))?;
        self.written += entries.len() as u64;
        self.last_entry_start = start;
        self.last = Some(last_query);
        Ok(start..self.written)
    }

    /// Serialises `value` into `self.buf` as `"key": value` (preceded by the
    /// separator for entry number > 0).
    fn entry<T: serde::Serialize>(&mut self, key: &str, value: &T) -> Result<(), SinkError> {
        self.buf.clear();
        // Records always precede `_meta`, so the first entry is the one
        // written while no record has been.
        if self.last.is_some() {
            self.buf.push(b',');
        }
        let entry_at = self.buf.len();
        let what = || format!("serialising key {key:?}");
        if self.options.pretty {
            self.buf.extend_from_slice(b"\n  ");
            serde_json::to_writer(&mut self.buf, key)
                .map_err(|e| SinkError::json(&self.path, what(), e))?;
            self.buf.extend_from_slice(b": ");
            let pretty = serde_json::to_vec_pretty(value)
                .map_err(|e| SinkError::json(&self.path, what(), e))?;
            // Strings never hold a raw newline (JSON escapes it), so indenting
            // after every newline nests the value one level.
            for &b in &pretty {
                self.buf.push(b);
                if b == b'\n' {
                    self.buf.extend_from_slice(b"  ");
                }
            }
        } else {
            serde_json::to_writer(&mut self.buf, key)
                .map_err(|e| SinkError::json(&self.path, what(), e))?;
            self.buf.push(b':');
            serde_json::to_writer(&mut self.buf, value)
                .map_err(|e| SinkError::json(&self.path, what(), e))?;
        }
        self.put_buf(entry_at)
    }

    /// Writes the record of `query_index` (strictly greater than the previous
    /// one, and equal to `record.query.query_id`: the original reader uses the
    /// key as the query's dataset index).
    pub fn write_record(&mut self, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
        crate::outputs::check_next(&self.path, self.last, query_index, record)?;
        self.entry(&query_index.to_string(), record)?;
        self.last = Some(query_index);
        Ok(())
    }

    /// Writes the record of `query_index` from its compact serialised JSON
    /// `bytes` (which must be `serde_json::to_vec(record)`), skipping a second
    /// serialisation; with `pretty` output it re-serialises instead.
    pub fn write_serialised(
        &mut self,
        query_index: u64,
        record: &RlRecord,
        bytes: &[u8],
    ) -> Result<(), SinkError> {
        if self.options.pretty {
            return self.write_record(query_index, record);
        }
        crate::outputs::check_next(&self.path, self.last, query_index, record)?;
        self.buf.clear();
        if self.last.is_some() {
            self.buf.push(b',');
        }
        let entry_at = self.buf.len();
        self.buf.push(b'"');
        self.buf
            .extend_from_slice(query_index.to_string().as_bytes());
        self.buf.extend_from_slice(b"\":");
        self.buf.extend_from_slice(bytes);
        self.put_buf(entry_at)?;
        self.last = Some(query_index);
        Ok(())
    }

    /// Writes `"_meta": meta`, closes the object and moves the file into place.
    /// `meta` must be a JSON object.
    pub fn finish(self, meta: &Value) -> Result<(), SinkError> {
        self.seal(meta)?.publish()
    }

    /// Like [`JsonSink::finish`], but leaves the complete, fsynced file under
    /// its temporary name until [`SealedFile::publish`].
    pub fn seal(mut self, meta: &Value) -> Result<SealedFile, SinkError> {
        crate::outputs::check_meta(&self.path, meta)?;
        self.entry(META_KEY, meta)?;
        let end: &[u8] = if self.options.pretty {
            b"\n}\n"
        } else {
            b"}\n"
        };
        self.out
            .write_all(end)
            .map_err(|e| SinkError::io(&self.path, "writing", e))?;
        self.out.seal()
    }
}

/// Streaming reader of an RL JSON file: an iterator over the records
/// `(query index, record)` in file order, holding one record's bytes at a
/// time.  `_meta` is kept aside wherever it appears ([`RlJsonReader::meta`]
/// is complete once the iterator has ended); other non-numeric keys are
/// skipped, as the original reader does.  After an error the iterator ends.
pub struct RlJsonReader<R: BufRead = BufReader<File>> {
    reader: R,
    path: PathBuf,
    offset: u64,
    state: ReadState,
    meta: Option<Value>,
    key: Vec<u8>,
    value: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Start,
    Entries { first: bool },
    Done,
}

impl RlJsonReader<BufReader<File>> {
    /// Opens `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| SinkError::io(path, "opening", e))?;
        Ok(Self::new(BufReader::with_capacity(1 << 20, file), path))
    }
}

impl<R: BufRead> RlJsonReader<R> {
    /// Reads from `reader`; `path` names the source in errors.
    pub fn new(reader: R, path: impl AsRef<Path>) -> Self {
        RlJsonReader {
            reader,
            path: path.as_ref().to_path_buf(),
            offset: 0,
            state: ReadState::Start,
            meta: None,
            key: Vec::new(),
            value: Vec::new(),
        }
    }

    /// `_meta`, once read.
    pub fn meta(&self) -> Option<&Value> {
        self.meta.as_ref()
    }

    /// Consumes the reader, returning `_meta` (if it was read).
    pub fn into_meta(self) -> Option<Value> {
        self.meta
    }

    fn err(&self, what: impl fmt::Display) -> SinkError {
        SinkError::invalid(&self.path, format!("byte {}: {what}", self.offset))
    }

    fn peek(&mut self) -> Result<Option<u8>, SinkError> {
        match self.reader.fill_buf() {
            Ok(buf) => Ok(buf.first().copied()),
            Err(e) => Err(SinkError::io(&self.path, "reading", e)),
        }
    }

    fn bump(&mut self) {
        self.reader.consume(1);
        self.offset += 1;
    }

    /// The next byte, consumed; end of file is an error.
    fn next_byte(&mut self) -> Result<u8, SinkError> {
        match self.peek()? {
            Some(b) => {
                self.bump();
                Ok(b)
            }
            None => Err(self.err("unexpected end of file")),
        }
    }

    fn skip_ws(&mut self) -> Result<(), SinkError> {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek()? {
            self.bump();
        }
        Ok(())
    }

    fn expect(&mut self, want: u8) -> Result<(), SinkError> {
        let got = self.next_byte()?;
        if got != want {
            return Err(self.err(format!(
                "expected {:?}, found {:?}",
                want as char, got as char
            )));
        }
        Ok(())
    }

    /// Appends a JSON string (quotes included) at the cursor to `out`.
    fn read_string(&mut self, out: &mut Vec<u8>) -> Result<(), SinkError> {
        self.expect(b'"')?;
        out.push(b'"');
        loop {
            let b = self.next_byte()?;
            out.push(b);
            match b {
                b'"' => return Ok(()),
                b'\\' => out.push(self.next_byte()?),
                _ => {}
            }
        }
    }

    /// Appends the raw bytes of one JSON value at the cursor to `out`
    /// (syntax is checked later, when the bytes are parsed).
    fn read_value(&mut self, out: &mut Vec<u8>) -> Result<(), SinkError> {
        match self.peek()? {
            None => Err(self.err("unexpected end of file")),
            Some(b'"') => self.read_string(out),
            Some(b'{' | b'[') => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        Some(b'"') => self.read_string(out)?,
                        Some(b) => {
                            self.bump();
                            out.push(b);
                            match b {
                                b'{' | b'[' => depth += 1,
                                b'}' | b']' => {
                                    depth -= 1;
                                    if depth == 0 {
                                        return Ok(());
                                    }
                                }
                                _ => {}
                            }
                        }
                        None => return Err(self.err("unexpected end of file inside a value")),
                    }
                }
            }
            Some(_) => {
                while let Some(b) = self.peek()? {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.bump();
                    out.push(b);
                }
                Ok(())
            }
        }
    }

    fn step(&mut self) -> Result<Option<(u64, RlRecord)>, SinkError> {
        loop {
            match self.state {
                ReadState::Done => return Ok(None),
                ReadState::Start => {
                    self.skip_ws()?;
                    self.expect(b'{')?;
                    self.state = ReadState::Entries { first: true };
                }
                ReadState::Entries { first } => {
                    self.skip_ws()?;
                    if self.peek()? == Some(b'}') {
                        self.bump();
                        self.skip_ws()?;
                        if self.peek()?.is_some() {
                            return Err(self.err("content after the top-level object"));
                        }
                        self.state = ReadState::Done;
                        return Ok(None);
                    }
                    if !first {
                        self.expect(b',')?;
                        self.skip_ws()?;
                    }
                    let mut key = std::mem::take(&mut self.key);
                    let mut value = std::mem::take(&mut self.value);
                    key.clear();
                    value.clear();
                    let result = self.entry(&mut key, &mut value);
                    self.key = key;
                    self.value = value;
                    self.state = ReadState::Entries { first: false };
                    if let Some(item) = result? {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }

    /// Reads one `"key": value` entry; returns the record for a numeric key.
    fn entry(
        &mut self,
        key: &mut Vec<u8>,
        value: &mut Vec<u8>,
    ) -> Result<Option<(u64, RlRecord)>, SinkError> {
        self.read_string(key)?;
        let key: String = serde_json::from_slice(key)
            .map_err(|e| SinkError::json(&self.path, format!("byte {}: key", self.offset), e))?;
        self.skip_ws()?;
        self.expect(b':')?;
        self.skip_ws()?;
        let start = self.offset;
        self.read_value(value)?;
        if key == META_KEY {
            let meta = serde_json::from_slice(value).map_err(|e| {
                SinkError::json(&self.path, format!("\"{META_KEY}\" at byte {start}"), e)
            })?;
            self.meta = Some(meta);
            return Ok(None);
        }
        let Ok(index) = key.parse::<u64>() else {
            return Ok(None);
        };
        let record = serde_json::from_slice(value).map_err(|e| {
            SinkError::json(&self.path, format!("record \"{key}\" at byte {start}"), e)
        })?;
        Ok(Some((index, record)))
    }
}

impl<R: BufRead> Iterator for RlJsonReader<R> {
    type Item = Result<(u64, RlRecord), SinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(item) => item.map(Ok),
            Err(e) => {
                self.state = ReadState::Done;
                Some(Err(e))
            }
        }
    }
}

/// Streams an RL JSON file: calls `on_record(query_index, record)` for each
/// numeric key in file order and returns `_meta` (if present).
pub fn visit_rl_json<F>(
    path: impl AsRef<Path>,
    mut on_record: F,
) -> Result<Option<Value>, SinkError>
where
    F: FnMut(u64, RlRecord) -> Result<(), SinkError>,
{
    let mut reader = RlJsonReader::open(path)?;
    for item in reader.by_ref() {
        let (index, record) = item?;
        on_record(index, record)?;
    }
    Ok(reader.into_meta())
}

/// A whole RL JSON file: `_meta` (if present) and the `(query index, record)` pairs.
pub type RlJson = (Option<Value>, Vec<(u64, RlRecord)>);

/// Reads a whole RL JSON file: `(_meta, records in file order)`.  A query
/// index that appears twice is an error.
pub fn read_rl_json(path: impl AsRef<Path>) -> Result<RlJson, SinkError> {
    let path = path.as_ref();
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let meta = visit_rl_json(path, |idx, rec| {
        if !seen.insert(idx) {
            return Err(SinkError::invalid(
                path,
                format!("query key \"{idx}\" appears twice"),
            ));
        }
        records.push((idx, rec));
        Ok(())
    })?;
    Ok((meta, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use leverflow_schemas::{CandidateRecord, PointerLayout, QueryRecord};
    use serde_json::json;

    fn record(i: u64) -> RlRecord {
        let mut c =
            CandidateRecord::new(&[1, 2], &[21, 22], PointerLayout::PerQueryPool, "beam", 0.1)
                .unwrap();
        c.beam_rank = Some(0);
        c.beam_score = Some(1.0 / 3.0);
        RlRecord {
            query: QueryRecord {
                query_id: i,
                question_id: Some(i + 100),
                image_id: Some(7),
                question: Some("line1\nline2 \"quoted\" ü {curly} [sq] \\\" end".into()),
                gt_answers_raw: Some(vec!["x".into()]),
                gt_answers_norm: Some(vec!["x".into()]),
            },
            candidate_pool_ids: Some(vec![20, 21, 22]),
            pointer_candidates: vec![c],
        }
    }

    #[test]
    fn compact_layout_and_meta_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rl.json");
        let mut sink = JsonSink::create(&path, JsonOptions::default()).unwrap();
        sink.write_record(2, &record(2)).unwrap();
        sink.write_record(10, &record(10)).unwrap();
        assert!(!path.exists());
        sink.finish(&json!({"n_queries": 2, "elapsed_s": 0.5}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let r2 = serde_json::to_string(&record(2)).unwrap();
        let r10 = serde_json::to_string(&record(10)).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"2\":{r2},\"10\":{r10},\"_meta\":{{\"n_queries\":2,\"elapsed_s\":0.5}}}}\n"
            )
        );
        assert!(
            text.contains("0.3333333333333333"),
            "shortest round-trip float"
        );
        let (meta, recs) = read_rl_json(&path).unwrap();
        assert_eq!(meta.unwrap()["n_queries"], 2);
        assert_eq!(recs, vec![(2, record(2)), (10, record(10))]);
    }

    #[test]
    fn pretty_output_parses_to_the_same_value() {
        let dir = tempfile::tempdir().unwrap();
        let compact = dir.path().join("a.json");
        let pretty = dir.path().join("b.json");
        for (p, o) in [(&compact, false), (&pretty, true)] {
            let mut sink = JsonSink::create(p, JsonOptions { pretty: o }).unwrap();
            for i in [0u64, 1, 5] {
                sink.write_record(i, &record(i)).unwrap();
            }
            sink.finish(&json!({"a": [1, 2]})).unwrap();
        }
        let a: Value = serde_json::from_str(&std::fs::read_to_string(&compact).unwrap()).unwrap();
        let text = std::fs::read_to_string(&pretty).unwrap();
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(a, b);
        assert!(
            text.starts_with("{\n  \"0\": {\n    \"query\": {\n      \"query_id\": 0,"),
            "{text}"
        );
        assert!(
            text.ends_with("\n  \"_meta\": {\n    \"a\": [\n      1,\n      2\n    ]\n  }\n}\n"),
            "{text}"
        );
    }

    #[test]
    fn empty_output_has_only_meta() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.json");
        JsonSink::create(&path, JsonOptions::default())
            .unwrap()
            .finish(&json!({}))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"_meta\":{}}\n");
        let (meta, recs) = read_rl_json(&path).unwrap();
        assert_eq!(meta, Some(json!({})));
        assert!(recs.is_empty());
    }

    #[test]
    fn out_of_order_writes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.json");
        let mut sink = JsonSink::create(&path, JsonOptions::default()).unwrap();
        sink.write_record(3, &record(3)).unwrap();
        assert!(matches!(
            sink.write_record(3, &record(3)),
            Err(SinkError::OutOfOrder {
                index: 3,
                previous: 3,
                ..
            })
        ));
        assert!(sink.write_record(1, &record(1)).is_err());
        drop(sink);
        assert!(!path.exists());
    }

    #[test]
    fn reader_accepts_original_style_files() {
        // Meta first, an unknown non-numeric key, extra candidate keys, pretty-printed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orig.json");
        let v = json!({
            "_meta": {"created_at": "x"},
            "notes": [1, 2],
            "4": {"query": {"query_id": 4, "question_id": "4001", "image_id": 9, "question": "q",
                            "gt_answers_raw": ["a"], "gt_answers_norm": ["a"]},
                  "pointer_candidates": [{"pointer": [20, 21], "pointer_pos": [0, 1],
                      "gen_method": "beam", "beam_score": 0.5, "logprob_score": -1.0,
                      "vqa_prompt_len": 3, "eval_split_used": null}]}
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let (meta, recs) = read_rl_json(&path).unwrap();
        assert_eq!(meta.unwrap()["created_at"], "x");
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].0, 4);
        assert_eq!(recs[0].1.query.question_id, Some(4001));
        assert_eq!(
            recs[0].1.pointer_candidates[0].pointer_pos,
            Some(vec![0, 1])
        );
    }

    #[test]
    fn streaming_reader_yields_records_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut sink = JsonSink::create(&path, JsonOptions { pretty: true }).unwrap();
        for i in [1u64, 4, 9] {
            sink.write_record(i, &record(i)).unwrap();
        }
        sink.finish(&json!({"n": 3, "s": "}{"})).unwrap();
        let mut reader = RlJsonReader::open(&path).unwrap();
        let first = reader.next().unwrap().unwrap();
        assert_eq!(first, (1, record(1)));
        assert!(reader.meta().is_none(), "meta comes last in our files");
        let rest: Vec<u64> = reader.by_ref().map(|r| r.unwrap().0).collect();
        assert_eq!(rest, [4, 9]);
        assert_eq!(reader.into_meta(), Some(json!({"n": 3, "s": "}{"})));

        // Meta first, scalar values under unknown keys, whitespace everywhere.
        let text = " {\"_meta\" : {\"a\":[1,{\"b\":\"]\"}]} , \"x\": -1.5e3 ,\"y\":true,\"z\":\"s\\\"\", \"2\" :"
            .to_string()
            + &serde_json::to_string(&record(2)).unwrap()
            + " } \n";
        let reader = RlJsonReader::new(text.as_bytes(), "inline");
        let items: Vec<_> = reader.map(Result::unwrap).collect();
        assert_eq!(items, vec![(2, record(2))]);

        // Truncated input: an error naming the place, then the iterator ends.
        let full = std::fs::read_to_string(&path).unwrap();
        let cut = &full[..full.len() / 2];
        let mut reader = RlJsonReader::new(cut.as_bytes(), "cut.json");
        let mut errors = 0;
        for item in reader.by_ref() {
            if let Err(e) = item {
                assert!(e.to_string().contains("cut.json"), "{e}");
                errors += 1;
            }
        }
        assert_eq!(errors, 1);
        assert!(reader.next().is_none());
        // Trailing comma and missing comma are errors.
        for bad in ["{\"_meta\":{},}", "{\"_meta\":{} \"x\":1}", "[]", ""] {
            let r = RlJsonReader::new(bad.as_bytes(), "bad");
            assert!(r.into_iter().any(|i| i.is_err()), "{bad:?}");
        }
    }

    #[test]
    fn reader_errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(
            &path,
            r#"{"7": {"query": {"query_id": 7}, "pointer_candidates": 5}}"#,
        )
        .unwrap();
        let err = read_rl_json(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("record \"7\""),
            "{err}"
        );
        std::fs::write(&path, r#"{"1": {"query": {"query_id": 1, "question_id": 1, "image_id": 1, "question": "", "gt_answers_raw": [], "gt_answers_norm": []}, "pointer_candidates": []}, "1": {"query": {"query_id": 1, "question_id": 1, "image_id": 1, "question": "", "gt_answers_raw": [], "gt_answers_norm": []}, "pointer_candidates": []}}"#).unwrap();
        let err = read_rl_json(&path).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
        std::fs::write(&path, r#"{"_meta": {}} x"#).unwrap();
        assert!(read_rl_json(&path).is_err());
    }
}
