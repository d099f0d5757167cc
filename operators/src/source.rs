//! Beam-data reader: the records the pipeline starts from.
//!
//! The original project writes beam data as one JSON object
//! `{"<query_idx>": {"id_list": [[icd.., query_idx], ..], "score_list": [..], ..}, ..}`;
//! leverflow also accepts JSON Lines (one object per line, either
//! `{"<query_idx>": {..}}` or `{"query_idx": N, "id_list": .., "score_list": ..}`).
//!
//! # Streaming design
//! A beam file can be several gigabytes, so it is never loaded whole.  For the
//! single-object format we drive `serde_json`'s streaming `Deserializer` over a
//! `BufReader` with a custom `Visitor`: its `visit_map` pulls one key and one
//! value at a time and hands each validated record to a bounded channel.  The
//! visitor runs on its own thread because serde's visitor is push-style (it owns
//! the loop) while [`BeamReader`] must be a pull-style `Iterator`; the bounded
//! channel gives back-pressure, so at most [`CHANNEL_BOUND`] records are in
//! memory.  We chose this over a hand-rolled top-level tokenizer because
//! serde_json then does all the JSON work (escapes, numbers, nesting) and
//! reports every error - including the semantic ones the visitor raises - with
//! its exact line and column.  JSON Lines needs no thread: it is read line by
//! line on the caller's thread.
//!
//! Only the set of query indices seen so far is kept (8 bytes a query), for the
//! duplicate-key check.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use serde::de::{self, DeserializeOwned, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// How many parsed records the background parser may run ahead of the consumer.
pub const CHANNEL_BOUND: usize = 256;

/// Bytes of the first line that format auto-detection may inspect before it
/// settles for the single-object format.
const DETECT_SCAN_LIMIT: u64 = 8 << 20;

/// A place in an input file (1-based line; 1-based column when known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column as reported by serde_json (`None` when only the line is known).
    pub column: Option<usize>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(c) => write!(f, "line {}, column {}", self.line, c),
            None => write!(f, "line {}", self.line),
        }
    }
}

impl Position {
    fn of(e: &serde_json::Error) -> Self {
        Position {
            line: e.line(),
            column: Some(e.column()),
        }
    }
    fn line(line: usize) -> Self {
        Position { line, column: None }
    }
}

/// Errors of the beam-data, sampler-cache and candidate-index readers; each
/// names the file and the place (line/column, key) where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Malformed or truncated JSON, or a value of the wrong type.
    #[error("{}: malformed JSON at {at}: {message}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Where serde_json stopped.
        at: Position,
        /// serde_json's description (without its position suffix).
        message: String,
    },
    /// A top-level key is not a non-negative integer query index.
    #[error("{}: key {key:?} at {at} is not a non-negative integer query index", .path.display())]
    KeyNotInteger {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// Position just after the key.
        at: Position,
    },
    /// The same query index appears twice.
    #[error("{}: duplicate query index {key} at {at}", .path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The repeated query index.
        key: u64,
        /// Position of the second occurrence.
        at: Position,
    },
    /// A beam's last element is not the query index it is filed under.
    #[error(
        "{}: query {key} (record ending at {at}): beam {beam} ends with {} instead of the query index {key}",
        .path.display(),
        .found.map_or_else(|| "nothing (empty sequence)".to_string(), |v| v.to_string())
    )]
    QueryMismatch {
        /// The file.
        path: PathBuf,
        /// The query index (the record's key).
        key: u64,
        /// 0-based position of the beam in `id_list`.
        beam: usize,
        /// The last element found (`None` for an empty sequence).
        found: Option<u64>,
        /// Position at the end of the record.
        at: Position,
    },
    /// A JSON Lines record is missing fields or has fields of the wrong type.
    #[error("{}: invalid record{} at {at}: {message}", .path.display(),
        .key.as_ref().map_or_else(String::new, |k| format!(" for query {k}")))]
    InvalidRecord {
        /// The file.
        path: PathBuf,
        /// The record's query key, when known.
        key: Option<String>,
        /// Where the record is.
        at: Position,
        /// What is wrong.
        message: String,
    },
    /// A per-query candidate pool lists the same global id twice.
    #[error("{}: query {key}: candidate id {id} appears twice in its pool (pool ends at {at})", .path.display())]
    DuplicatePoolId {
        /// The file.
        path: PathBuf,
        /// The query index.
        key: u64,
        /// The repeated candidate id.
        id: u64,
        /// Position at the end of the pool.
        at: Position,
    },
    /// The candidate index list holds the same id twice.
    #[error("{}: candidate id {id} appears at list positions {first} and {second}", .path.display())]
    DuplicateCandidate {
        /// The file.
        path: PathBuf,
        /// The repeated id.
        id: u64,
        /// 0-based position of its first occurrence.
        first: usize,
        /// 0-based position of its second occurrence.
        second: usize,
    },
    /// The file holds no JSON value at all.
    #[error("{}: file is empty (expected a JSON object or JSON Lines)", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file does not start with a JSON object.
    #[error("{}: expected a JSON object or JSON Lines, found {found:?} at {at}", .path.display())]
    NotAnObject {
        /// The file.
        path: PathBuf,
        /// The first non-space character.
        found: char,
        /// Where it is.
        at: Position,
    },
}

/// One query's beams, as produced by the original beam search.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamRecord {
    /// The query's dataset index (the record's key).
    pub query_index: u64,
    /// Beams: `[icd.., query_index]` sequences of dataset indices; the last
    /// element of each is `query_index` (validated).
    pub id_list: Vec<Vec<u64>>,
    /// One score per beam, as stored (not re-sorted, length not enforced).
    pub score_list: Vec<f64>,
}

/// The on-disk layout of a beam file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeamFormat {
    /// One JSON object keyed by query index (the original's `json.dump`).
    Json,
    /// JSON Lines: one object per line.
    JsonLines,
}

/// The fields of one beam record that leverflow uses; any other key (such as
/// `beams`, `shot_scores`, `few_shot_num`) is skipped whatever its value.
#[derive(Deserialize)]
struct RawBeamValue {
    id_list: Vec<Vec<u64>>,
    score_list: Vec<f64>,
}

/// A problem found by a visitor callback; serde_json attaches the position.
enum Problem {
    KeyNotInteger {
        key: String,
    },
    DuplicateKey {
        key: u64,
    },
    QueryMismatch {
        key: u64,
        beam: usize,
        found: Option<u64>,
    },
    DuplicatePoolId {
        key: u64,
        id: u64,
    },
}

/// Why a visitor stopped early.
enum Halt {
    Problem(Problem),
    /// The consumer went away (the iterator was dropped or its range ended).
    Stopped,
}

impl Problem {
    fn into_error(self, path: PathBuf, at: Position) -> SourceError {
        match self {
            Problem::KeyNotInteger { key } => SourceError::KeyNotInteger { path, key, at },
            Problem::DuplicateKey { key } => SourceError::DuplicateKey { path, key, at },
            Problem::QueryMismatch { key, beam, found } => SourceError::QueryMismatch {
                path,
                key,
                beam,
                found,
                at,
            },
            Problem::DuplicatePoolId { key, id } => {
                SourceError::DuplicatePoolId { path, key, id, at }
            }
        }
    }
}

/// Parses a query-index key the way the original's `int(key)` is used on
/// beam files: ASCII digits only (leading zeros allowed).
fn parse_index(key: &str) -> Option<u64> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix)
        .map(str::to_string)
        .unwrap_or(full)
}

fn json_error(path: &Path, e: &serde_json::Error) -> SourceError {
    SourceError::Json {
        path: path.to_path_buf(),
        at: Position::of(e),
        message: json_message(e),
    }
}

fn open(path: &Path) -> Result<File, SourceError> {
    File::open(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Visits a top-level object keyed by query index: checks each key (integer,
/// not seen before), deserializes its value as `T` and hands both to `on_entry`.
struct EntryVisitor<'h, T, F> {
    halt: &'h mut Option<Halt>,
    on_entry: F,
    _value: PhantomData<fn() -> T>,
}

impl<'h, T, F> EntryVisitor<'h, T, F> {
    fn new(halt: &'h mut Option<Halt>, on_entry: F) -> Self {
        EntryVisitor {
            halt,
            on_entry,
            _value: PhantomData,
        }
    }
}

impl<'de, T, F> Visitor<'de> for EntryVisitor<'_, T, F>
where
    T: Deserialize<'de>,
    F: FnMut(u64, T) -> Result<(), Halt>,
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object keyed by query index")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut seen: HashSet<u64> = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let Some(index) = parse_index(&key) else {
                *self.halt = Some(Halt::Problem(Problem::KeyNotInteger { key }));
                return Err(de::Error::custom("key is not a query index"));
            };
            if !seen.insert(index) {
                *self.halt = Some(Halt::Problem(Problem::DuplicateKey { key: index }));
                return Err(de::Error::custom("duplicate query index"));
            }
            let value: T = map.next_value()?;
            if let Err(h) = (self.on_entry)(index, value) {
                *self.halt = Some(h);
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// Runs an [`EntryVisitor`] over a whole JSON file and turns its outcome into
/// a [`SourceError`] with the file, line and column.  `Ok(false)` means the
/// callback stopped the walk ([`Halt::Stopped`]).
fn walk_object<T, F>(path: &Path, reader: impl Read, on_entry: F) -> Result<bool, SourceError>
where
    T: DeserializeOwned,
    F: FnMut(u64, T) -> Result<(), Halt>,
{
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut halt = None;
    let result = de
        .deserialize_map(EntryVisitor::<T, F>::new(&mut halt, on_entry))
        .and_then(|()| de.end());
    match result {
        Ok(()) => Ok(true),
        Err(e) => match halt {
            Some(Halt::Stopped) => Ok(false),
            Some(Halt::Problem(p)) => Err(p.into_error(path.to_path_buf(), Position::of(&e))),
            None => Err(json_error(path, &e)),
        },
    }
}

/// Checks that every beam ends with the query index and builds the record.
fn validate(key: u64, raw: RawBeamValue) -> Result<BeamRecord, Problem> {
    for (beam, seq) in raw.id_list.iter().enumerate() {
        let found = seq.last().copied();
        if found != Some(key) {
            return Err(Problem::QueryMismatch { key, beam, found });
        }
    }
    Ok(BeamRecord {
        query_index: key,
        id_list: raw.id_list,
        score_list: raw.score_list,
    })
}

/// Detects the format of a beam file: `.jsonl` / `.ndjson` extension, else by
/// content (see the inline rules).
pub fn detect_format(path: &Path) -> Result<BeamFormat, SourceError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if matches!(ext.as_deref(), Some("jsonl") | Some("ndjson")) {
        return Ok(BeamFormat::JsonLines);
    }
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = BufReader::new(open(path)?).bytes();
    let (mut line, mut col) = (1usize, 0usize);
    // First non-space character.
    let first = loop {
        match bytes.next() {
            None => {
                return Err(SourceError::Empty {
                    path: path.to_path_buf(),
                })
            }
            Some(b) => {
                let b = b.map_err(io_err)?;
                col += 1;
                match b {
                    b'\n' => {
                        line += 1;
                        col = 0;
                    }
                    b' ' | b'\t' | b'\r' => {}
                    _ => break b,
                }
            }
        }
    };
    if first != b'{' {
        return Err(SourceError::NotAnObject {
            path: path.to_path_buf(),
            found: char::from(first),
            at: Position {
                line,
                column: Some(col),
            },
        });
    }
    // Rules: a newline inside the first object means a (pretty-printed) single
    // object; so does a first line longer than DETECT_SCAN_LIMIT or an
    // unterminated one (the parser then reports the truncation).  When the first
    // object ends on its line, more content after it means JSON Lines; if it is
    // the only value, it is JSON Lines only when its first key is not a query
    // index (the flat `{"query_idx": ..}` form).
    let (mut depth, mut in_str, mut escaped) = (1usize, false, false);
    let mut first_key: Option<Vec<u8>> = None;
    let mut key_buf: Option<Vec<u8>> = None;
    let mut scanned = 0u64;
    loop {
        let Some(b) = bytes.next() else {
            return Ok(BeamFormat::Json);
        };
        let b = b.map_err(io_err)?;
        scanned += 1;
        if scanned > DETECT_SCAN_LIMIT {
            return Ok(BeamFormat::Json);
        }
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
                if let Some(k) = key_buf.take() {
                    first_key = Some(k);
                }
                continue;
            }
            if let Some(k) = key_buf.as_mut() {
                k.push(b);
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                if depth == 1 && first_key.is_none() {
                    key_buf = Some(Vec::new());
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            b'\n' => return Ok(BeamFormat::Json),
            _ => {}
        }
    }
    for b in bytes {
        let b = b.map_err(io_err)?;
        if !b.is_ascii_whitespace() {
            return Ok(BeamFormat::JsonLines);
        }
    }
    let key_is_index = first_key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
        .is_some_and(|k| parse_index(k).is_some());
    Ok(if key_is_index || first_key.is_none() {
        BeamFormat::Json
    } else {
        BeamFormat::JsonLines
    })
}

/// Python slice bounds `[start:end]` over `len` items, with the original
/// script's special case `end == -1` meaning "to the end" (not `len - 1`).
/// Returns `(start, end)` with `start <= end <= len`.
pub fn slice_bounds(start: i64, end: i64, len: u64) -> (u64, u64) {
    let len_i = i128::from(len);
    let norm = |i: i64| -> u64 {
        let i = i128::from(i);
        let i = if i < 0 { i + len_i } else { i };
        // Clamped to [0, len], so the conversion cannot fail.
        u64::try_from(i.clamp(0, len_i)).unwrap_or(len)
    };
    let s = norm(start);
    let e = if end == -1 { len } else { norm(end) };
    (s, e.max(s))
}

/// Counts the records of a beam file (a cheap pass: values are skipped, keys
/// are still checked for integers and duplicates).
pub fn count_records(path: &Path) -> Result<u64, SourceError> {
    match detect_format(path)? {
        BeamFormat::Json => {
            let mut n = 0u64;
            walk_object::<IgnoredAny, _>(path, BufReader::new(open(path)?), |_, _| {
                n += 1;
                Ok(())
            })?;
            Ok(n)
        }
        BeamFormat::JsonLines => {
            let mut r = JsonlReader::new(path)?;
            let mut n = 0u64;
            while let Some(rec) = r.next_record() {
                rec?;
                n += 1;
            }
            Ok(n)
        }
    }
}

/// Line-by-line reader for the JSON Lines format.
struct JsonlReader {
    path: PathBuf,
    reader: BufReader<File>,
    line_no: usize,
    buf: Vec<u8>,
    seen: HashSet<u64>,
    pending: VecDeque<BeamRecord>,
}

/// The entries of one JSON Lines object, in order and with duplicates kept.
struct LineEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for LineEntries {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LineEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LineEntries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = map.next_entry()? {
                    v.push(e);
                }
                Ok(LineEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl JsonlReader {
    fn new(path: &Path) -> Result<Self, SourceError> {
        Ok(JsonlReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, open(path)?),
            line_no: 0,
            buf: Vec::new(),
            seen: HashSet::new(),
            pending: VecDeque::new(),
        })
    }

    fn invalid(&self, key: Option<String>, message: String) -> SourceError {
        SourceError::InvalidRecord {
            path: self.path.clone(),
            key,
            at: Position::line(self.line_no),
            message,
        }
    }

    fn next_record(&mut self) -> Option<Result<BeamRecord, SourceError>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(Ok(r));
            }
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => {
                    return Some(Err(SourceError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
            }
            self.line_no += 1;
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Err(e) = self.parse_line() {
                return Some(Err(e));
            }
        }
    }

    fn parse_line(&mut self) -> Result<(), SourceError> {
        let entries: LineEntries =
            serde_json::from_slice(&self.buf).map_err(|e| SourceError::Json {
                path: self.path.clone(),
                at: Position {
                    line: self.line_no,
                    column: Some(e.column()),
                },
                message: json_message(&e),
            })?;
        let entries = entries.0;
        let flat_key = entries
            .iter()
            .position(|(k, _)| k == "query_idx" || k == "query_index");
        let mut records = Vec::new();
        if let Some(pos) = flat_key {
            // Flat form: {"query_idx": N, "id_list": .., "score_list": .., ...}.
            let key_value = &entries[pos].1;
            let Some(index) = key_value.as_u64() else {
                return Err(self.invalid(
                    None,
                    format!(
                        "{} is not a non-negative integer: {key_value}",
                        entries[pos].0
                    ),
                ));
            };
            let mut fields = serde_json::Map::new();
            for (k, v) in entries {
                if k == "query_idx" || k == "query_index" {
                    continue;
                }
                if fields.contains_key(&k) {
                    return Err(
                        self.invalid(Some(index.to_string()), format!("duplicate field {k:?}"))
                    );
                }
                fields.insert(k, v);
            }
            records.push((index, serde_json::Value::Object(fields)));
        } else {
            // Keyed form: {"<query_idx>": {..}} (several keys on a line allowed).
            for (k, v) in entries {
                let Some(index) = parse_index(&k) else {
                    return Err(SourceError::KeyNotInteger {
                        path: self.path.clone(),
                        key: k,
                        at: Position::line(self.line_no),
                    });
                };
                records.push((index, v));
            }
        }
        for (index, value) in records {
            if !self.seen.insert(index) {
                return Err(SourceError::DuplicateKey {
                    path: self.path.clone(),
                    key: index,
                    at: Position::line(self.line_no),
                });
            }
            let raw: RawBeamValue = serde_json::from_value(value)
                .map_err(|e| self.invalid(Some(index.to_string()), e.to_string()))?;
            let record = validate(index, raw)
                .map_err(|p| p.into_error(self.path.clone(), Position::line(self.line_no)))?;
            self.pending.push_back(record);
        }
        Ok(())
    }
}

type RecordResult = Result<BeamRecord, SourceError>;

enum Inner {
    Json {
        rx: Receiver<RecordResult>,
        worker: Option<JoinHandle<()>>,
    },
    Jsonl(JsonlReader),
    Finished,
}

/// Streaming reader of a beam file: an `Iterator` of [`BeamRecord`]s in file
/// order.  After the first error it yields nothing more.
pub struct BeamReader {
    path: PathBuf,
    format: BeamFormat,
    inner: Inner,
    /// Records taken from the underlying stream so far (file-order position).
    position: u64,
    /// File-order position of the first record to yield.
    start: u64,
    /// File-order position one past the last record to yield.
    end: Option<u64>,
}

impl BeamReader {
    /// Opens a beam file, auto-detecting its format ([`detect_format`]).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let format = detect_format(path)?;
        Self::open_as(path, format)
    }

    /// Opens a beam file in the given format.
    pub fn open_as(path: &Path, format: BeamFormat) -> Result<Self, SourceError> {
        let inner = match format {
            BeamFormat::JsonLines => Inner::Jsonl(JsonlReader::new(path)?),
            BeamFormat::Json => {
                let file = open(path)?;
                let (tx, rx) = mpsc::sync_channel(CHANNEL_BOUND);
                let owned = path.to_path_buf();
                let worker = std::thread::Builder::new()
                    .name("beam-reader".into())
                    .spawn(move || parse_json_into(&owned, file, tx))
                    .map_err(|source| SourceError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Inner::Json {
                    rx,
                    worker: Some(worker),
                }
            }
        };
        Ok(BeamReader {
            path: path.to_path_buf(),
            format,
            inner,
            position: 0,
            start: 0,
            end: None,
        })
    }

    /// Restricts the reader to the original script's `--start_idx/--end_idx`
    /// shard: the Python slice `list(beam_data.keys())[start_idx:end_idx]` of
    /// the query keys in file order (the original does not sort them), with
    /// `end_idx == -1` meaning "to the end".  Negative bounds other than that
    /// need the key count, taken by a first cheap pass ([`count_records`]).
    /// Positions are absolute in the file, so call this before iterating.
    pub fn with_range(mut self, start_idx: i64, end_idx: i64) -> Result<Self, SourceError> {
        let (start, end) = if start_idx >= 0 && end_idx >= -1 {
            let start = start_idx.unsigned_abs();
            let end = (end_idx != -1).then(|| end_idx.unsigned_abs().max(start));
            (start, end)
        } else {
            let len = count_records(&self.path)?;
            let (s, e) = slice_bounds(start_idx, end_idx, len);
            (s, Some(e))
        };
        self.start = start;
        self.end = end;
        Ok(self)
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The detected (or given) format.
    pub fn format(&self) -> BeamFormat {
        self.format
    }

    fn finish(&mut self) {
        let inner = std::mem::replace(&mut self.inner, Inner::Finished);
        if let Inner::Json { rx, worker } = inner {
            // Dropping the receiver makes the parser stop at its next send.
            drop(rx);
            if let Some(w) = worker {
                let _ = w.join();
            }
        }
    }
}

/// The background parser of the single-object format.
fn parse_json_into(path: &Path, file: File, tx: SyncSender<RecordResult>) {
    let reader = BufReader::with_capacity(1 << 20, file);
    let result = walk_object::<RawBeamValue, _>(path, reader, |key, raw| {
        let rec = validate(key, raw).map_err(Halt::Problem)?;
        tx.send(Ok(rec)).map_err(|_| Halt::Stopped)
    });
    if let Err(e) = result {
        let _ = tx.send(Err(e));
    }
}

impl Iterator for BeamReader {
    type Item = Result<BeamRecord, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.end.is_some_and(|end| self.position >= end) {
                self.finish();
                return None;
            }
            let item = match &mut self.inner {
                Inner::Json { rx, .. } => rx.recv().ok(),
                Inner::Jsonl(r) => r.next_record(),
                Inner::Finished => return None,
            };
            match item {
                None => {
                    self.finish();
                    return None;
                }
                Some(Err(e)) => {
                    self.finish();
                    return Some(Err(e));
                }
                Some(Ok(rec)) => {
                    let pos = self.position;
                    self.position += 1;
                    if pos >= self.start {
                        return Some(Ok(rec));
                    }
                }
            }
        }
    }
}

impl Drop for BeamReader {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Reads a whole beam file into memory (convenience for small files and tests).
pub fn read_all(path: &Path) -> Result<Vec<BeamRecord>, SourceError> {
    BeamReader::open(path)?.collect()
}

/// Loads a sampler cache `{"<query_idx>": [global candidate ids]}`: each
/// query's candidate pool, in order.  Errors on non-integer keys or ids,
/// duplicate keys, and an id repeated within a pool (naming query and id).
pub fn load_sampler_cache(path: &Path) -> Result<BTreeMap<u64, Vec<u64>>, SourceError> {
    let mut out = BTreeMap::new();
    walk_object::<Vec<u64>, _>(path, BufReader::new(open(path)?), |key, pool| {
        let mut seen = HashSet::with_capacity(pool.len());
        if let Some(&id) = pool.iter().find(|&&id| !seen.insert(id)) {
            return Err(Halt::Problem(Problem::DuplicatePoolId { key, id }));
        }
        out.insert(key, pool);
        Ok(())
    })?;
    Ok(out)
}

/// Loads the shared candidate pool: a JSON list of global dataset ids (position
/// in the list = candidate position).  Errors on non-integers and repeats.
pub fn load_candidate_indices(path: &Path) -> Result<Vec<u64>, SourceError> {
    let ids: Vec<u64> =
        serde_json::from_reader(BufReader::new(open(path)?)).map_err(|e| json_error(path, &e))?;
    let mut first_at: HashMap<u64, usize> = HashMap::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        if let Some(&first) = first_at.get(&id) {
            return Err(SourceError::DuplicateCandidate {
                path: path.to_path_buf(),
                id,
                first,
                second: i,
            });
        }
        first_at.insert(id, i);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests;
