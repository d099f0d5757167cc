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
#[derive(Debug, Clone)]
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
    /// first use; the index is shared by threads, hence a `OnceLock`.
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
#[derive(Debug, Clone)]
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

/// Typed records of the question and annotation files for the fast path of
/// [`load_questions_annotations`].
///
/// They borrow strings from the file's bytes and skip what the index does not
/// need with [`typed::Skip`], which validates exactly like parsing into a
/// `serde_json::Value` (numbers in range, strings valid UTF-8, paired
/// surrogate escapes): a file these records accept is one `from_values` would
/// parse too. Objects are read only from JSON objects (never from arrays, as
/// derived structs would), and a repeated key is an error (a `Value` keeps
/// the last one), so such files go the general way.
pub(crate) mod typed {
    use std::borrow::Cow;
    use std::fmt;
    use std::ops::{Deref, Range};

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};
    use serde_json::{Map, Value};

    /// A JSON string, borrowed from the input when it has no escapes.
    pub(crate) struct Str<'a>(Cow<'a, str>);

    impl Deref for Str<'_> {
        type Target = str;
        fn deref(&self) -> &str {
            &self.0
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Cow<'de, str>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Cow::Borrowed(v))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Cow::Owned(v.to_owned()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Cow::Owned(v))
                }
            }
            d.deserialize_str(V).map(Str)
        }
    }

    /// A value read loosely: a string (borrowed when it can be), `null`, or
    /// anything else (consumed, checked like a `Value`). For fields only the
    /// dataset reads, so that an odd value there does not turn the scoring
    /// index to the general way.
    pub(crate) enum Loose<'a> {
        /// A string.
        Str(Cow<'a, str>),
        /// `null`.
        Null,
        /// Any other value.
        Other,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Loose<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Loose::Str(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Loose::Str(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Loose::Str(Cow::Owned(v)))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                    Ok(Loose::Null)
                }
                fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                    Ok(Loose::Null)
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                    Ok(Loose::Other)
                }
                fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                    Ok(Loose::Other)
                }
                fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                    Ok(Loose::Other)
                }
                fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                    Ok(Loose::Other)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                    SkipVisitor.visit_seq(seq).map(|_| Loose::Other)
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                    SkipVisitor.visit_map(map).map(|_| Loose::Other)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// Parses a question file and an annotation file (the same text for a
    /// merged file) into their typed records; `None` when they are not taken
    /// as is.
    pub(crate) fn parse_files<'a>(
        questions: &'a str,
        annotations: &'a str,
    ) -> Option<(QuestionFile<'a>, AnnotationFile<'a>)> {
        let q = serde_json::from_str(questions).ok()?;
        let a = serde_json::from_str(annotations).ok()?;
        Some((q, a))
    }

    /// Any JSON value, consumed and dropped. Unlike `serde::de::IgnoredAny`
    /// it goes through `deserialize_any`, so strings and numbers are checked
    /// exactly as for a `serde_json::Value`.
    pub(crate) struct Skip;

    impl<'de> Deserialize<'de> for Skip {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(SkipVisitor)
        }
    }

    struct SkipVisitor;

    impl<'de> Visitor<'de> for SkipVisitor {
        type Value = Skip;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_none<E: de::Error>(self) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Skip, D::Error> {
            Skip::deserialize(d)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
            while seq.next_element::<Skip>()?.is_some() {}
            Ok(Skip)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
            while map.next_key::<Skip>()?.is_some() {
                map.next_value::<Skip>()?;
            }
            Ok(Skip)
        }
    }

    fn set_once<T, E: de::Error>(
        slot: &mut Option<T>,
        value: T,
        key: &'static str,
    ) -> Result<(), E> {
        if slot.is_some() {
            return Err(E::duplicate_field(key));
        }
        *slot = Some(value);
        Ok(())
    }

    /// A `question_id`: a non-negative integer (serde_json never hands a
    /// non-negative integer to `visit_i64` nor a float to `visit_u64`, so this
    /// accepts exactly what `Value::as_u64` does).
    fn question_id<'de, A: MapAccess<'de>>(map: &mut A) -> Result<u64, A::Error> {
        map.next_value::<u64>()
    }

    /// The `answer_id` of an answer dict, compared like the `Value`s.
    pub(crate) enum AnswerId {
        Missing,
        /// A non-negative integer (`Value::Number` holding a `u64`).
        Int(u64),
        /// Any other value.
        Other(Box<Value>),
    }

    impl AnswerId {
        fn from_value(v: Value) -> Self {
            match v.as_u64() {
                Some(n) => AnswerId::Int(n),
                None => AnswerId::Other(Box::new(v)),
            }
        }

        /// `Value` equality of two present ids (`None` when one is missing).
        fn same(&self, other: &AnswerId) -> Option<bool> {
            match (self, other) {
                (AnswerId::Missing, _) | (_, AnswerId::Missing) => None,
                (AnswerId::Int(a), AnswerId::Int(b)) => Some(a == b),
                (AnswerId::Other(a), AnswerId::Other(b)) => Some(a == b),
                // an integer `Value` never equals a non-integer one
                _ => Some(false),
            }
        }
    }

    /// Whether every answer has an `answer_id` and they are pairwise
    /// different (the condition of `rest_ids` returning `None`).
    pub(crate) fn ids_unique(answers: &[Answer<'_>]) -> bool {
        (0..answers.len()).all(|i| {
            !matches!(answers[i].id, AnswerId::Missing)
                && (0..i).all(|j| answers[i].id.same(&answers[j].id) == Some(false))
        })
    }

    /// One answer dict: its `answer` and `answer_id`.
    pub(crate) struct Answer<'a> {
        pub(crate) answer: Str<'a>,
        pub(crate) id: AnswerId,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Answer<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Answer<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an answer object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Answer<'de>, A::Error> {
                    let mut answer = None;
                    let mut id = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        match &*key {
                            "answer" => {
                                set_once(&mut answer, map.next_value::<Str<'de>>()?, "answer")?
                            }
                            "answer_id" => set_once(
                                &mut id,
                                AnswerId::from_value(map.next_value::<Value>()?),
                                "answer_id",
                            )?,
                            _ => {
                                map.next_value::<Skip>()?;
                            }
                        }
                    }
                    Ok(Answer {
                        answer: answer.ok_or_else(|| de::Error::missing_field("answer"))?,
                        id: id.unwrap_or(AnswerId::Missing),
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    /// One annotation: what the index (and the dataset) keeps of it.
    pub(crate) struct Annotation<'a> {
        pub(crate) question_id: u64,
        /// Its answers: a range of [`AnnotationFile::answers`] (one vector
        /// for the whole file rather than one per annotation).
        answers: Range<usize>,
        pub(crate) question_type: Option<Str<'a>>,
        pub(crate) answer_type: Option<Str<'a>>,
        /// For the dataset: `image_id` when present (`Some(None)` when it is
        /// not a non-negative integer).
        pub(crate) image_id: Option<Option<u64>>,
        /// For the dataset: `question` when present.
        pub(crate) question: Option<Loose<'a>>,
        /// For the dataset: `multiple_choice_answer` when present.
        pub(crate) multiple_choice_answer: Option<Loose<'a>>,
    }

    /// Reads one annotation, appending its answers to `answers`.
    struct AnnotationSeed<'v, 'de> {
        answers: &'v mut Vec<Answer<'de>>,
    }

    impl<'de> DeserializeSeed<'de> for AnnotationSeed<'_, 'de> {
        type Value = Annotation<'de>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for AnnotationSeed<'_, 'de> {
        type Value = Annotation<'de>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an annotation object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Annotation<'de>, A::Error> {
            let mut qid = None;
            let mut answers = None;
            let mut qtype = None;
            let mut atype = None;
            let mut image_id = None;
            let mut question = None;
            let mut mc_answer = None;
            while let Some(key) = map.next_key::<Str<'de>>()? {
                match &*key {
                    "question_id" => set_once(&mut qid, question_id(&mut map)?, "question_id")?,
                    "answers" => {
                        let range = map.next_value_seed(AnswersSeed {
                            answers: &mut *self.answers,
                        })?;
                        set_once(&mut answers, range, "answers")?
                    }
                    "question_type" => set_once(
                        &mut qtype,
                        map.next_value::<Option<Str<'de>>>()?,
                        "question_type",
                    )?,
                    "answer_type" => set_once(
                        &mut atype,
                        map.next_value::<Option<Str<'de>>>()?,
                        "answer_type",
                    )?,
                    "image_id" => set_once(
                        &mut image_id,
                        map.next_value::<Value>()?.as_u64(),
                        "image_id",
                    )?,
                    "question" => {
                        set_once(&mut question, map.next_value::<Loose<'de>>()?, "question")?
                    }
                    "multiple_choice_answer" => set_once(
                        &mut mc_answer,
                        map.next_value::<Loose<'de>>()?,
                        "multiple_choice_answer",
                    )?,
                    _ => {
                        map.next_value::<Skip>()?;
                    }
                }
            }
            Ok(Annotation {
                question_id: qid.ok_or_else(|| de::Error::missing_field("question_id"))?,
                answers: answers.ok_or_else(|| de::Error::missing_field("answers"))?,
                question_type: qtype.flatten(),
                answer_type: atype.flatten(),
                image_id,
                question,
                multiple_choice_answer: mc_answer,
            })
        }
    }

    /// Reads an `answers` list, appending to `answers`; gives its range.
    struct AnswersSeed<'v, 'de> {
        answers: &'v mut Vec<Answer<'de>>,
    }

    impl<'de> DeserializeSeed<'de> for AnswersSeed<'_, 'de> {
        type Value = Range<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for AnswersSeed<'_, 'de> {
        type Value = Range<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of answers")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Range<usize>, A::Error> {
            let start = self.answers.len();
            while let Some(a) = seq.next_element::<Answer<'de>>()? {
                self.answers.push(a);
            }
            Ok(start..self.answers.len())
        }
    }

    /// Reads the `annotations` list.
    struct AnnotationsSeed<'v, 'de> {
        answers: &'v mut Vec<Answer<'de>>,
    }

    impl<'de> DeserializeSeed<'de> for AnnotationsSeed<'_, 'de> {
        type Value = Vec<Annotation<'de>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for AnnotationsSeed<'_, 'de> {
        type Value = Vec<Annotation<'de>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of annotations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(a) = seq.next_element_seed(AnnotationSeed {
                answers: &mut *self.answers,
            })? {
                out.push(a);
            }
            Ok(out)
        }
    }

    /// The annotation file: its `annotations` list.
    pub(crate) struct AnnotationFile<'a> {
        pub(crate) annotations: Vec<Annotation<'a>>,
        /// The answers of all annotations, in file order.
        answers: Vec<Answer<'a>>,
    }

    impl<'a> AnnotationFile<'a> {
        /// The answers of one of the file's annotations.
        pub(crate) fn answers_of(&self, a: &Annotation<'_>) -> &[Answer<'a>] {
            self.answers.get(a.answers.clone()).unwrap_or_default()
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for AnnotationFile<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = AnnotationFile<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an annotation file object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<AnnotationFile<'de>, A::Error> {
                    let mut answers = Vec::new();
                    let mut annotations = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        if &*key == "annotations" {
                            let list = map.next_value_seed(AnnotationsSeed {
                                answers: &mut answers,
                            })?;
                            set_once(&mut annotations, list, "annotations")?;
                        } else {
                            map.next_value::<Skip>()?;
                        }
                    }
                    Ok(AnnotationFile {
                        annotations: annotations
                            .ok_or_else(|| de::Error::missing_field("annotations"))?,
                        answers,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    /// One entry of a question file's `questions`.
    pub(crate) struct Question<'a> {
        pub(crate) question_id: u64,
        pub(crate) multiple_choices: Option<Vec<Str<'a>>>,
        /// For the dataset: `question` when present.
        pub(crate) question: Option<Loose<'a>>,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Question<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Question<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a question object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Question<'de>, A::Error> {
                    let mut qid = None;
                    let mut mc = None;
                    let mut question = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        match &*key {
                            "question" => set_once(
                                &mut question,
                                map.next_value::<Loose<'de>>()?,
                                "question",
                            )?,
                            "question_id" => {
                                set_once(&mut qid, question_id(&mut map)?, "question_id")?
                            }
                            "multiple_choices" => set_once(
                                &mut mc,
                                map.next_value::<Vec<Str<'de>>>()?,
                                "multiple_choices",
                            )?,
                            _ => {
                                map.next_value::<Skip>()?;
                            }
                        }
                    }
                    Ok(Question {
                        question_id: qid.ok_or_else(|| de::Error::missing_field("question_id"))?,
                        multiple_choices: mc,
                        question,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    /// One entry of a merged file's `annotations` read as questions.
    pub(crate) struct MergedQuestion {
        pub(crate) has_question: bool,
    }

    impl<'de> Deserialize<'de> for MergedQuestion {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = MergedQuestion;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an annotation object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<MergedQuestion, A::Error> {
                    let mut qid = None;
                    let mut question = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        match &*key {
                            "question_id" => {
                                set_once(&mut qid, question_id(&mut map)?, "question_id")?
                            }
                            "question" => {
                                set_once(&mut question, map.next_value::<Skip>()?, "question")?
                            }
                            _ => {
                                map.next_value::<Skip>()?;
                            }
                        }
                    }
                    qid.ok_or_else(|| de::Error::missing_field("question_id"))?;
                    Ok(MergedQuestion {
                        has_question: question.is_some(),
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    /// The question file: `task_type` and the `questions` or (merged style)
    /// `annotations` list, each `None` when the key is absent.
    pub(crate) struct QuestionFile<'a> {
        pub(crate) task_type: Option<Str<'a>>,
        pub(crate) questions: Option<Vec<Question<'a>>>,
        pub(crate) annotations: Option<Vec<MergedQuestion>>,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for QuestionFile<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = QuestionFile<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a question file object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<QuestionFile<'de>, A::Error> {
                    let mut task_type = None;
                    let mut questions = None;
                    let mut annotations = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        match &*key {
                            "task_type" => set_once(
                                &mut task_type,
                                map.next_value::<Option<Str<'de>>>()?,
                                "task_type",
                            )?,
                            "questions" => set_once(
                                &mut questions,
                                map.next_value::<Vec<Question<'de>>>()?,
                                "questions",
                            )?,
                            "annotations" => set_once(
                                &mut annotations,
                                map.next_value::<Vec<MergedQuestion>>()?,
                                "annotations",
                            )?,
                            _ => {
                                map.next_value::<Skip>()?;
                            }
                        }
                    }
                    Ok(QuestionFile {
                        task_type: task_type.flatten(),
                        questions,
                        annotations,
                    })
                }
            }
            d.deserialize_map(V)
        }
    }

    /// The answer dicts of the annotations at positions `wanted` (ascending)
    /// of an annotation file already read by [`AnnotationFile`]; `None` when
    /// it cannot be read so.
    pub(crate) fn answer_dicts(
        text: &str,
        wanted: &[usize],
    ) -> Option<Vec<Vec<Map<String, Value>>>> {
        let mut de = serde_json::Deserializer::from_str(text);
        let out = FileSeed { wanted }.deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(out)
    }

    struct FileSeed<'w> {
        wanted: &'w [usize],
    }

    impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
        type Value = Vec<Vec<Map<String, Value>>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for FileSeed<'_> {
        type Value = Vec<Vec<Map<String, Value>>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an annotation file object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = None;
            while let Some(key) = map.next_key::<Str<'de>>()? {
                if &*key == "annotations" {
                    let list = map.next_value_seed(ListSeed {
                        wanted: self.wanted,
                    })?;
                    set_once(&mut out, list, "annotations")?;
                } else {
                    map.next_value::<Skip>()?;
                }
            }
            out.ok_or_else(|| de::Error::missing_field("annotations"))
        }
    }

    struct ListSeed<'w> {
        wanted: &'w [usize],
    }

    impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
        type Value = Vec<Vec<Map<String, Value>>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for ListSeed<'_> {
        type Value = Vec<Vec<Map<String, Value>>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of annotations")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(self.wanted.len());
            let mut next = self.wanted.iter().peekable();
            let mut i = 0usize;
            loop {
                if next.peek() == Some(&&i) {
                    next.next();
                    match seq.next_element::<AnswerDicts>()? {
                        Some(d) => out.push(d.0),
                        None => break,
                    }
                } else if seq.next_element::<Skip>()?.is_none() {
                    break;
                }
                i += 1;
            }
            Ok(out)
        }
    }

    /// The `answers` of one annotation, as whole dicts.
    struct AnswerDicts(Vec<Map<String, Value>>);

    impl<'de> Deserialize<'de> for AnswerDicts {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = AnswerDicts;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an annotation object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnswerDicts, A::Error> {
                    let mut answers = None;
                    while let Some(key) = map.next_key::<Str<'de>>()? {
                        if &*key == "answers" {
                            set_once(
                                &mut answers,
                                map.next_value::<Vec<Map<String, Value>>>()?,
                                "answers",
                            )?;
                        } else {
                            map.next_value::<Skip>()?;
                        }
                    }
                    answers
                        .map(AnswerDicts)
                        .ok_or_else(|| de::Error::missing_field("answers"))
                }
            }
            d.deserialize_map(V)
        }
    }
}

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
mod typed_tests {
    //! The typed parse of [`load_questions_annotations`] against the general
    //! `Value` way ([`ScoringIndex::from_values`], the loader before it), and
    //! the lazily prepared ground truth.

    use std::path::PathBuf;

    use super::*;
    use crate::dataset::{
        DatasetConfig, DatasetError, DatasetKind, DatasetScoringError, DatasetSplit, VqaDataset,
    };

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vqa_eval")
    }

    /// The loader as it was: both files parsed into `Value`s, then
    /// `from_values`.
    fn load_general(q: &Path, a: &Path) -> Result<ScoringIndex, AccuracyError> {
        let qv = read_json(q)?;
        let av = if q == a { None } else { Some(read_json(a)?) };
        ScoringIndex::from_values(&qv, av.as_ref().unwrap_or(&qv), q, a)
    }

    /// Whether the typed parse takes the files as is.
    fn typed_takes(q: &Path, a: &Path) -> bool {
        let qb = std::fs::read(q).unwrap();
        let ab = std::fs::read(a).unwrap();
        ScoringIndex::from_slices_typed(&qb, &ab, q, a).is_some()
    }

    /// Every stored field of two indices, and every prepared ground truth,
    /// are the same.
    fn assert_same(x: &ScoringIndex, y: &ScoringIndex) {
        assert_eq!(x.questions_path, y.questions_path);
        assert_eq!(x.annotations_path, y.annotations_path);
        assert_eq!(x.multiple_choice, y.multiple_choice);
        assert_eq!(x.entries.len(), y.entries.len());
        for (qid, e) in &x.entries {
            let f = &y.entries[qid];
            assert_eq!(e.raw, f.raw, "question {qid}");
            assert_eq!(e.ends, f.ends, "question {qid}");
            assert_eq!(e.rest_ids, f.rest_ids, "question {qid}");
            assert_eq!(e.question_type, f.question_type, "question {qid}");
            assert_eq!(e.answer_type, f.answer_type, "question {qid}");
            assert_eq!(e.multiple_choices, f.multiple_choices, "question {qid}");
            assert_eq!(e.gt(), f.gt(), "question {qid}");
        }
    }

    /// Loads both ways and checks the outcome is the same: the same index,
    /// or the same error.
    fn assert_same_outcome(q: &Path, a: &Path) -> Option<ScoringIndex> {
        match (load_questions_annotations(q, a), load_general(q, a)) {
            (Ok(x), Ok(y)) => {
                assert_same(&x, &y);
                Some(x)
            }
            (Err(x), Err(y)) => {
                assert_eq!(x.to_string(), y.to_string());
                None
            }
            (x, y) => panic!("typed {x:?}\ngeneral {y:?}"),
        }
    }

    fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn typed_parse_gives_the_general_index_on_the_fixtures() {
        let (q, a) = (
            fixture_dir().join("questions.json"),
            fixture_dir().join("annotations.json"),
        );
        assert!(typed_takes(&q, &a));
        let typed = load_questions_annotations(&q, &a).unwrap();
        let general = load_general(&q, &a).unwrap();
        assert_eq!(typed.len(), 300);
        assert_same(&typed, &general);
        // and what the index prepared eagerly before it was lazy
        let av = read_json(&a).unwrap();
        let mut norm = Normalizer::new();
        for ann in av["annotations"].as_array().unwrap() {
            let qid = ann["question_id"].as_u64().unwrap();
            let raw: Vec<&str> = ann["answers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["answer"].as_str().unwrap())
                .collect();
            let eager = GtAnswers::from_raw(&raw);
            assert_eq!(typed.gt(qid), Some(&eager));
            assert_eq!(
                typed.types(qid),
                Some((
                    ann["question_type"].as_str(),
                    ann["answer_type"].as_str().unwrap()
                ))
            );
            for pred in raw.iter().chain(&["yes", "no", "2", "Blue.", ""]) {
                let want = eager.accuracy(norm.normalize(pred));
                assert_eq!(typed.evaluate(qid, pred, &mut norm), Some(want));
                assert_eq!(general.evaluate(qid, pred, &mut norm), Some(want));
            }
        }
    }

    #[test]
    fn answers_without_unique_ids_keep_their_exclusions() {
        let dir = tempfile::tempdir().unwrap();
        let q = write(
            dir.path(),
            "q.json",
            r#"{"questions": [{"question_id": 1}, {"question_id": 2}]}"#,
        );
        // Duplicate keys cannot be written with `json!`: the text is literal.
        let a = write(
            dir.path(),
            "a.json",
            r#"{"annotations": [
  {"question_id": 1, "answers": [{"answer": "x"}, {"answer": "x"}, {"answer": "x"}, {"answer": "y"}]},
  {"question_id": 2, "answers": [{"answer": "a", "answer_id": 1, "c": "yes"}, {"answer": "a", "answer_id": 1, "c": "yes"}, {"answer": "b", "answer_id": 2}]},
  {"question_id": 3, "answers": [{"answer": "a", "answer_id": 1}, {"answer": "a", "answer_id": 1.0}]},
  {"question_id": 4, "answers": [{"answer": "a", "answer_id": "1"}, {"answer": "a", "answer_id": 1}]},
  {"question_id": 5, "answers": [{"answer": "a", "answer_id": 1.0}, {"answer": "a", "answer_id": 1e0}, {"answer": "a", "answer_id": 2}]},
  {"question_id": 6, "answers": [{"answer": "a", "c": "no", "c": "yes"}, {"answer": "a", "c": "yes"}, {"answer": "a", "c": "no"}]},
  {"question_id": 7, "answers": [{"answer": "a", "answer_id": 1}, {"answer": "a"}, {"answer": "a"}]},
  {"question_id": 8, "answers": []},
  {"question_id": 9, "answers": [{"answer": "a", "answer_id": {"k": [1]}}, {"answ\u0065r": "a", "answer_id": {"k": [1]}}, {"answer": "a\"b\u00e9", "answer_id": {"k": [2]}}]},
  {"question_id": 10, "answers": [{"answer": "two", "answer_id": 7}, {"answer": "2", "answer_id": 8}, {"answer": "2", "answer_id": 9}]}
]}"#,
        );
        assert!(typed_takes(&q, &a));
        let idx = assert_same_outcome(&q, &a).unwrap();
        let ex = |qid: u64| idx.gt(qid).unwrap().exclusions().to_vec();
        assert_eq!(ex(1), [3, 3, 3, 1]);
        assert_eq!(ex(2), [2, 2, 1]);
        assert_eq!(ex(3), [1, 1]); // 1 and 1.0 are different values
        assert_eq!(ex(4), [1, 1]);
        assert_eq!(ex(5), [2, 2, 1]); // 1.0 and 1e0 are the same value
        assert_eq!(ex(6), [2, 2, 1]); // the last "c" counts
        assert_eq!(ex(7), [1, 2, 2]);
        assert_eq!(ex(9), [2, 2, 1]);
        assert_eq!(ex(10), [1, 1, 1]);
        assert!(idx.entries[&10].rest_ids.is_none());
        let mut norm = Normalizer::new();
        assert_eq!(idx.evaluate(8, "a", &mut norm), None);
        assert_eq!(idx.entries[&9].raw_answers().nth(2), Some("a\"bé"));
    }

    #[test]
    fn ground_truth_is_prepared_lazily_and_once_for_all_threads() {
        let (q, a) = (
            fixture_dir().join("questions.json"),
            fixture_dir().join("annotations.json"),
        );
        let idx = Arc::new(load_questions_annotations(&q, &a).unwrap());
        assert!(idx.entries.values().all(|e| e.gt.get().is_none()));
        let mut norm = Normalizer::new();
        let first = *idx.entries.keys().next().unwrap();
        idx.evaluate(first, "yes", &mut norm);
        let prepared: Vec<u64> = idx
            .entries
            .iter()
            .filter(|(_, e)| e.gt.get().is_some())
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(prepared, [first]);

        let reference = load_general(&q, &a).unwrap();
        let mut qids: Vec<u64> = reference.entries.keys().copied().collect();
        qids.sort_unstable();
        let expected: HashMap<u64, GtAnswers> = qids
            .iter()
            .map(|&q| (q, reference.gt(q).unwrap().clone()))
            .collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (idx, qids, expected) = (&idx, &qids, &expected);
                s.spawn(move || {
                    let mut norm = Normalizer::new();
                    // Half the threads walk up, half down, from different
                    // starts: several prepare the same question at once.
                    for k in 0..qids.len() {
                        let at = if t % 2 == 0 { k } else { qids.len() - 1 - k };
                        let qid = qids[(at + t * 7) % qids.len()];
                        let gt = idx.gt(qid).unwrap();
                        assert_eq!(gt, &expected[&qid]);
                        for pred in expected[&qid].answers() {
                            let p = norm.normalize(pred).to_owned();
                            assert_eq!(
                                idx.evaluate(qid, pred, &mut norm),
                                Some(expected[&qid].accuracy(&p))
                            );
                        }
                    }
                });
            }
        });
        assert!(idx.entries.values().all(|e| e.gt.get().is_some()));
    }

    #[test]
    fn files_the_typed_parse_refuses_give_the_general_result_or_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let q = write(
            d,
            "q.json",
            r#"{"task_type": "Open-Ended", "questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}"#,
        );
        let ann = |body: &str| format!(r#"{{"info": {{}}, "annotations": [{body}]}}"#);
        let ok = r#"{"question_id": 1, "question_type": "what", "answer_type": "other", "answers": [{"answer": "a", "answer_id": 1}, {"answer": "b", "answer_id": 2}]}"#;
        // (annotation file text, typed parse takes it, loads)
        let cases: Vec<(String, bool, bool)> = vec![
            (ann(ok), true, true),
            // a repeated key: a `Value` keeps the last
            (
                ann(
                    r#"{"question_id": 1, "question_type": "a", "question_type": "b", "answers": []}"#,
                ),
                false,
                true,
            ),
            (
                ann(r#"{"question_id": 1, "answers": [{"answer": "a", "answer": "b"}]}"#),
                false,
                true,
            ),
            (
                ann(
                    r#"{"question_id": 1, "answers": [{"answer": "a", "answer_id": 1, "answer_id": 2}]}"#,
                ),
                false,
                true,
            ),
            (
                r#"{"annotations": [], "annotations": [{"question_id": 1, "answers": []}]}"#.into(),
                false,
                true,
            ),
            // shapes
            (format!("[{ok}]"), false, false),
            (ann(r#"[1, [{"answer": "a"}]]"#), false, false),
            (
                ann(r#"{"question_id": 1, "answers": ["a", "b"]}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "answers": {"answer": "a"}}"#),
                false,
                false,
            ),
            (ann(r#"{"question_id": 1, "answers": null}"#), false, false),
            (ann(r#"{"question_id": 1}"#), false, false),
            (ann(r#"{"question_id": 1.0, "answers": []}"#), false, false),
            (ann(r#"{"question_id": -1, "answers": []}"#), false, false),
            (
                ann(r#"{"question_id": 18446744073709551616, "answers": []}"#),
                false,
                false,
            ),
            (ann(r#"{"question_id": "1", "answers": []}"#), false, false),
            (
                ann(r#"{"question_id": 1, "answers": [{"answer": 3}]}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "answers": [{"answer": null}]}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "answers": [{"answer_id": 1}]}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "answer_type": 5, "answers": []}"#),
                false,
                false,
            ),
            (
                ann(
                    r#"{"question_id": 1, "answer_type": null, "question_type": null, "answers": []}"#,
                ),
                true,
                true,
            ),
            (r#"{"info": 1}"#.into(), false, false),
            // what a `Value` refuses anywhere, also in keys nobody reads
            (
                ann(r#"{"question_id": 1, "x": 1e400, "answers": []}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "x": "\ud800", "answers": []}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "x": "\udc00\ud800", "answers": []}"#),
                false,
                false,
            ),
            (
                ann(r#"{"question_id": 1, "x": "\ud83d\ude00", "answers": []}"#),
                true,
                true,
            ),
            (
                ann(r#"{"question_id": 1, "x": "\x", "answers": []}"#),
                false,
                false,
            ),
            (format!("{} x", ann(ok)), false, false),
            (ann(ok)[..40].to_owned(), false, false),
            // later annotations of a question replace earlier ones
            (
                ann(&format!(
                    r#"{ok}, {{"question_id": 1, "answers": [{{"answer": "c"}}]}}"#
                )),
                true,
                true,
            ),
        ];
        for (k, (text, takes, loads)) in cases.iter().enumerate() {
            let a = write(d, "a.json", text);
            assert_eq!(typed_takes(&q, &a), *takes, "case {k}: {text}");
            assert_eq!(
                assert_same_outcome(&q, &a).is_some(),
                *loads,
                "case {k}: {text}"
            );
        }
        // invalid UTF-8 in a string nobody reads
        let mut bytes = ann(r#"{"question_id": 1, "x": "??", "answers": []}"#).into_bytes();
        let at = bytes.iter().position(|&b| b == b'?').unwrap();
        bytes[at] = 0xff;
        let a = write(d, "a.json", bytes);
        assert!(!typed_takes(&q, &a));
        assert!(assert_same_outcome(&q, &a).is_none());

        // question files
        let a = write(d, "a.json", ann(ok));
        let qcases: Vec<(&str, bool, bool)> = vec![
            (r#"{"questions": null}"#, false, false),
            (
                r#"{"questions": [{"question_id": 1, "multiple_choices": null}]}"#,
                false,
                true,
            ),
            (
                r#"{"task_type": "Multiple Choice", "questions": [{"question_id": 1}]}"#,
                false,
                false,
            ),
            (
                r#"{"task_type": "Multiple Choice", "questions": [{"question_id": 1, "multiple_choices": ["a", 2]}]}"#,
                false,
                false,
            ),
            (
                r#"{"task_type": "Multiple Choice", "questions": [{"question_id": 1, "multiple_choices": ["a", "b"]}]}"#,
                true,
                true,
            ),
            (r#"{"task_type": 3, "questions": []}"#, false, false),
            (r#"{"annotations": [{"question_id": 1}]}"#, false, false),
            (
                r#"{"annotations": [{"question_id": 1, "question": null}]}"#,
                true,
                true,
            ),
            (r#"{"info": {}}"#, false, false),
            (r#"[]"#, false, false),
        ];
        for (k, (text, takes, loads)) in qcases.iter().enumerate() {
            let q = write(d, "q.json", text);
            assert_eq!(typed_takes(&q, &a), *takes, "question case {k}: {text}");
            assert_eq!(
                assert_same_outcome(&q, &a).is_some(),
                *loads,
                "question case {k}: {text}"
            );
        }
        // multiple choices go to the first annotation of a question only
        let q = write(
            d,
            "q.json",
            r#"{"task_type": "Multiple Choice", "questions": [{"question_id": 1, "multiple_choices": ["a", "b"]}]}"#,
        );
        let a = write(d, "a.json", ann(&format!("{ok}, {ok}")));
        assert!(typed_takes(&q, &a));
        let idx = assert_same_outcome(&q, &a).unwrap();
        assert!(idx.entries[&1].multiple_choices.is_none());

        // a merged file as both
        let m = write(
            d,
            "m.json",
            ann(
                r#"{"question_id": 4, "question": "?", "answers": [{"answer": "a", "answer_id": 1}]}"#,
            ),
        );
        assert!(typed_takes(&m, &m));
        assert_eq!(assert_same_outcome(&m, &m).unwrap().len(), 1);

        // read errors in the original order: the question file's JSON first
        let missing = d.join("missing.json");
        let bad_q = write(d, "bad_q.json", "{");
        let e = load_questions_annotations(&bad_q, &missing).unwrap_err();
        assert!(matches!(e, AccuracyError::Json { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            load_general(&bad_q, &missing).unwrap_err().to_string()
        );
        let e = load_questions_annotations(&q, &missing).unwrap_err();
        assert!(matches!(e, AccuracyError::Io { .. }), "{e}");
        let e = load_questions_annotations(&missing, &a).unwrap_err();
        assert!(matches!(e, AccuracyError::Io { .. }), "{e}");
    }

    fn config(q: &Path, a: &Path) -> DatasetConfig {
        DatasetConfig::new(
            DatasetKind::Vqav2Local,
            DatasetSplit::Train,
            Some(q.to_path_buf()),
            a.to_path_buf(),
            PathBuf::from("/images"),
        )
    }

    /// `load_with_scoring` against the two loaders one after the other.
    fn assert_same_as_separate(cfg: &DatasetConfig) -> bool {
        let q = cfg.questions.as_deref().unwrap();
        let separate = VqaDataset::load(cfg)
            .map_err(DatasetScoringError::from)
            .and_then(|d| Ok((d, load_questions_annotations(q, &cfg.annotations)?)));
        match (VqaDataset::load_with_scoring(cfg), separate) {
            (Ok((d1, i1)), Ok((d2, i2))) => {
                assert_eq!(d1.items(), d2.items());
                assert_eq!(d1.kind(), d2.kind());
                assert_same(&i1.unwrap(), &i2);
                true
            }
            (Err(e1), Err(e2)) => {
                assert_eq!(e1.to_string(), e2.to_string());
                assert_eq!(
                    matches!(e1, DatasetScoringError::Dataset(_)),
                    matches!(e2, DatasetScoringError::Dataset(_))
                );
                false
            }
            (x, y) => panic!("together {:?}\nseparately {:?}", x.err(), y.err()),
        }
    }

    #[test]
    fn dataset_and_index_from_one_parse_equal_the_two_loaders() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (q, a) in [
            (
                fixture_dir().join("questions.json"),
                fixture_dir().join("annotations.json"),
            ),
            (
                root.join("demo/data/questions.json"),
                root.join("demo/data/annotations.json"),
            ),
            (
                root.join("demo/data/heldout_questions.json"),
                root.join("demo/data/heldout_annotations.json"),
            ),
        ] {
            let cfg = config(&q, &a);
            assert!(
                VqaDataset::load_with_scoring_typed(&cfg, &q).is_some(),
                "{}",
                a.display()
            );
            assert!(assert_same_as_separate(&cfg), "{}", a.display());
        }
        // without a questions file: the dataset alone
        let mut cfg = config(Path::new("q"), &fixture_dir().join("annotations.json"));
        cfg.questions = None;
        assert!(matches!(
            VqaDataset::load_with_scoring(&cfg),
            Err(DatasetScoringError::Dataset(
                DatasetError::NoQuestionText { .. }
            ))
        ));
    }

    #[test]
    fn dataset_and_index_from_one_parse_fail_like_the_two_loaders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let q_ok = r#"{"questions": [{"question_id": 2, "question": "b?"}, {"question_id": 1, "question": "a?"}]}"#;
        let a1 = r#"{"question_id": 1, "image_id": 10, "answers": [{"answer": "x", "answer_id": 1}, {"answer": "y", "answer_id": 2}, {"answer": "y", "answer_id": 3}]}"#;
        let a2 = r#"{"question_id": 2, "image_id": 20, "multiple_choice_answer": "z", "answers": [{"answer": "z", "answer_id": 1}]}"#;
        let ann = |body: &str| format!(r#"{{"annotations": [{body}]}}"#);
        // (questions, annotations, taken by the shared parse, loads)
        let cases: Vec<(String, String, bool, bool)> = vec![
            (q_ok.into(), ann(&format!("{a2}, {a1}")), true, true),
            // a question repeated: both items get its text; the index keeps the last
            (q_ok.into(), ann(&format!("{a1}, {a2}, {a1}")), true, true),
            // the dataset refuses
            (
                q_ok.into(),
                ann(r#"{"question_id": 3, "image_id": 1, "answers": []}"#),
                true,
                false,
            ),
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "answers": []}"#),
                false,
                false,
            ),
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "image_id": "1", "answers": []}"#),
                false,
                false,
            ),
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "image_id": 1, "question": 5, "answers": []}"#),
                false,
                false,
            ),
            (
                q_ok.into(),
                ann(
                    r#"{"question_id": 1, "image_id": 1, "multiple_choice_answer": 5, "answers": []}"#,
                ),
                false,
                false,
            ),
            (
                r#"{"questions": [{"question_id": 1}]}"#.into(),
                ann(a1),
                false,
                false,
            ),
            (
                r#"{"questions": [{"question_id": 1, "question": null}]}"#.into(),
                ann(a1),
                false,
                false,
            ),
            (
                r#"{"annotations": [{"question_id": 1, "question": "?"}]}"#.into(),
                ann(a1),
                false,
                false,
            ),
            (
                q_ok.into(),
                ann(&format!("{a1}, {a2}")).replacen('{', "[", 1),
                false,
                false,
            ),
            // only the index refuses: plain string answers are the dataset's
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "image_id": 1, "answers": ["x", "y"]}"#),
                false,
                false,
            ),
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "image_id": 1, "answer_type": 1, "answers": []}"#),
                false,
                false,
            ),
            // odd but loadable
            (
                q_ok.into(),
                ann(r#"{"question_id": 1, "image_id": 1, "answers": []}"#),
                true,
                true,
            ),
            (
                q_ok.into(),
                ann(
                    r#"{"question_id": 1, "image_id": 1, "question": null, "multiple_choice_answer": null, "answers": [{"answer": "x"}, {"answer": "x"}]}"#,
                ),
                true,
                true,
            ),
            (
                q_ok.into(),
                ann(
                    r#"{"question_id": 1, "image_id": 1, "question_type": "a", "question_type": "b", "answers": []}"#,
                ),
                false,
                true,
            ),
        ];
        for (k, (qt, at, takes, loads)) in cases.iter().enumerate() {
            let q = write(d, "q.json", qt);
            let a = write(d, "a.json", at);
            let cfg = config(&q, &a);
            assert_eq!(
                VqaDataset::load_with_scoring_typed(&cfg, &q).is_some(),
                *takes,
                "case {k}: {qt} {at}"
            );
            assert_eq!(assert_same_as_separate(&cfg), *loads, "case {k}: {qt} {at}");
        }
        let q = write(d, "q.json", q_ok);
        let cfg = config(&q, &d.join("missing.json"));
        assert!(!assert_same_as_separate(&cfg));
        let mut cfg = config(&q, &write(d, "a.json", ann(a1)));
        cfg.image_pattern = "{nope}".into();
        assert!(!assert_same_as_separate(&cfg));
    }
}
