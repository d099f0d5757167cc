//! Official scoring of a results file (`leverflow score`): the question and
//! annotation files are indexed once ([`ScoringIndex`]), then a results list
//! `[{"question_id", "answer"}]` is scored like `VQA.loadRes` +
//! `VQAEval(n=2).evaluate()` on freshly loaded objects ([`score_predictions`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use super::gt::{acc_score_from_percent, GtAnswers};
use super::normalize::{py_round, Normalizer};

/// Errors of loading evaluation files and scoring results; each names the
/// file and the place in it.
#[derive(Debug, thiserror::Error)]
pub enum AccuracyError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON (truncated, syntax error).
    #[error("{path}:{line}:{column}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// The JSON does not have the expected shape, or refers to something that
    /// does not exist.
    #[error("{path}: {place}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Where in the file, e.g. `annotations[3].answers[2].answer`.
        place: String,
        /// What is wrong.
        message: String,
    },
}

fn format_err(path: &Path, place: impl Into<String>, message: impl Into<String>) -> AccuracyError {
    AccuracyError::Format {
        path: path.to_path_buf(),
        place: place.into(),
        message: message.into(),
    }
}

/// Reads and parses a JSON file, with file/line/column in errors.
pub(crate) fn read_json(path: &Path) -> Result<Value, AccuracyError> {
    let bytes = read_bytes(path)?;
    parse_value(path, &bytes)
}

/// Reads a whole file.
fn read_bytes(path: &Path) -> Result<Vec<u8>, AccuracyError> {
    std::fs::read(path).map_err(|source| AccuracyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses a file's bytes into a `Value`, with file/line/column in errors.
fn parse_value(path: &Path, bytes: &[u8]) -> Result<Value, AccuracyError> {
    serde_json::from_slice(bytes).map_err(|e| AccuracyError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

fn as_question_id(v: Option<&Value>, path: &Path, place: &str) -> Result<u64, AccuracyError> {
    match v {
        None => Err(format_err(path, place, "missing key `question_id`")),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            format_err(
                path,
                format!("{place}.question_id"),
                format!("expected a non-negative integer, found {n}"),
            )
        }),
        Some(other) => Err(format_err(
            path,
            format!("{place}.question_id"),
            format!("expected a non-negative integer, found {other}"),
        )),
    }
}

fn as_array<'v>(v: &'v Value, path: &Path, place: &str) -> Result<&'v Vec<Value>, AccuracyError> {
    v.as_array()
        .ok_or_else(|| format_err(path, place, "expected a list"))
}

fn as_object<'v>(
    v: &'v Value,
    path: &Path,
    place: &str,
) -> Result<&'v Map<String, Value>, AccuracyError> {
    v.as_object()
        .ok_or_else(|| format_err(path, place, "expected an object"))
}

fn opt_str(
    obj: &Map<String, Value>,
    key: &str,
    path: &Path,
    place: &str,
) -> Result<Option<String>, AccuracyError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format_err(
            path,
            format!("{place}.{key}"),
            format!("expected a string, found {other}"),
        )),
    }
}

/// The ground truth of one question in a [`ScoringIndex`].
///
/// The raw answers are kept as loaded and normalised on first use
/// ([`Entry::gt`]): a run that scores a few questions does not pay for
/// normalising every answer of the file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    /// The raw answers, concatenated in annotation order.
    raw: Box<str>,
    /// End (byte offset in `raw`) of each raw answer.
    ends: Box<[u32]>,
    /// Per answer, an id of "the answer dict without its `answer`"; `None`
    /// when those are all distinct (unique `answer_id`s), so that only
    /// position tells answers apart.
    rest_ids: Option<Box<[u32]>>,
    question_type: Option<Arc<str>>,
    answer_type: Arc<str>,
    multiple_choices: Option<Box<[Box<str>]>>,
    /// The answers normalised once (a freshly loaded evaluator), prepared on
    /// first use; the index is shared by threads, hence a `OnceLock`. Not
    /// part of a snapshot: prepared again on first use.
    #[serde(skip)]
    gt: OnceLock<GtAnswers>,
}

/// Shares the few distinct question / answer type strings of a file.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(Arc::clone(&a));
        a
    }
}

impl Entry {
    /// An entry of raw answers (not yet normalised).
    #[allow(clippy::too_many_arguments)]
    fn new<'s>(
        answers: impl ExactSizeIterator<Item = &'s str> + Clone,
        rest_ids: Option<Box<[u32]>>,
        question_type: Option<&str>,
        answer_type: Option<&str>,
        multiple_choices: Option<Box<[Box<str>]>>,
        types: &mut Interner,
        path: &Path,
        place: &dyn Fn() -> String,
    ) -> Result<Self, AccuracyError> {
        let mut ends = Vec::with_capacity(answers.len());
        let mut raw = String::with_capacity(answers.clone().map(str::len).sum());
        for a in answers {
            raw.push_str(a);
            let end = u32::try_from(raw.len()).map_err(|_| {
                format_err(path, place(), "the answers are longer than 4 GiB in all")
            })?;
            ends.push(end);
        }
        Ok(Entry {
            raw: raw.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            rest_ids,
            question_type: question_type.map(|t| types.get(t)),
            answer_type: types.get(answer_type.unwrap_or("other")),
            multiple_choices,
            gt: OnceLock::new(),
        })
    }

    /// The raw answers, in annotation order.
    fn raw_answers(&self) -> impl Iterator<Item = &str> {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let end = end as usize;
            let a = self.raw.get(start..end).unwrap_or_default();
            start = end;
            a
        })
    }

    /// Whether the question has no ground-truth answer.
    fn has_no_answers(&self) -> bool {
        self.ends.is_empty()
    }

    /// The normalised ground truth, prepared on the first call.
    fn gt(&self) -> &GtAnswers {
        self.gt.get_or_init(|| {
            let mut norm = Normalizer::new();
            let normalized: Vec<String> = self
                .raw_answers()
                .map(|a| norm.normalize(a).to_owned())
                .collect();
            let excluded = exclusions(&normalized, self.rest_ids.as_deref());
            GtAnswers::with_exclusions(normalized, excluded)
        })
    }

    /// The ground truth as the original sees it on its `pass`-th evaluation
    /// of this question within one `evaluate()` (it normalises the answers in
    /// place each time; only answers with more than 32 removable periods
    /// change after the first pass).
    fn gt_at_pass(&self, pass: usize) -> Cow<'_, GtAnswers> {
        let gt = self.gt();
        if pass <= 1 {
            return Cow::Borrowed(gt);
        }
        let mut norm = Normalizer::new();
        let mut answers: Vec<String> = gt.answers().map(str::to_owned).collect();
        for _ in 1..pass {
            let next: Vec<String> = answers
                .iter()
                .map(|a| norm.normalize(a).to_owned())
                .collect();
            if next == answers {
                break;
            }
            answers = next;
        }
        let excluded = exclusions(&answers, self.rest_ids.as_deref());
        Cow::Owned(GtAnswers::with_exclusions(answers, excluded))
    }
}

fn exclusions(answers: &[String], rest_ids: Option<&[u32]>) -> Vec<u32> {
    match rest_ids {
        None => vec![1; answers.len()],
        Some(rest) => (0..answers.len())
            .map(|i| {
                (0..answers.len())
                    .filter(|&j| rest[j] == rest[i] && answers[j] == answers[i])
                    .count() as u32
            })
            .collect(),
    }
}

/// Official VQA question + annotation files indexed for scoring: per question
/// the ground-truth answers (normalised into [`GtAnswers`] on first use),
/// question type and answer type.
///
/// The index is meant to be shared (`Arc`) by the threads that score: the
/// lazily prepared ground truth of a question is computed once, by whichever
/// thread asks first.
///
/// Serialisable for the parsed-dataset snapshot
/// ([`crate::state::snapshot`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScoringIndex {
    questions_path: PathBuf,
    annotations_path: PathBuf,
    multiple_choice: bool,
    entries: HashMap<u64, Entry>,
}

/// Loads the official question and annotation files.
///
/// * questions: `{"task_type"?, "questions": [{"question_id", ...}]}`, or a
///   merged file whose `annotations` hold `question` (VQAv2/OK-VQA "hf"
///   style). The header keys the original `loadRes` copies (`info`,
///   `license`, ...) are not required. With `task_type` "Multiple Choice",
///   `multiple_choices` are kept and checked when scoring.
/// * annotations: `{"annotations": [{"question_id", "answers": [{"answer",
///   ...}], "question_type"?, "answer_type"?, "question"?, ...}]}`; a later
///   entry for the same `question_id` replaces an earlier one, like the
///   original's index.
///
/// The files are parsed into typed records that borrow the file's text (fast:
/// no `serde_json::Value` tree). Anything that parse does not take as is (a
/// malformed file, a duplicate key, an unexpected shape) is loaded again the
/// general way, [`ScoringIndex::from_values`], which names the place of an
/// error; so the result, and every error, is the same as that of
/// `from_values`.
pub fn load_questions_annotations(
    questions: &Path,
    annotations: &Path,
) -> Result<ScoringIndex, AccuracyError> {
    let q_bytes = read_bytes(questions)?;
    let a_bytes = if questions == annotations {
        None
    } else {
        match read_bytes(annotations) {
            Ok(b) => Some(b),
            Err(e) => {
                // The question file is parsed before the annotation file is
                // read: its JSON error, if any, comes first.
                parse_value(questions, &q_bytes)?;
                return Err(e);
            }
        }
    };
    let a_ref = a_bytes.as_deref().unwrap_or(&q_bytes);
    if let Some(index) = ScoringIndex::from_slices_typed(&q_bytes, a_ref, questions, annotations) {
        return Ok(index);
    }
    let q = parse_value(questions, &q_bytes)?;
    let a = match &a_bytes {
        Some(b) => Some(parse_value(annotations, b)?),
        None => None,
    };
    ScoringIndex::from_values(&q, a.as_ref().unwrap_or(&q), questions, annotations)
}

impl ScoringIndex {
    /// Builds the index from already parsed question and annotation JSON
    /// (`questions_path` / `annotations_path` only name them in errors).
    ///
    /// This is the general (slower) loader: [`load_questions_annotations`]
    /// uses it for the files its typed parse does not take, and its result
    /// is the reference the typed parse must reproduce.
    pub fn from_values(
        questions: &Value,
        annotations: &Value,
        questions_path: &Path,
        annotations_path: &Path,
    ) -> Result<Self, AccuracyError> {
        let qobj = as_object(questions, questions_path, "top level")?;
        let task_type = opt_str(qobj, "task_type", questions_path, "top level")?;
        let multiple_choice = task_type.as_deref() == Some("Multiple Choice");
        let mut choices: HashMap<u64, Box<[Box<str>]>> = HashMap::new();
        if let Some(list) = qobj.get("questions") {
            let list = as_array(list, questions_path, "questions")?;
            for (i, item) in list.iter().enumerate() {
                let place = format!("questions[{i}]");
                let obj = as_object(item, questions_path, &place)?;
                let qid = as_question_id(obj.get("question_id"), questions_path, &place)?;
                if multiple_choice {
                    let mc = obj.get("multiple_choices").ok_or_else(|| {
                        format_err(
                            questions_path,
                            &place,
                            "missing key `multiple_choices` (Multiple Choice task)",
                        )
                    })?;
                    let mc = as_array(mc, questions_path, &format!("{place}.multiple_choices"))?;
                    let mut out = Vec::with_capacity(mc.len());
                    for (k, c) in mc.iter().enumerate() {
                        let s = c.as_str().ok_or_else(|| {
                            format_err(
                                questions_path,
                                format!("{place}.multiple_choices[{k}]"),
                                "expected a string",
                            )
                        })?;
                        out.push(Box::<str>::from(s));
                    }
                    choices.insert(qid, out.into_boxed_slice());
                }
            }
        } else if let Some(list) = qobj.get("annotations") {
            // merged style: the questions live inside the annotations
            let list = as_array(list, questions_path, "annotations")?;
            for (i, item) in list.iter().enumerate() {
                let place = format!("annotations[{i}]");
                let obj = as_object(item, questions_path, &place)?;
                as_question_id(obj.get("question_id"), questions_path, &place)?;
                if !obj.contains_key("question") {
                    return Err(format_err(
                        questions_path,
                        place,
                        "missing key `question` (merged annotations used as the question file)",
                    ));
                }
            }
        } else {
            return Err(format_err(
                questions_path,
                "top level",
                "expected a `questions` list (or merged `annotations` holding `question`)",
            ));
        }

        let aobj = as_object(annotations, annotations_path, "top level")?;
        let list = aobj.get("annotations").ok_or_else(|| {
            format_err(annotations_path, "top level", "missing key `annotations`")
        })?;
        let list = as_array(list, annotations_path, "annotations")?;
        let mut entries = HashMap::with_capacity(list.len());
        let mut types = Interner::default();
        for (i, item) in list.iter().enumerate() {
            let place = format!("annotations[{i}]");
            let obj = as_object(item, annotations_path, &place)?;
            let qid = as_question_id(obj.get("question_id"), annotations_path, &place)?;
            let answers = obj
                .get("answers")
                .ok_or_else(|| format_err(annotations_path, &place, "missing key `answers`"))?;
            let answers = as_array(answers, annotations_path, &format!("{place}.answers"))?;
            let mut texts: Vec<&str> = Vec::with_capacity(answers.len());
            let mut dicts = Vec::with_capacity(answers.len());
            for (k, ans) in answers.iter().enumerate() {
                let aplace = format!("{place}.answers[{k}]");
                let aobj = as_object(ans, annotations_path, &aplace)?;
                let text = match aobj.get("answer") {
                    Some(Value::String(s)) => s,
                    Some(other) => {
                        return Err(format_err(
                            annotations_path,
                            format!("{aplace}.answer"),
                            format!("expected a string, found {other}"),
                        ))
                    }
                    None => {
                        return Err(format_err(annotations_path, aplace, "missing key `answer`"))
                    }
                };
                texts.push(text);
                dicts.push(aobj);
            }
            let rest_ids = rest_ids(&dicts);
            let question_type = opt_str(obj, "question_type", annotations_path, &place)?;
            let answer_type = opt_str(obj, "answer_type", annotations_path, &place)?;
            let multiple_choices = if multiple_choice {
                choices.remove(&qid)
            } else {
                None
            };
            let entry = Entry::new(
                texts.into_iter(),
                rest_ids,
                question_type.as_deref(),
                answer_type.as_deref(),
                multiple_choices,
                &mut types,
                annotations_path,
                &|| place.clone(),
            )?;
            entries.insert(qid, entry);
        }
        Ok(Self {
            questions_path: questions_path.to_path_buf(),
            annotations_path: annotations_path.to_path_buf(),
            multiple_choice,
            entries,
        })
    }

    /// The typed fast path of [`load_questions_annotations`] on the files'
    /// bytes: `None` when the files are not taken as is (malformed, a
    /// duplicate key, an unexpected shape), for [`ScoringIndex::from_values`]
    /// to decide.
    fn from_slices_typed(
        questions: &[u8],
        annotations: &[u8],
        questions_path: &Path,
        annotations_path: &Path,
    ) -> Option<Self> {
        // Valid UTF-8 up front, so that the parse need not check every string
        // (and accepts no file that `from_values`' parse would refuse).
        let questions = std::str::from_utf8(questions).ok()?;
        let annotations = std::str::from_utf8(annotations).ok()?;
        let (qfile, afile) = typed::parse_files(questions, annotations)?;
        Self::from_typed(
            &qfile,
            &afile,
            annotations,
            questions_path,
            annotations_path,
        )
    }

    /// Builds the index from the typed records of the question and
    /// annotation files (`annotations_text` is the annotation file they were
    /// read from); `None` when [`ScoringIndex::from_values`] must decide.
    pub(crate) fn from_typed(
        qfile: &typed::QuestionFile<'_>,
        afile: &typed::AnnotationFile<'_>,
        annotations_text: &str,
        questions_path: &Path,
        annotations_path: &Path,
    ) -> Option<Self> {
        let multiple_choice = qfile.task_type.as_deref() == Some("Multiple Choice");
        let mut choices: HashMap<u64, Box<[Box<str>]>> = HashMap::new();
        if let Some(list) = &qfile.questions {
            if multiple_choice {
                for q in list {
                    let mc = q.multiple_choices.as_ref()?;
                    choices.insert(q.question_id, mc.iter().map(|c| Box::from(&**c)).collect());
                }
            }
        } else if let Some(list) = &qfile.annotations {
            if !list.iter().all(|q| q.has_question) {
                return None;
            }
        } else {
            return None;
        }

        let anns = &afile.annotations;
        // Annotations whose answers are not told apart by unique
        // `answer_id`s need their whole answer dicts (a second, selective
        // parse; rare in practice).
        let flagged: Vec<usize> = anns
            .iter()
            .enumerate()
            .filter(|(_, a)| !typed::ids_unique(afile.answers_of(a)))
            .map(|(i, _)| i)
            .collect();
        let mut flagged_rest: Vec<Option<Box<[u32]>>> = Vec::with_capacity(flagged.len());
        if !flagged.is_empty() {
            let dicts = typed::answer_dicts(annotations_text, &flagged)?;
            if dicts.len() != flagged.len() {
                return None;
            }
            for (&i, d) in flagged.iter().zip(&dicts) {
                if d.len() != afile.answers_of(&anns[i]).len() {
                    return None;
                }
                let refs: Vec<&Map<String, Value>> = d.iter().collect();
                flagged_rest.push(rest_ids(&refs));
            }
        }
        let mut flagged_rest = flagged.iter().copied().zip(flagged_rest).peekable();

        let mut entries = HashMap::with_capacity(anns.len());
        let mut types = Interner::default();
        for (i, a) in anns.iter().enumerate() {
            let rest = match flagged_rest.peek() {
                Some((f, _)) if *f == i => flagged_rest.next().and_then(|(_, r)| r),
                _ => None,
            };
            let multiple_choices = if multiple_choice {
                choices.remove(&a.question_id)
            } else {
                None
            };
            let entry = Entry::new(
                afile.answers_of(a).iter().map(|x| &*x.answer),
                rest,
                a.question_type.as_deref(),
                a.answer_type.as_deref(),
                multiple_choices,
                &mut types,
                annotations_path,
                &|| format!("annotations[{i}]"),
            )
            .ok()?;
            entries.insert(a.question_id, entry);
        }
        Some(Self {
            questions_path: questions_path.to_path_buf(),
            annotations_path: annotations_path.to_path_buf(),
            multiple_choice,
            entries,
        })
    }

    /// Number of annotated questions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no question is annotated.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The question file this index was built from.
    pub fn questions_path(&self) -> &Path {
        &self.questions_path
    }

    /// The annotation file this index was built from.
    pub fn annotations_path(&self) -> &Path {
        &self.annotations_path
    }

    /// The prepared ground truth of a question (normalised on the first
    /// call for that question).
    pub fn gt(&self, question_id: u64) -> Option<&GtAnswers> {
        self.entries.get(&question_id).map(Entry::gt)
    }

    /// Question type and answer type (`"other"` when absent) of a question.
    pub fn types(&self, question_id: u64) -> Option<(Option<&str>, &str)> {
        self.entries
            .get(&question_id)
            .map(|e| (e.question_type.as_deref(), &*e.answer_type))
    }

    /// Scores one raw prediction (the hot path of the pipeline): the
    /// `vqa_acc_score` the original records, or `None` when the question is
    /// not annotated or has no answers (where the original's evaluator
    /// raises and the candidate is not scored by these files).
    #[inline]
    pub fn evaluate(&self, question_id: u64, pred_raw: &str, norm: &mut Normalizer) -> Option<f64> {
        let entry = self.entries.get(&question_id)?;
        if entry.has_no_answers() {
            return None;
        }
        Some(entry.gt().accuracy(norm.normalize(pred_raw)))
    }
}

/// An id per answer dict for "equal apart from `answer`", or `None` when all
/// are distinct (the usual case: unique `answer_id`s).
fn rest_ids(dicts: &[&Map<String, Value>]) -> Option<Box<[u32]>> {
    let ids: Vec<Option<&Value>> = dicts.iter().map(|d| d.get("answer_id")).collect();
    let all_unique =
        ids.iter().all(Option::is_some) && (0..ids.len()).all(|i| (0..i).all(|j| ids[i] != ids[j]));
    if all_unique {
        return None;
    }
    let keys: Vec<String> = dicts
        .iter()
        .map(|d| {
            let rest: BTreeMap<&String, &Value> =
                d.iter().filter(|(k, _)| *k != "answer").collect();
            serde_json::to_string(&rest).unwrap_or_default()
        })
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let first = keys[..i].iter().position(|p| p == k).unwrap_or(i);
        out.push(first as u32);
    }
    Some(out.into_boxed_slice())
}

pub(crate) mod typed;

/// The official result of scoring one results list.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreReport {
    /// `round(100 * sum(acc) / n, 2)` over the evaluated entries (an entry
    /// per result, so a question listed twice counts twice, like the
    /// original's `getQuesIds`).
    pub overall: f64,
    /// Per question, the accuracy in `[0, 1]` that leverflow records as
    /// `vqa_acc_score` (the official `evalQA` percentage converted by
    /// [`acc_score_from_percent`]).
    pub per_question: BTreeMap<u64, f64>,
    /// Official `perQuestionType` percentages (questions without a
    /// `question_type` are left out).
    pub per_question_type: BTreeMap<String, f64>,
    /// Official `perAnswerType` percentages.
    pub per_answer_type: BTreeMap<String, f64>,
}

impl ScoreReport {
    /// `{"overall", "perQuestion": {"<qid>": acc}, "perQuestionType",
    /// "perAnswerType"}`.
    pub fn to_json(&self) -> Value {
        let per_question: Map<String, Value> = self
            .per_question
            .iter()
            .map(|(q, a)| (q.to_string(), Value::from(*a)))
            .collect();
        let map = |m: &BTreeMap<String, f64>| -> Value {
            Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect(),
            )
        };
        serde_json::json!({
            "overall": self.overall,
            "perQuestion": per_question,
            "perQuestionType": map(&self.per_question_type),
            "perAnswerType": map(&self.per_answer_type),
        })
    }
}

fn mean_percent(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().fold(0.0, |s, v| s + v);
    py_round(100.0 * sum / values.len() as f64, 2)
}

/// Scores an official results file `[{"question_id", "answer"}, ...]`
/// against the index, like the original's freshly loaded `VQA` + `loadRes` +
/// `VQAEval(n=2).evaluate()`: every result's question must be annotated (and
/// have answers), answers must be strings; when a question is listed more
/// than once its last answer is scored once per listing.
pub fn score_predictions(
    index: &ScoringIndex,
    predictions: &Path,
) -> Result<ScoreReport, AccuracyError> {
    let value = read_json(predictions)?;
    score_results(index, &value, predictions)
}

/// [`score_predictions`] on an already parsed results list (`path` names it
/// in errors).
pub fn score_results(
    index: &ScoringIndex,
    results: &Value,
    path: &Path,
) -> Result<ScoreReport, AccuracyError> {
    let list = results
        .as_array()
        .ok_or_else(|| format_err(path, "top level", "results is not an array of objects"))?;
    if list.is_empty() {
        return Err(format_err(path, "top level", "no results to score"));
    }
    let mut order: Vec<u64> = Vec::with_capacity(list.len());
    let mut last: HashMap<u64, &str> = HashMap::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let place = format!("[{i}]");
        let obj = as_object(item, path, &place)?;
        let qid = as_question_id(obj.get("question_id"), path, &place)?;
        let answer = match obj.get("answer") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(format_err(
                    path,
                    format!("{place}.answer"),
                    format!("expected a string, found {other}"),
                ))
            }
            None => return Err(format_err(path, place, "missing key `answer`")),
        };
        let entry = index.entries.get(&qid).ok_or_else(|| {
            format_err(
                path,
                format!("{place}.question_id"),
                format!(
                    "question {qid} is not in the annotations {}",
                    index.annotations_path.display()
                ),
            )
        })?;
        if index.multiple_choice {
            let ok = entry
                .multiple_choices
                .as_deref()
                .is_some_and(|c| c.iter().any(|x| &**x == answer));
            if !ok {
                return Err(format_err(
                    path,
                    format!("{place}.answer"),
                    "predicted answer is not one of the multiple choices",
                ));
            }
        }
        if entry.has_no_answers() {
            return Err(format_err(
                path,
                format!("{place}.question_id"),
                format!(
                    "question {qid} has no ground-truth answers in {}",
                    index.annotations_path.display()
                ),
            ));
        }
        order.push(qid);
        last.insert(qid, answer);
    }

    let mut norm = Normalizer::new();
    let mut normalized: HashMap<u64, String> = HashMap::with_capacity(last.len());
    for (&qid, &ans) in &last {
        normalized.insert(qid, norm.normalize(ans).to_owned());
    }
    let mut passes: HashMap<u64, usize> = HashMap::new();
    let mut acc_all = Vec::with_capacity(order.len());
    let mut by_qtype: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut by_atype: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut per_question = BTreeMap::new();
    for qid in order {
        let Some(entry) = index.entries.get(&qid) else {
            continue; // checked above
        };
        let pass = passes.entry(qid).or_insert(0);
        *pass += 1;
        let gt = entry.gt_at_pass(*pass);
        let pred = normalized.get(&qid).map_or("", String::as_str);
        let mean = gt.mean_accuracy(pred);
        acc_all.push(mean);
        if let Some(t) = &entry.question_type {
            by_qtype.entry(t.to_string()).or_default().push(mean);
        }
        by_atype
            .entry(entry.answer_type.to_string())
            .or_default()
            .push(mean);
        per_question.insert(qid, acc_score_from_percent(gt.percent(pred)));
    }
    Ok(ScoreReport {
        overall: mean_percent(&acc_all),
        per_question,
        per_question_type: by_qtype
            .iter()
            .map(|(k, v)| (k.clone(), mean_percent(v)))
            .collect(),
        per_answer_type: by_atype
            .iter()
            .map(|(k, v)| (k.clone(), mean_percent(v)))
            .collect(),
    })
}

#[cfg(test)]
mod typed_tests;
