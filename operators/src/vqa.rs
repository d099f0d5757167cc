//! The `vqa` stage: the contract every VQA backend implements, the prompts it
//! answers, and the backends that need no neural network (`replay`).
//!
//! A backend receives a batch of [`VqaPrompt`]s (system prompt, k in-context
//! examples of image + `Question:<q> Short answer:<a>`, then the query image +
//! `Question:<q> Short answer:`) and returns one [`VqaAnswer`] per prompt: the
//! raw generation and, when asked, the teacher-forced probability of the
//! ground-truth answers. The answer the pipeline scores is
//! [`crate::accuracy::postprocess_generation`] of the raw generation, as in the
//! original.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use leverflow_schemas::RlRecord;

/// Default system prompt of the original `qwen2.5_vl_3B` inference config.
pub use crate::qwen2_5_vl::processor::DEFAULT_SYSTEM_PROMPT;
use crate::sinks::json_scan::{line_column, scan_object};
use crate::sinks::SinkError;

/// Errors of a VQA backend.
#[derive(Debug, thiserror::Error)]
pub enum VqaError {
    /// The replay source has no answer for this prompt.
    #[error("{source_file}: no recorded answer for query {query_index} with examples {examples:?} (the replay file must come from a run with the same candidates)")]
    MissingReplay {
        /// Replay file.
        source_file: PathBuf,
        /// Query dataset index.
        query_index: u64,
        /// Dataset indices of the in-context examples.
        examples: Vec<u64>,
    },
    /// Reading a replay file failed.
    #[error("{path}: {message}")]
    Replay {
        /// File.
        path: PathBuf,
        /// What went wrong and where.
        message: String,
    },
    /// A replay file could not be read, or its top level is not a JSON
    /// object (found when the file is opened, before any record is parsed).
    #[error(transparent)]
    ReplayFile(#[from] SinkError),
    /// A record of a lazily read replay file does not parse.  Found when the
    /// record's query is first asked for, so a damaged record fails only the
    /// runs that need it.
    #[error("{}:{line}:{column}: record \"{query_index}\" does not parse: {message}", .path.display())]
    ReplayRecord {
        /// Replay file.
        path: PathBuf,
        /// The record's key (query dataset index).
        query_index: u64,
        /// 1-based line of the error in the file.
        line: usize,
        /// 1-based column (in bytes) of the error in the file.
        column: usize,
        /// serde's message.
        message: String,
    },
    /// The replay file records no answer: it is not an output of
    /// `leverflow generate` (for instance, an output of `leverflow candidates`).
    #[error("{}: no candidate with `vqa_raw_generation` found; replay needs an output of `leverflow generate`", .path.display())]
    NotGenerateOutput {
        /// Replay file.
        path: PathBuf,
    },
    /// The model failed on a prompt.
    #[error("VQA model failed on query {query_index}: {message}")]
    Model {
        /// Query dataset index.
        query_index: u64,
        /// What went wrong.
        message: String,
    },
}

/// One in-context example of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    /// Dataset index of the example.
    pub dataset_index: u64,
    /// Image file.
    pub image: PathBuf,
    /// Question text.
    pub question: String,
    /// In-context answer (`multiple_choice_answer`).
    pub answer: String,
}

/// A prompt to answer: examples then the query.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaPrompt {
    /// Dataset index of the query.
    pub query_index: u64,
    /// System prompt.
    pub system_prompt: String,
    /// In-context examples, in pointer order.
    pub examples: Vec<PromptExample>,
    /// Query image file.
    pub query_image: PathBuf,
    /// Query question.
    pub query_question: String,
    /// Distinct normalised ground-truth answers with their weights
    /// (min(count/3, 1)), for the answer probability; empty when not asked.
    pub gt_answers: Vec<(String, f64)>,
}

impl VqaPrompt {
    /// Dataset indices of the examples, in order: with the query index, the
    /// key of this prompt within a run.
    pub fn example_indices(&self) -> Vec<u64> {
        self.examples.iter().map(|e| e.dataset_index).collect()
    }
}

/// A backend's answer to one prompt.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct VqaAnswer {
    /// The decoded generation (special tokens skipped).
    pub raw_generation: String,
    /// Weighted probability of the ground-truth answers, when asked.
    pub gt_prob: Option<f64>,
    /// The rendered prompt text, when the backend has one.
    pub prompt_text: Option<String>,
}

/// The contract between the `vqa` stage and a model.
///
/// One instance lives on each timely worker (so implementations may keep
/// caches without locks); weights should be shared between instances.
pub trait VqaModel {
    /// A stable description of the model and its generation settings
    /// (recorded in `_meta`, and part of result cache keys).
    fn identity(&self) -> serde_json::Value;

    /// Answers a batch of prompts, one answer per prompt in order. The answer
    /// to a prompt must not depend on what it was batched with.
    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError>;

    /// Counters for the run summary (prompts, tokens, image cache use, ...).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Answers of one query, by the dataset indices of the examples (in order).
type QueryAnswers = HashMap<Vec<u64>, VqaAnswer>;

/// Records the answer of every candidate of `record` that has a raw
/// generation; for an (examples) pair already present the first one stays.
fn add_record_answers(answers: &mut QueryAnswers, record: &RlRecord) {
    for c in &record.pointer_candidates {
        if let Some(raw) = &c.vqa_raw_generation {
            answers
                .entry(c.dataset_indices().to_vec())
                .or_insert_with(|| VqaAnswer {
                    raw_generation: raw.clone(),
                    gt_prob: c.vqa_gt_prob,
                    prompt_text: c.prompt_text.clone(),
                });
        }
    }
}

/// Whether any candidate of `record` has a raw generation.
fn has_answer(record: &RlRecord) -> bool {
    record
        .pointer_candidates
        .iter()
        .any(|c| c.vqa_raw_generation.is_some())
}

/// Answers recorded by an earlier run, keyed by query and example indices.
///
/// Two sources, which may be combined: answers inserted eagerly
/// ([`ReplayIndex::insert`], [`ReplayIndex::insert_record`]: the Parquet
/// replay path and tests), and a JSON output opened lazily
/// ([`ReplayIndex::open_json`]), whose records are parsed only when their
/// query is first asked for — an incremental rerun that needs a few new
/// queries does not pay for parsing the whole earlier output.  Inserted
/// answers take precedence over the lazy file's.  The index is shared by the
/// workers (behind an `Arc`), so the lazy cache is thread-safe.
pub struct ReplayIndex {
    /// File the answers came from.
    pub source_file: PathBuf,
    answers: HashMap<u64, QueryAnswers>,
    lazy: Option<LazyJson>,
}

impl std::fmt::Debug for ReplayIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayIndex")
            .field("source_file", &self.source_file)
            .field("inserted_queries", &self.answers.len())
            .field("lazy_queries", &self.lazy.as_ref().map(|l| l.queries.len()))
            .finish()
    }
}

/// Why a lazily read record did not parse (kept in the cache, so every
/// request for the query reports it).
#[derive(Debug, Clone)]
struct RecordError {
    line: usize,
    column: usize,
    message: String,
}

/// A JSON replay file scanned once at open: the byte ranges of each query's
/// record(s), parsed on first use.
struct LazyJson {
    bytes: memmap2::Mmap,
    /// Distinct query indices, ascending.
    queries: Vec<u64>,
    /// `spans[starts[i]..starts[i + 1]]` are the value ranges of the records
    /// of `queries[i]`, in file order (a repeated key has several).
    starts: Vec<usize>,
    spans: Vec<Range<usize>>,
    /// The parsed answers of `queries[i]`, once asked for.
    parsed: Vec<OnceLock<Result<QueryAnswers, RecordError>>>,
}

/// Parses the record at `range` of `bytes`; an error carries its place in
/// the file.
fn parse_record(bytes: &[u8], range: &Range<usize>) -> Result<RlRecord, RecordError> {
    serde_json::from_slice(&bytes[range.clone()]).map_err(|e| {
        // serde's position is within the record: make it the file's.
        let (line, column) = line_column(bytes, range.start);
        let (line, column) = match e.line() {
            0 | 1 => (line, column + e.column().saturating_sub(1)),
            l => (line + l - 1, e.column()),
        };
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        RecordError {
            line,
            column,
            message,
        }
    })
}

/// Maps `path` into memory, all pages up front: the whole file is scanned
/// at once.
fn map_file(path: &Path) -> Result<memmap2::Mmap, VqaError> {
    crate::tensor_io::map_readonly(path, true).map_err(|e| SinkError::io(path, "reading", e).into())
}

/// Query index and value range of every record of `bytes`, in file order;
/// `_meta` and other non-numeric keys are skipped, as `RlJsonReader` does.
fn record_ranges(bytes: &[u8], path: &Path) -> Result<Vec<(u64, Range<usize>)>, VqaError> {
    let mut entries = Vec::new();
    scan_object(bytes, path, |e| {
        if let Ok(q) = e.key.parse::<u64>() {
            entries.push((q, e.value));
        }
        Ok(())
    })?;
    Ok(entries)
}

impl LazyJson {
    /// Groups the record ranges `entries` (in file order) of `bytes` by query.
    fn new(bytes: memmap2::Mmap, mut entries: Vec<(u64, Range<usize>)>) -> Self {
        // Stable: the records of a repeated key stay in file order.
        if !entries.is_sorted_by_key(|e| e.0) {
            entries.sort_by_key(|e| e.0);
        }
        let mut queries = Vec::new();
        let mut starts = Vec::new();
        let mut spans = Vec::with_capacity(entries.len());
        for (q, range) in entries {
            if queries.last() != Some(&q) {
                queries.push(q);
                starts.push(spans.len());
            }
            spans.push(range);
        }
        starts.push(spans.len());
        let parsed = (0..queries.len()).map(|_| OnceLock::new()).collect();
        LazyJson {
            bytes,
            queries,
            starts,
            spans,
            parsed,
        }
    }

    /// Parses the record at `range`.
    fn record(&self, range: &Range<usize>) -> Result<RlRecord, RecordError> {
        parse_record(&self.bytes, range)
    }

    /// The answers of slot `i`, parsing its records on first use.
    fn answers(&self, i: usize) -> &Result<QueryAnswers, RecordError> {
        self.parsed[i].get_or_init(|| {
            let mut answers = QueryAnswers::new();
            for range in &self.spans[self.starts[i]..self.starts[i + 1]] {
                add_record_answers(&mut answers, &self.record(range)?);
            }
            Ok(answers)
        })
    }
}

impl ReplayIndex {
    /// An empty index for answers read from `source_file`.
    pub fn new(source_file: PathBuf) -> Self {
        Self {
            source_file,
            answers: HashMap::new(),
            lazy: None,
        }
    }

    /// Opens an RL JSON output of `leverflow generate` (`{"<query index>":
    /// record, ..., "_meta": ...}`) lazily: maps the file, scans its
    /// top-level structure for the byte range of each record (without
    /// parsing the records) and parses the first records until one holds an
    /// answer.  Later, [`ReplayIndex::get`] parses a query's record(s) on
    /// first use.  A repeated query key keeps, per example sequence, the
    /// answer of the first record in the file; `_meta` and other
    /// non-numeric keys are skipped.
    ///
    /// Errors: the file cannot be read, its top level is not a JSON object
    /// ([`VqaError::ReplayFile`]), a record parsed here does not parse
    /// ([`VqaError::ReplayRecord`]), or no record holds an answer
    /// ([`VqaError::NotGenerateOutput`]).
    pub fn open_json(path: &Path) -> Result<Self, VqaError> {
        let bytes = map_file(path)?;
        let entries = record_ranges(&bytes, path)?;
        let mut index = Self::new(path.to_path_buf());
        // The early check that this is a generate output: records in file
        // order until one has an answer (normally the first).
        let mut found = false;
        for (q, range) in &entries {
            let record = parse_record(&bytes, range).map_err(|e| index.record_error(*q, e))?;
            if has_answer(&record) {
                found = true;
                break;
            }
        }
        if !found {
            return Err(VqaError::NotGenerateOutput {
                path: path.to_path_buf(),
            });
        }
        let lazy = LazyJson::new(bytes, entries);
        index.lazy = Some(lazy);
        Ok(index)
    }

    /// Records the answer for (query, examples); the first one recorded wins.
    pub fn insert(&mut self, query_index: u64, examples: Vec<u64>, answer: VqaAnswer) {
        self.answers
            .entry(query_index)
            .or_default()
            .entry(examples)
            .or_insert(answer);
    }

    /// Records the answer of every candidate of `record` that has a
    /// `vqa_raw_generation` (the first one recorded wins), as a lazily read
    /// JSON record would give it.
    pub fn insert_record(&mut self, query_index: u64, record: &RlRecord) {
        if has_answer(record) {
            add_record_answers(self.answers.entry(query_index).or_default(), record);
        }
    }

    /// Whether the index holds at least one answer (a lazily opened file
    /// always does: [`ReplayIndex::open_json`] checks it).
    pub fn has_answers(&self) -> bool {
        self.lazy.is_some() || !self.answers.is_empty()
    }

    /// The recorded answer for a prompt (`None`: none recorded).  For a
    /// lazily opened file, the query's record(s) are parsed on the first
    /// request; a record that does not parse gives
    /// [`VqaError::ReplayRecord`], on every request for its query.
    pub fn get(&self, query_index: u64, examples: &[u64]) -> Result<Option<VqaAnswer>, VqaError> {
        if let Some(a) = self.answers.get(&query_index).and_then(|m| m.get(examples)) {
            return Ok(Some(a.clone()));
        }
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        let Ok(i) = lazy.queries.binary_search(&query_index) else {
            return Ok(None);
        };
        match lazy.answers(i) {
            Ok(m) => Ok(m.get(examples).cloned()),
            Err(e) => Err(self.record_error(query_index, e.clone())),
        }
    }

    fn record_error(&self, query_index: u64, e: RecordError) -> VqaError {
        VqaError::ReplayRecord {
            path: self.source_file.clone(),
            query_index,
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }
}

/// The `replay` backend: answers prompts with the raw generations recorded
/// in an earlier leverflow output, to re-score or re-reward without a model.
#[derive(Debug, Clone)]
pub struct ReplayModel {
    index: std::sync::Arc<ReplayIndex>,
}

impl ReplayModel {
    /// A backend answering from `index`.
    pub fn new(index: std::sync::Arc<ReplayIndex>) -> Self {
        Self { index }
    }
}

impl VqaModel for ReplayModel {
    fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": "replay",
            "replay_from": self.index.source_file.display().to_string(),
        })
    }

    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError> {
        prompts
            .iter()
            .map(|p| {
                let examples = p.example_indices();
                self.index
                    .get(p.query_index, &examples)?
                    .ok_or_else(|| VqaError::MissingReplay {
                        source_file: self.index.source_file.clone(),
                        query_index: p.query_index,
                        examples,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(q: u64, ex: &[u64]) -> VqaPrompt {
        VqaPrompt {
            query_index: q,
            system_prompt: String::new(),
            examples: ex
                .iter()
                .map(|&i| PromptExample {
                    dataset_index: i,
                    image: PathBuf::from(format!("{i}.png")),
                    question: "q".into(),
                    answer: "a".into(),
                })
                .collect(),
            query_image: PathBuf::from("q.png"),
            query_question: "q".into(),
            gt_answers: Vec::new(),
        }
    }

    #[test]
    fn replay_answers_by_query_and_ordered_examples() {
        let mut index = ReplayIndex::new(PathBuf::from("old.json"));
        let ans = |s: &str| VqaAnswer {
            raw_generation: s.into(),
            ..Default::default()
        };
        index.insert(3, vec![1, 2], ans("red"));
        index.insert(3, vec![2, 1], ans("blue"));
        index.insert(3, vec![2, 1], ans("later"));
        assert!(index.has_answers());
        let mut model = ReplayModel::new(std::sync::Arc::new(index));
        let out = model
            .answer(&[prompt(3, &[2, 1]), prompt(3, &[1, 2])])
            .unwrap();
        assert_eq!(out[0].raw_generation, "blue");
        assert_eq!(out[1].raw_generation, "red");
        let err = model.answer(&[prompt(4, &[1, 2])]).unwrap_err().to_string();
        assert!(err.contains("old.json") && err.contains("query 4"), "{err}");
    }

    use crate::sinks::{visit_rl_json, JsonOptions, JsonSink};
    use leverflow_schemas::{CandidateRecord, PointerLayout, QueryRecord};

    /// Strings a scanner could trip on.
    const TRICKY: [&str; 6] = [
        "blue Question:",
        "say \"hi\" \\ back\\",
        "}{ ][ \\\" \\\\\"",
        "ü ✓ 😀 \u{7f} \t\n",
        "{\"a\": [1, 2]}",
        "",
    ];

    /// Record of query `q`: `n` candidates with examples `[q + k, k]`, the
    /// answers `tag`-dependent, one candidate without an answer.
    fn record(q: u64, n: u64, tag: &str) -> RlRecord {
        let pointer_candidates = (0..n)
            .map(|k| {
                let ex = [q + k, k];
                let mut c =
                    CandidateRecord::new(&[0, 1], &ex, PointerLayout::PerQueryPool, "beam", -1.0)
                        .unwrap();
                if k != 1 {
                    let t = TRICKY[((q + k) % TRICKY.len() as u64) as usize];
                    c.vqa_raw_generation = Some(format!("{tag}{t}"));
                    c.vqa_gt_prob = (k % 2 == 0).then_some(0.25 * k as f64);
                    c.prompt_text = (k == 2).then(|| format!("prompt {t} {q}"));
                }
                c
            })
            .collect();
        RlRecord {
            query: QueryRecord {
                query_id: q,
                question_id: q + 1000,
                image_id: 7,
                question: format!("what {} ?", TRICKY[(q % 6) as usize]),
                gt_answers_raw: vec!["a\"b".into()],
                gt_answers_norm: vec!["a\"b".into()],
            },
            candidate_pool_ids: Some(vec![q, q + 1, q + 2]),
            pointer_candidates,
        }
    }

    /// The index the eager reader builds from `path`.
    fn eager(path: &Path) -> ReplayIndex {
        let mut index = ReplayIndex::new(path.to_path_buf());
        visit_rl_json(path, |q, r| {
            index.insert_record(q, &r);
            Ok(())
        })
        .unwrap();
        index
    }

    /// Every (query, examples) asked of the test indices, present or not.
    fn keys(queries: &[u64]) -> Vec<(u64, Vec<u64>)> {
        let mut out = Vec::new();
        for &q in queries {
            for k in 0..6 {
                out.push((q, vec![q + k, k]));
                out.push((q, vec![k, q + k]));
            }
        }
        out
    }

    #[test]
    fn lazy_replay_answers_like_the_eager_index() {
        let dir = tempfile::tempdir().unwrap();
        for pretty in [false, true] {
            let path = dir.path().join(format!("replay-{pretty}.json"));
            let mut sink = JsonSink::create(&path, JsonOptions { pretty }).unwrap();
            let queries = [0u64, 3, 4, 17, 250, 1_000_000];
            for &q in &queries {
                sink.write_record(q, &record(q, 1 + q % 5, "")).unwrap();
            }
            sink.finish(&serde_json::json!({"s": "}{\"[", "n": [1, {"a": "]"}]}))
                .unwrap();
            let eager = eager(&path);
            let lazy = ReplayIndex::open_json(&path).unwrap();
            assert!(lazy.has_answers());
            let mut found = 0;
            for (q, ex) in keys(&[0, 1, 3, 4, 5, 17, 250, 1_000_000, u64::MAX]) {
                let want = eager.get(q, &ex).unwrap();
                found += usize::from(want.is_some());
                assert_eq!(lazy.get(q, &ex).unwrap(), want, "query {q} {ex:?}");
                // Cached: the same answer again.
                assert_eq!(lazy.get(q, &ex).unwrap(), want, "query {q} {ex:?}");
            }
            assert!(found >= 10, "{found}");
            let a = lazy.get(4, &[6, 2]).unwrap().unwrap();
            assert_eq!(a.raw_generation, TRICKY[0]);
            assert_eq!(a.prompt_text.as_deref(), Some("prompt blue Question: 4"));
            assert_eq!(a.gt_prob, Some(0.5));
            assert_eq!(lazy.get(4, &[5, 1]).unwrap(), None, "no answer recorded");
        }
    }

    #[test]
    fn lazy_replay_is_shared_by_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.json");
        let mut sink = JsonSink::create(&path, JsonOptions::default()).unwrap();
        let queries: Vec<u64> = (0..64).collect();
        for &q in &queries {
            sink.write_record(q, &record(q, 4, "t")).unwrap();
        }
        sink.finish(&serde_json::json!({})).unwrap();
        let eager = eager(&path);
        let lazy = std::sync::Arc::new(ReplayIndex::open_json(&path).unwrap());
        std::thread::scope(|s| {
            for t in 0..4 {
                let (lazy, eager, queries) = (&lazy, &eager, &queries);
                s.spawn(move || {
                    for (q, ex) in keys(queries).into_iter().skip(t) {
                        assert_eq!(lazy.get(q, &ex).unwrap(), eager.get(q, &ex).unwrap());
                    }
                });
            }
        });
    }

    /// `{"<q>": record, ...}` by hand: repeated keys, `_meta` and other keys anywhere.
    fn handwritten(entries: &[(&str, String)]) -> String {
        let body: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("{}: {v}", serde_json::to_string(k).unwrap()))
            .collect();
        format!("{{\n  {}\n}}\n", body.join(",\n  "))
    }

    fn json(r: &RlRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    #[test]
    fn lazy_replay_keeps_the_first_record_of_a_repeated_query() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.json");
        // Query 5 three times (the second adds an example sequence), out of
        // order, `_meta` first and in the middle, a non-numeric key, and a
        // key with an escape ("\u0037" is "7").
        let mut second = record(5, 4, "second ");
        second.pointer_candidates[3].pointer_global = Some(vec![99, 98]);
        let text = handwritten(&[
            ("_meta", r#"{"a": "}"}"#.into()),
            ("9", json(&record(9, 3, ""))),
            ("5", json(&record(5, 3, "first "))),
            ("notes", "[1, \"]\", {}]".into()),
            ("_meta", "{}".into()),
            ("5", json(&second)),
            ("7", json(&record(7, 2, ""))),
            ("5", json(&record(5, 3, "third "))),
        ])
        .replace("\"7\": ", "\"\\u0037\": ");
        std::fs::write(&path, text).unwrap();
        let eager = eager(&path);
        let lazy = ReplayIndex::open_json(&path).unwrap();
        for (q, ex) in keys(&[5, 7, 9]) {
            assert_eq!(
                lazy.get(q, &ex).unwrap(),
                eager.get(q, &ex).unwrap(),
                "{q} {ex:?}"
            );
        }
        let first = lazy.get(5, &[5, 0]).unwrap().unwrap();
        assert!(first.raw_generation.starts_with("first "), "{first:?}");
        let added = lazy.get(5, &[99, 98]).unwrap().unwrap();
        assert!(added.raw_generation.starts_with("second "), "{added:?}");
        assert!(lazy.get(7, &[7, 0]).unwrap().is_some());
    }

    #[test]
    fn lazy_replay_reports_a_corrupt_record_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.json");
        let bad = json(&record(2, 3, "")).replace("\"query_id\":2", "\"query_id\":\"x{\"");
        let text = handwritten(&[
            ("1", json(&record(1, 3, ""))),
            ("2", bad),
            ("3", r#"{"query": tru}"#.into()),
            ("4", json(&record(4, 3, ""))),
        ]);
        std::fs::write(&path, &text).unwrap();
        let lazy = ReplayIndex::open_json(&path).unwrap();
        assert!(lazy.get(1, &[1, 0]).unwrap().is_some());
        assert!(lazy.get(4, &[6, 2]).unwrap().is_some());
        for (q, line) in [(2u64, 3usize), (3, 4)] {
            let err = lazy.get(q, &[q, 0]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("corrupt.json")
                    && msg.contains(&format!("record \"{q}\""))
                    && msg.contains(&format!("corrupt.json:{line}:")),
                "{msg}"
            );
            assert!(matches!(err, VqaError::ReplayRecord { query_index, .. } if query_index == q));
            // The error is kept: asked again, the same error.
            assert_eq!(lazy.get(q, &[q, 0]).unwrap_err().to_string(), msg);
        }
        // The column points into the record: line 4 is `  "3": {"query": tru}`.
        let msg = lazy.get(3, &[3, 0]).unwrap_err().to_string();
        assert!(msg.contains(":4:20:") || msg.contains(":4:21:"), "{msg}");
        // Through the model: the error reaches the caller.
        let mut model = ReplayModel::new(std::sync::Arc::new(lazy));
        assert!(model.answer(&[prompt(1, &[1, 0])]).is_ok());
        let err = model.answer(&[prompt(2, &[2, 0])]).unwrap_err().to_string();
        assert!(err.contains("record \"2\""), "{err}");
    }

    #[test]
    fn lazy_replay_rejects_bad_files_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        let good = handwritten(&[
            ("1", json(&record(1, 3, ""))),
            ("2", json(&record(2, 3, ""))),
        ]);
        let mut no_answers = record(1, 3, "");
        for c in &mut no_answers.pointer_candidates {
            c.vqa_raw_generation = None;
        }
        let not_generate = "a generate output";
        let cases: Vec<(String, &str)> = vec![
            (good[..good.len() / 2].to_string(), "unexpected end of file"),
            (good[..good.len() - 3].to_string(), "unexpected end of file"),
            (String::new(), "unexpected end of file"),
            ("[]".into(), "expected '{'"),
            (format!("{good} x"), "content after the top-level object"),
            (good.replacen(",\n", "\n", 1), "expected ','"),
            ("{}".into(), not_generate),
            ("{\"_meta\": {\"a\": 1}}".into(), not_generate),
            (handwritten(&[("1", json(&no_answers))]), not_generate),
            (
                handwritten(&[("1", r#"{"query": 1}"#.into())]),
                "record \"1\" does not parse",
            ),
        ];
        for (text, why) in cases {
            std::fs::write(&path, &text).unwrap();
            let err = ReplayIndex::open_json(&path).unwrap_err().to_string();
            let why = if why == not_generate {
                "no candidate with `vqa_raw_generation` found"
            } else {
                why
            };
            assert!(
                err.contains("bad.json") && err.contains(why),
                "{text:?}: {err}"
            );
        }
        // A first record without answers is fine when a later one has some.
        std::fs::write(
            &path,
            handwritten(&[("1", json(&no_answers)), ("2", json(&record(2, 3, "")))]),
        )
        .unwrap();
        let lazy = ReplayIndex::open_json(&path).unwrap();
        assert_eq!(lazy.get(1, &[1, 0]).unwrap(), None);
        assert!(lazy.get(2, &[2, 0]).unwrap().is_some());
        let err = ReplayIndex::open_json(&dir.path().join("missing.json")).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
    }
}
