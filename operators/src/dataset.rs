//! The VQA dataset the pipeline reads (`--dataset okvqa_local|vqav2_local`).
//!
//! Reproduces the original project's local VQA loading (`load_vqav2_ds` with
//! `version == "local"`, used for both OK-VQA and VQAv2):
//! * the annotations file's `annotations` list is the dataset; the question
//!   text comes from the official questions file (looked up by `question_id`,
//!   as the original's preprocessing merges them) or, for the merged
//!   "vqav2_mscoco_*.json" style, from each annotation's own `question`;
//! * **dataset index = position after a stable sort by `question_id`** (the
//!   original `ds.sort("question_id")`; queries and candidates are numbered so);
//! * the in-context answer is `multiple_choice_answer`, or when absent the most
//!   common of the raw answers (first seen wins ties, like `Counter.most_common`);
//! * images are `<root>/COCO_train2014_{image_id:012d}.jpg` for the train split
//!   and `COCO_val2014_...` for validation, loaded lazily through [`ImageCache`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use image::RgbImage;

use crate::accuracy::{load_questions_annotations, typed, AccuracyError, ScoringIndex};
use crate::image_decode::{self, ImageDecodeError, ImageInput, ImageLimits};
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// Default image file pattern of the train split (the original's train images).
pub const DEFAULT_IMAGE_PATTERN: &str = "COCO_train2014_{image_id:012d}.jpg";
/// Default image file pattern of the validation split.
pub const DEFAULT_VAL_IMAGE_PATTERN: &str = "COCO_val2014_{image_id:012d}.jpg";

/// Errors of the dataset loader and the image cache; each names the file and
/// the offending id or index.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Malformed JSON or a field of the wrong type.
    #[error("{}: malformed JSON at line {line}, column {column}: {message}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// An annotation's `question_id` is not in the questions file.
    #[error("question_id {question_id} (from {}) is missing from the questions file {}",
        .annotations.display(), .questions.display())]
    MissingQuestion {
        /// The question id.
        question_id: u64,
        /// The annotations file.
        annotations: PathBuf,
        /// The questions file.
        questions: PathBuf,
    },
    /// No questions file was given and an annotation has no `question` field.
    #[error("{}: annotation with question_id {question_id} has no \"question\" and no questions file was given", .path.display())]
    NoQuestionText {
        /// The question id.
        question_id: u64,
        /// The annotations file.
        path: PathBuf,
    },
    /// A dataset index past the end.
    #[error("dataset index {index} is out of range (dataset size {len})")]
    IndexOutOfRange {
        /// The requested index.
        index: u64,
        /// The dataset size.
        len: u64,
    },
    /// An image file does not exist.
    #[error("image {} not found{}", .path.display(),
        .index.map_or_else(String::new, |i| format!(" (dataset index {i})")))]
    MissingImage {
        /// The image path.
        path: PathBuf,
        /// The dataset index it belongs to, when known.
        index: Option<u64>,
    },
    /// An image file could not be decoded.
    #[error("{}: cannot decode image: {message}", .path.display())]
    ImageDecode {
        /// The image path.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// An image is larger than the decoding limits allow.
    #[error("{}: image over the decoding limits ({limits}): {message}", .path.display())]
    ImageTooLarge {
        /// The image path.
        path: PathBuf,
        /// The limits in force.
        limits: ImageLimits,
        /// Which limit (the decoder's message).
        message: String,
    },
    /// The image file pattern is invalid.
    #[error("invalid image pattern {pattern:?}: {message}")]
    BadImagePattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// An unknown `--dataset` name.
    #[error("unknown dataset {name:?} (expected okvqa_local or vqav2_local)")]
    UnknownKind {
        /// The name given.
        name: String,
    },
}

/// Errors of [`VqaDataset::load_with_scoring`]: the dataset's error or the
/// scoring index's, each exactly as its own loader reports it.
#[derive(Debug, thiserror::Error)]
pub enum DatasetScoringError {
    /// From loading the dataset ([`VqaDataset::load`]).
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// From loading the scoring index ([`load_questions_annotations`]).
    #[error(transparent)]
    Scoring(#[from] AccuracyError),
}

/// Which dataset (`--dataset`); both load the same way, as in the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum DatasetKind {
    /// OK-VQA (`okvqa_local`).
    OkvqaLocal,
    /// VQAv2 (`vqav2_local`).
    Vqav2Local,
}

impl DatasetKind {
    /// The `--dataset` name.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::OkvqaLocal => "okvqa_local",
            DatasetKind::Vqav2Local => "vqav2_local",
        }
    }
}

impl FromStr for DatasetKind {
    type Err = DatasetError;
    /// Parses `okvqa_local` / `vqav2_local` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "okvqa_local" => Ok(DatasetKind::OkvqaLocal),
            "vqav2_local" => Ok(DatasetKind::Vqav2Local),
            _ => Err(DatasetError::UnknownKind {
                name: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Train or validation split (queries and candidates come from train).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetSplit {
    /// `--train_ques_path/--train_ann_path`, COCO train2014 images.
    Train,
    /// `--val_ques_path/--val_ann_path`, COCO val2014 images.
    Validation,
}

impl DatasetSplit {
    /// The original's image file name pattern for this split.
    pub fn default_image_pattern(self) -> &'static str {
        match self {
            DatasetSplit::Train => DEFAULT_IMAGE_PATTERN,
            DatasetSplit::Validation => DEFAULT_VAL_IMAGE_PATTERN,
        }
    }
}

/// Where one split of the dataset lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetConfig {
    /// Which dataset.
    pub kind: DatasetKind,
    /// Official questions file; `None` for the merged style where every
    /// annotation carries its `question`.
    pub questions: Option<PathBuf>,
    /// Annotations file (official or merged).
    pub annotations: PathBuf,
    /// Directory of the images.
    pub image_root: PathBuf,
    /// Image file name pattern: literal text with `{image_id}`, `{question_id}`,
    /// optionally formatted `{image_id:0Nd}` (zero-padded) or `{image_id:Nd}`
    /// (space-padded); `{{` and `}}` are literal braces.
    pub image_pattern: String,
}

impl DatasetConfig {
    /// A configuration with the split's default image pattern.
    pub fn new(
        kind: DatasetKind,
        split: DatasetSplit,
        questions: Option<PathBuf>,
        annotations: PathBuf,
        image_root: PathBuf,
    ) -> Self {
        DatasetConfig {
            kind,
            questions,
            annotations,
            image_root,
            image_pattern: split.default_image_pattern().to_string(),
        }
    }
}

/// One dataset item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct VqaItem {
    /// Dataset index: position after the stable sort by `question_id`.
    pub index: u64,
    /// Official question id.
    pub question_id: u64,
    /// COCO image id.
    pub image_id: u64,
    /// Question text.
    pub question: String,
    /// The raw human answers (`answers[*].answer`), in file order.
    pub answers: Vec<String>,
    /// The answer shown for this item as an in-context example:
    /// `multiple_choice_answer`, or the most common raw answer (first seen wins ties).
    pub icd_answer: String,
    /// Image file (`image_root` joined with the formatted pattern).
    pub image_path: PathBuf,
}

/// One piece of a parsed image pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Field {
        field: PatternField,
        width: usize,
        zero_pad: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternField {
    ImageId,
    QuestionId,
}

/// A parsed image file name pattern (see [`DatasetConfig::image_pattern`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePattern {
    segments: Vec<Segment>,
}

impl ImagePattern {
    /// Parses a pattern such as `COCO_train2014_{image_id:012d}.jpg`.
    pub fn parse(pattern: &str) -> Result<Self, DatasetError> {
        let bad = |message: String| DatasetError::BadImagePattern {
            pattern: pattern.to_string(),
            message,
        };
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(bad("unmatched '}' (write '}}' for a literal brace)".into())),
                '{' => {
                    let mut spec = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => spec.push(c),
                            None => return Err(bad("unterminated '{'".into())),
                        }
                    }
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(Self::parse_field(&spec).map_err(bad)?);
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(ImagePattern { segments })
    }

    fn parse_field(spec: &str) -> Result<Segment, String> {
        let (name, format) = match spec.split_once(':') {
            Some((n, f)) => (n, Some(f)),
            None => (spec, None),
        };
        let field = match name {
            "image_id" => PatternField::ImageId,
            "question_id" => PatternField::QuestionId,
            other => {
                return Err(format!(
                    "unknown field {{{other}}} (expected image_id or question_id)"
                ))
            }
        };
        let (width, zero_pad) = match format {
            None | Some("") | Some("d") => (0, false),
            Some(f) => {
                let digits = f
                    .strip_suffix('d')
                    .ok_or_else(|| format!("unsupported format {f:?} (expected 0Nd, Nd or d)"))?;
                let zero_pad = digits.starts_with('0');
                let width = digits
                    .parse::<usize>()
                    .map_err(|_| format!("unsupported format {f:?} (expected 0Nd, Nd or d)"))?;
                (width, zero_pad)
            }
        };
        Ok(Segment::Field {
            field,
            width,
            zero_pad,
        })
    }

    /// Formats the file name of an item.
    pub fn format(&self, image_id: u64, question_id: u64) -> String {
        let mut out = String::new();
        self.format_into(&mut out, image_id, question_id);
        out
    }

    /// Appends the file name of an item to `out`.
    fn format_into(&self, out: &mut String, image_id: u64, question_id: u64) {
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Field {
                    field,
                    width,
                    zero_pad,
                } => {
                    let v = match field {
                        PatternField::ImageId => image_id,
                        PatternField::QuestionId => question_id,
                    };
                    let w = *width;
                    // Writing into a `String` cannot fail.
                    let _ = if *zero_pad {
                        write!(out, "{v:0w$}")
                    } else {
                        write!(out, "{v:>w$}")
                    };
                }
            }
        }
    }
}

/// An answer entry: `{"answer": "...", ...}` (official) or a plain string.
struct RawAnswer(String);

impl<'de> Deserialize<'de> for RawAnswer {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAnswer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an answer object with an \"answer\" string, or a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAnswer, E> {
                Ok(RawAnswer(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawAnswer, E> {
                Ok(RawAnswer(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawAnswer, A::Error> {
                let mut answer = None;
                while let Some(AnswerKey(is_answer)) = map.next_key::<AnswerKey>()? {
                    if is_answer {
                        if answer.is_some() {
                            return Err(de::Error::duplicate_field("answer"));
                        }
                        answer = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                answer
                    .map(RawAnswer)
                    .ok_or_else(|| de::Error::missing_field("answer"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key of an answer object: whether it is `answer` (read without
/// allocating the key, as answer objects are the bulk of an annotation file).
struct AnswerKey(bool);

impl<'de> Deserialize<'de> for AnswerKey {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnswerKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AnswerKey, E> {
                Ok(AnswerKey(v == "answer"))
            }
        }
        d.deserialize_identifier(V)
    }
}

#[derive(Deserialize)]
struct RawAnnotation {
    question_id: u64,
    image_id: u64,
    #[serde(default)]
    question: Option<String>,
    #[serde(default)]
    answers: Vec<RawAnswer>,
    #[serde(default)]
    multiple_choice_answer: Option<String>,
}

#[derive(Deserialize)]
struct AnnotationFile {
    annotations: Vec<RawAnnotation>,
}

#[derive(Deserialize)]
struct RawQuestion {
    question_id: u64,
    question: String,
}

#[derive(Deserialize)]
struct QuestionFile {
    questions: Vec<RawQuestion>,
}

/// Reads a JSON file: the whole file, then parsed from memory (several times
/// faster than parsing through a reader; the file is dropped right after).
/// Errors are those of parsing through a reader, as before.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DatasetError> {
    let open = || {
        File::open(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut bytes = Vec::new();
    let parsed = if open()?.read_to_end(&mut bytes).is_ok() {
        // Parsing from a `str` skips the per-string UTF-8 checks; a file that
        // is not all valid UTF-8 is parsed from bytes, which checks the
        // strings that are read (as the reader-based parse did).
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(&bytes),
        };
        if let Ok(value) = parsed {
            return Ok(value);
        }
        // A malformed file: parsed again through a reader, whose error
        // positions are the ones this loader always reported (an in-memory
        // parse puts some errors one column earlier).
        serde_json::from_reader(bytes.as_slice())
    } else {
        // The file cannot be read (a directory, an I/O error): reported as
        // the reader-based parse reports it.
        serde_json::from_reader(BufReader::with_capacity(1 << 20, open()?))
    };
    parsed.map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        DatasetError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: full
                .strip_suffix(&suffix)
                .map(str::to_string)
                .unwrap_or(full),
        }
    })
}

/// Maps a whole file into memory for one parse (no copy of a large JSON
/// file); `None` when it cannot be mapped (the separate loaders then report
/// why).
fn map_file(path: &Path) -> Option<memmap2::Mmap> {
    crate::tensor_io::map_readonly(path, false).ok()
}

/// The most common answer; ties go to the one seen first (as Python's
/// `Counter(answers).most_common(1)`); `""` when there are no answers.
pub fn most_common_answer(answers: &[String]) -> String {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        counts.entry(a.as_str()).or_insert((0, i)).0 += 1;
    }
    counts
        .into_iter()
        .max_by(|(_, (ca, fa)), (_, (cb, fb))| ca.cmp(cb).then(fb.cmp(fa)))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}

/// One split of the VQA dataset, items ordered by dataset index.
/// Serialisable for the parsed-dataset snapshot ([`snapshot`](crate::state::snapshot)).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct VqaDataset {
    kind: DatasetKind,
    items: Vec<VqaItem>,
}

impl VqaDataset {
    /// A dataset without items (a `candidates` run without the training
    /// split's files).
    pub fn empty(kind: DatasetKind) -> Self {
        Self {
            kind,
            items: Vec::new(),
        }
    }

    /// Loads a split: reads the annotations (and questions), sorts stably by
    /// `question_id` and numbers the items.
    pub fn load(cfg: &DatasetConfig) -> Result<Self, DatasetError> {
        let pattern = ImagePattern::parse(&cfg.image_pattern)?;
        let questions: Option<HashMap<u64, String>> = match &cfg.questions {
            Some(p) => {
                let qf: QuestionFile = read_json(p)?;
                // Later duplicates overwrite earlier ones, as a Python dict would.
                Some(
                    qf.questions
                        .into_iter()
                        .map(|q| (q.question_id, q.question))
                        .collect(),
                )
            }
            None => None,
        };
        let anns = read_json::<AnnotationFile>(&cfg.annotations)?.annotations;
        Self::build(cfg, &pattern, questions, anns)
    }

    /// Loads the split like [`VqaDataset::load`] and, when it has a questions
    /// file, the official scoring index of the same two files like
    /// [`load_questions_annotations`], reading and parsing each file once
    /// for both (the files are large: this halves the loading time of a run).
    ///
    /// The result, and the error, is the one of calling the two loaders one
    /// after the other (the dataset first): files the shared typed parse does
    /// not take as is (malformed, a repeated key, an unexpected shape) are
    /// loaded by those loaders themselves.
    pub fn load_with_scoring(
        cfg: &DatasetConfig,
    ) -> Result<(Self, Option<ScoringIndex>), DatasetScoringError> {
        let Some(qpath) = cfg.questions.as_deref() else {
            return Ok((Self::load(cfg)?, None));
        };
        if let Some(loaded) = Self::load_with_scoring_typed(cfg, qpath) {
            let (dataset, index) = loaded?;
            return Ok((dataset, Some(index)));
        }
        let dataset = Self::load(cfg)?;
        let index = load_questions_annotations(qpath, &cfg.annotations)?;
        Ok((dataset, Some(index)))
    }

    /// The shared typed parse of [`VqaDataset::load_with_scoring`]; `None`
    /// when the separate loaders must decide. The dataset and the index are
    /// built from the parsed records on two threads.
    pub(crate) fn load_with_scoring_typed(
        cfg: &DatasetConfig,
        qpath: &Path,
    ) -> Option<Result<(Self, ScoringIndex), DatasetError>> {
        let pattern = ImagePattern::parse(&cfg.image_pattern).ok()?;
        let q_bytes = map_file(qpath)?;
        let a_bytes = if qpath == cfg.annotations {
            None
        } else {
            Some(map_file(&cfg.annotations)?)
        };
        let q_text = std::str::from_utf8(&q_bytes).ok()?;
        let a_text = match &a_bytes {
            Some(b) => std::str::from_utf8(b).ok()?,
            None => q_text,
        };
        let (qfile, afile) = typed::parse_files(q_text, a_text)?;
        let (dataset, index) = std::thread::scope(|s| {
            let index = s.spawn(|| {
                ScoringIndex::from_typed(&qfile, &afile, a_text, qpath, &cfg.annotations)
            });
            let dataset = Self::from_typed(cfg, &pattern, &qfile, &afile);
            (dataset, index.join())
        });
        let index = match index {
            Ok(index) => index,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match dataset? {
            Ok(dataset) => Some(Ok((dataset, index?))),
            // the error `load` gives: its parse reads the same records
            Err(e) => Some(Err(e)),
        }
    }

    /// The dataset from the shared typed records: the same records
    /// [`VqaDataset::load`]'s own parse gives (`None` where it would not
    /// give them), then the same numbering.
    fn from_typed(
        cfg: &DatasetConfig,
        pattern: &ImagePattern,
        qfile: &typed::QuestionFile<'_>,
        afile: &typed::AnnotationFile<'_>,
    ) -> Option<Result<Self, DatasetError>> {
        /// An optional string field: absent or `null` is `None`; not a
        /// string is not taken.
        fn opt_string(v: &Option<typed::Loose<'_>>) -> Option<Option<String>> {
            match v {
                None | Some(typed::Loose::Null) => Some(None),
                Some(typed::Loose::Str(s)) => Some(Some(s.to_string())),
                Some(typed::Loose::Other) => None,
            }
        }
        let list = qfile.questions.as_ref()?;
        let mut questions = HashMap::with_capacity(list.len());
        for q in list {
            let Some(typed::Loose::Str(text)) = &q.question else {
                return None;
            };
            questions.insert(q.question_id, text.to_string());
        }
        let mut anns = Vec::with_capacity(afile.annotations.len());
        for a in &afile.annotations {
            anns.push(RawAnnotation {
                question_id: a.question_id,
                image_id: a.image_id.flatten()?,
                question: opt_string(&a.question)?,
                answers: afile
                    .answers_of(a)
                    .iter()
                    .map(|x| RawAnswer(String::from(&*x.answer)))
                    .collect(),
                multiple_choice_answer: opt_string(&a.multiple_choice_answer)?,
            });
        }
        Some(Self::build(cfg, pattern, Some(questions), anns))
    }

    /// Sorts the parsed annotations stably by `question_id`, numbers them and
    /// joins their question texts.
    fn build(
        cfg: &DatasetConfig,
        pattern: &ImagePattern,
        mut questions: Option<HashMap<u64, String>>,
        mut anns: Vec<RawAnnotation>,
    ) -> Result<Self, DatasetError> {
        // Stable: equal question ids keep their file order.
        anns.sort_by_key(|a| a.question_id);
        let mut items: Vec<VqaItem> = Vec::with_capacity(anns.len());
        let root_len = cfg.image_root.as_os_str().len();
        let mut name = String::new();
        for (index, a) in anns.into_iter().enumerate() {
            let question = match (&mut questions, cfg.questions.as_ref()) {
                // The text is moved out of the map; annotations repeating a
                // question id are adjacent after the sort and copy it from
                // the previous item.
                (Some(map), Some(qpath)) => match map.remove(&a.question_id) {
                    Some(q) => q,
                    None => items
                        .last()
                        .filter(|prev| prev.question_id == a.question_id)
                        .map(|prev| prev.question.clone())
                        .ok_or_else(|| DatasetError::MissingQuestion {
                            question_id: a.question_id,
                            annotations: cfg.annotations.clone(),
                            questions: qpath.clone(),
                        })?,
                },
                _ => a.question.ok_or_else(|| DatasetError::NoQuestionText {
                    question_id: a.question_id,
                    path: cfg.annotations.clone(),
                })?,
            };
            let answers: Vec<String> = a.answers.into_iter().map(|r| r.0).collect();
            let icd_answer = a
                .multiple_choice_answer
                .unwrap_or_else(|| most_common_answer(&answers));
            // `image_root.join(name)`, allocated once
            name.clear();
            pattern.format_into(&mut name, a.image_id, a.question_id);
            let mut image_path = PathBuf::with_capacity(root_len + 1 + name.len());
            image_path.push(&cfg.image_root);
            image_path.push(&name);
            items.push(VqaItem {
                index: index as u64,
                question_id: a.question_id,
                image_id: a.image_id,
                question,
                answers,
                icd_answer,
                image_path,
            });
        }
        Ok(VqaDataset {
            kind: cfg.kind,
            items,
        })
    }

    /// The item at a dataset index.
    pub fn get(&self, index: u64) -> Result<&VqaItem, DatasetError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.items.get(i))
            .ok_or(DatasetError::IndexOutOfRange {
                index,
                len: self.len() as u64,
            })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the dataset has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Which dataset this is.
    pub fn kind(&self) -> DatasetKind {
        self.kind
    }

    /// All items in index order.
    pub fn items(&self) -> &[VqaItem] {
        &self.items
    }

    /// The dataset index of a question id (first one if repeated), by binary
    /// search over the sorted items.
    pub fn index_of_question_id(&self, question_id: u64) -> Option<u64> {
        let i = self
            .items
            .partition_point(|it| it.question_id < question_id);
        (self.items.get(i)?.question_id == question_id).then_some(i as u64)
    }

    /// The image of the item at `index`, through `cache`; a missing file
    /// error names the index.
    pub fn load_image(
        &self,
        index: u64,
        cache: &ImageCache,
    ) -> Result<Arc<RgbImage>, DatasetError> {
        let item = self.get(index)?;
        cache.get(&item.image_path).map_err(|e| match e {
            DatasetError::MissingImage { path, .. } => DatasetError::MissingImage {
                path,
                index: Some(index),
            },
            other => other,
        })
    }
}

/// Decodes an image file into 8-bit RGB, like PIL's `Image.open(p).convert("RGB")`
/// (alpha dropped, grey replicated; the format is sniffed from the content),
/// within `limits`: [`image_decode::decode_rgb`] with this module's errors.
pub fn decode_rgb(path: &Path, limits: &ImageLimits) -> Result<RgbImage, DatasetError> {
    image_decode::decode_rgb(ImageInput::File(path), limits).map_err(|e| match e {
        ImageDecodeError::NotFound { path } => DatasetError::MissingImage { path, index: None },
        ImageDecodeError::Io { path, source } => DatasetError::Io { path, source },
        ImageDecodeError::Decode { message, .. } => DatasetError::ImageDecode {
            path: path.to_path_buf(),
            message,
        },
        ImageDecodeError::TooLarge {
            limits, message, ..
        } => DatasetError::ImageTooLarge {
            path: path.to_path_buf(),
            limits,
            message,
        },
    })
}

struct CacheEntry {
    image: Arc<RgbImage>,
    bytes: u64,
    stamp: u64,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<PathBuf, CacheEntry>,
    /// Recency order: stamp -> path (smallest = least recently used).
    order: BTreeMap<u64, PathBuf>,
    clock: u64,
    used: u64,
}

impl CacheState {
    fn touch(&mut self, path: &Path) -> Option<Arc<RgbImage>> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(path)?;
        let old = std::mem::replace(&mut entry.stamp, clock);
        let image = Arc::clone(&entry.image);
        if let Some(p) = self.order.remove(&old) {
            self.order.insert(clock, p);
        }
        Some(image)
    }
}

/// Thread-safe LRU cache of decoded RGB images, bounded by the total pixel
/// bytes (`width * height * 3`) it holds.  An image larger than the whole
/// capacity is returned but not kept.  Images are decoded within the
/// cache's [`ImageLimits`] (the defaults unless [`ImageCache::with_limits`]).
pub struct ImageCache {
    capacity_bytes: u64,
    limits: ImageLimits,
    state: Mutex<CacheState>,
}

impl ImageCache {
    /// A cache holding at most `capacity_mb` MiB of decoded pixels.
    pub fn new(capacity_mb: u64) -> Self {
        Self::with_capacity_bytes(capacity_mb.saturating_mul(1 << 20))
    }

    /// A cache holding at most `capacity_bytes` bytes of decoded pixels.
    pub fn with_capacity_bytes(capacity_bytes: u64) -> Self {
        ImageCache {
            capacity_bytes,
            limits: ImageLimits::default(),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// The same cache decoding within `limits`.
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The decoding limits of this cache.
    pub fn limits(&self) -> &ImageLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock cannot leave the state inconsistent
        // in a way that matters for a cache, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The decoded image at `path`, from the cache or decoded now (outside the
    /// lock, so other threads are not blocked by decoding).
    pub fn get(&self, path: &Path) -> Result<Arc<RgbImage>, DatasetError> {
        if let Some(img) = self.lock().touch(path) {
            return Ok(img);
        }
        let image = Arc::new(decode_rgb(path, &self.limits)?);
        let bytes = image.as_raw().len() as u64;
        let mut st = self.lock();
        if let Some(existing) = st.touch(path) {
            return Ok(existing);
        }
        if bytes > self.capacity_bytes {
            return Ok(image);
        }
        while st.used + bytes > self.capacity_bytes {
            let Some((_, victim)) = st.order.pop_first() else {
                break;
            };
            if let Some(e) = st.entries.remove(&victim) {
                st.used -= e.bytes;
            }
        }
        st.clock += 1;
        let stamp = st.clock;
        st.order.insert(stamp, path.to_path_buf());
        st.entries.insert(
            path.to_path_buf(),
            CacheEntry {
                image: Arc::clone(&image),
                bytes,
                stamp,
            },
        );
        st.used += bytes;
        Ok(image)
    }

    /// Bytes of decoded pixels held now (never above the capacity).
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// The capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Number of images held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the cache holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the image at `path` is held now (does not change recency).
    pub fn contains(&self, path: &Path) -> bool {
        self.lock().entries.contains_key(path)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod read_json_tests {
    use std::io::BufReader;

    use super::*;

    /// `read_json` as it was: parsed through a buffered reader.
    fn read_json_by_reader<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DatasetError> {
        let file = std::fs::File::open(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_reader(BufReader::with_capacity(1 << 20, file)).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            DatasetError::Json {
                path: path.to_path_buf(),
                line: e.line(),
                column: e.column(),
                message: full
                    .strip_suffix(&suffix)
                    .map(str::to_string)
                    .unwrap_or(full),
            }
        })
    }

    fn summary(r: Result<AnnotationFile, DatasetError>) -> String {
        match r {
            Ok(f) => f
                .annotations
                .iter()
                .map(|a| {
                    let answers: Vec<&str> = a.answers.iter().map(|x| x.0.as_str()).collect();
                    format!(
                        "{} {} {:?} {:?} {:?}",
                        a.question_id, a.image_id, a.question, answers, a.multiple_choice_answer
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("error: {e}"),
        }
    }

    /// Parsing the whole file from memory (from a `str` when it is valid
    /// UTF-8) gives the results and errors of the reader-based parse.
    #[test]
    fn read_json_reports_like_the_reader_parse() {
        let dir = tempfile::tempdir().unwrap();
        let ann = |body: &str| format!(r#"{{"annotations": [{body}]}}"#).into_bytes();
        let mut cases: Vec<Vec<u8>> = vec![
            ann(
                r#"{"question_id": 1, "image_id": 2, "question": "q\u00e9\n", "answers": [{"answer": "a", "answer_id": 1}, "b"], "x": [1e5, null]}"#,
            ),
            ann(r#"{"question_id": 1, "image_id": 2, "answers": [{"answer": "\ud83d\ude00"}]}"#),
            ann(r#"{"question_id": 1, "image_id": 2, "answers": [{"answer": "\ud800"}]}"#),
            ann(r#"{"question_id": 1, "image_id": 2, "x": "\ud800", "answers": []}"#),
            ann(r#"{"question_id": 1, "image_id": 2, "answers": [{"answer": 1}]}"#),
            ann(
                r#"{"question_id": 1, "image_id": 2, "answers": [{"answer": "a", "answer": "b"}]}"#,
            ),
            ann(r#"{"question_id": "1", "image_id": 2}"#),
            ann(r#"{"question_id": 1}"#),
            ann("{\"question_id\": 1, \"image_id\": 2, \"question\": \"a\tb\"}"),
            b"{\"annotations\": [\n  {\"question_id\": 1,\n".to_vec(),
            b"{\"annotations\": []} x".to_vec(),
            b"".to_vec(),
        ];
        // invalid UTF-8 in a string that is read, and in one that is not
        for body in [
            r#"{"question_id": 1, "image_id": 2, "question": "??", "answers": []}"#,
            r#"{"question_id": 1, "image_id": 2, "x": "??", "answers": []}"#,
        ] {
            let mut bytes = ann(body);
            let at = bytes.iter().position(|&b| b == b'?').unwrap();
            bytes[at] = 0xff;
            cases.push(bytes);
        }
        for (k, bytes) in cases.iter().enumerate() {
            let path = dir.path().join(format!("a{k}.json"));
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(
                summary(read_json(&path)),
                summary(read_json_by_reader(&path)),
                "case {k}: {}",
                String::from_utf8_lossy(bytes)
            );
        }
        // a directory opens but cannot be read; a missing file does not open
        for path in [dir.path().to_path_buf(), dir.path().join("missing.json")] {
            assert_eq!(
                summary(read_json(&path)),
                summary(read_json_by_reader(&path))
            );
        }
    }
}
