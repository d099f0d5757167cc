//! The `replay` backend: answers prompts with the raw generations recorded
//! in an earlier leverflow output (JSON or Parquet), to re-score or
//! re-reward without a model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use leverflow_schemas::RlRecord;

use crate::models::contract::{VqaAnswer, VqaError, VqaModel, VqaPrompt};
use crate::outputs::rl_json::{LazyRecords, RecordError};
use crate::outputs::{read_rl_parquet, rows_to_records, SinkError};

/// Errors of the replay backend.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
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
}

impl From<ReplayError> for VqaError {
    fn from(e: ReplayError) -> Self {
        VqaError::backend(e)
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
    lazy: Option<LazyAnswers>,
}

impl std::fmt::Debug for ReplayIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayIndex")
            .field("source_file", &self.source_file)
            .field("inserted_queries", &self.answers.len())
            .field(
                "lazy_queries",
                &self.lazy.as_ref().map(|l| l.records.queries().len()),
            )
            .finish()
    }
}

/// A JSON replay file's records, and each query's answers once parsed.
struct LazyAnswers {
    records: LazyRecords,
    /// The parsed answers of `records.queries()[i]`, once asked for.
    parsed: Vec<OnceLock<Result<QueryAnswers, RecordError>>>,
}

impl LazyAnswers {
    /// The answers of slot `i`, parsing its records on first use.
    fn answers(&self, i: usize) -> &Result<QueryAnswers, RecordError> {
        self.parsed[i].get_or_init(|| {
            let mut answers = QueryAnswers::new();
            for record in self.records.records(i) {
                add_record_answers(&mut answers, &record?);
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

    /// Opens an RL JSON output of `leverflow generate` lazily
    /// ([`LazyRecords`]) and parses the first records until one holds an
    /// answer.  Later, [`ReplayIndex::get`] parses a query's record(s) on
    /// first use.  A repeated query key keeps, per example sequence, the
    /// answer of the first record in the file; `_meta` and other
    /// non-numeric keys are skipped.
    ///
    /// Errors: the file cannot be read, its top level is not a JSON object
    /// ([`ReplayError::ReplayFile`]), a record parsed here does not parse
    /// ([`ReplayError::ReplayRecord`]), or no record holds an answer
    /// ([`ReplayError::NotGenerateOutput`]).
    pub fn open_json(path: &Path) -> Result<Self, ReplayError> {
        let records = LazyRecords::open(path)?;
        let mut index = Self::new(path.to_path_buf());
        // The early check that this is a generate output: records in file
        // order until one has an answer (normally the first).
        let mut found = false;
        for (q, record) in records.in_file_order() {
            let record = record.map_err(|e| index.record_error(q, e))?;
            if has_answer(&record) {
                found = true;
                break;
            }
        }
        if !found {
            return Err(ReplayError::NotGenerateOutput {
                path: path.to_path_buf(),
            });
        }
        let parsed = (0..records.queries().len())
            .map(|_| OnceLock::new())
            .collect();
        index.lazy = Some(LazyAnswers { records, parsed });
        Ok(index)
    }

    /// Reads the raw generations of an earlier output: a Parquet file (by
    /// extension) is read whole; a JSON file is opened lazily
    /// ([`ReplayIndex::open_json`]).
    pub fn open(path: &Path) -> Result<Self, ReplayError> {
        let is_parquet = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
        if !is_parquet {
            return Self::open_json(path);
        }
        let mut index = Self::new(path.to_path_buf());
        let (_meta, rows) = read_rl_parquet(path)?;
        for (q, r) in rows_to_records(rows) {
            index.insert_record(q, &r);
        }
        if !index.has_answers() {
            return Err(ReplayError::NotGenerateOutput {
                path: path.to_path_buf(),
            });
        }
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
    /// [`ReplayError::ReplayRecord`], on every request for its query.
    pub fn get(
        &self,
        query_index: u64,
        examples: &[u64],
    ) -> Result<Option<VqaAnswer>, ReplayError> {
        if let Some(a) = self.answers.get(&query_index).and_then(|m| m.get(examples)) {
            return Ok(Some(a.clone()));
        }
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        let Some(i) = lazy.records.slot(query_index) else {
            return Ok(None);
        };
        match lazy.answers(i) {
            Ok(m) => Ok(m.get(examples).cloned()),
            Err(e) => Err(self.record_error(query_index, e.clone())),
        }
    }

    fn record_error(&self, query_index: u64, e: RecordError) -> ReplayError {
        ReplayError::ReplayRecord {
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
    index: Arc<ReplayIndex>,
}

impl ReplayModel {
    /// A backend answering from `index`.
    pub fn new(index: Arc<ReplayIndex>) -> Self {
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
                let found = self.index.get(p.query_index, &examples)?;
                found.ok_or_else(|| {
                    ReplayError::MissingReplay {
                        source_file: self.index.source_file.clone(),
                        query_index: p.query_index,
                        examples,
                    }
                    .into()
                })
            })
            .collect()
    }
}

/// Loads the backend of a run: the `replay_from` file, identified by its
/// content (the recorded answers are the model).
pub fn load(ctx: &super::BackendContext<'_>) -> Result<super::LoadedBackend, super::BackendError> {
    let path = ctx.config.replay_from.as_deref().ok_or_else(|| {
        crate::config::ConfigError::new(
            "replay_from",
            "the replay backend needs an earlier leverflow JSON or Parquet output",
        )
    })?;
    let index = Arc::new(ReplayIndex::open(path)?);
    let mut identity = ReplayModel::new(Arc::clone(&index)).identity();
    if let serde_json::Value::Object(m) = &mut identity {
        m.insert("sha256".into(), ctx.digests.sha256(path)?.into());
    }
    tracing::debug!("replay backend loaded");
    let factory: super::VqaFactory = Arc::new(move |_worker: usize| {
        Ok(Box::new(ReplayModel::new(Arc::clone(&index))) as Box<dyn VqaModel>)
    });
    Ok(super::LoadedBackend {
        factory,
        identity,
        recorded: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::contract::PromptExample;

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

    use crate::outputs::{visit_rl_json, JsonOptions, JsonSink};
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
                question_id: Some(q + 1000),
                image_id: Some(7),
                question: Some(format!("what {} ?", TRICKY[(q % 6) as usize])),
                gt_answers_raw: Some(vec!["a\"b".into()]),
                gt_answers_norm: Some(vec!["a\"b".into()]),
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
            assert!(
                matches!(err, ReplayError::ReplayRecord { query_index, .. } if query_index == q)
            );
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
