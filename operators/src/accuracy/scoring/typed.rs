//! Typed records of the question and annotation files for the fast path of
//! [`load_questions_annotations`](super::load_questions_annotations).
//!
//! They borrow strings from the file's bytes and skip what the index does not
//! need with [`Skip`], which validates exactly like parsing into a
//! `serde_json::Value` (numbers in range, strings valid UTF-8, paired
//! surrogate escapes): a file these records accept is one `from_values` would
//! parse too. Objects are read only from JSON objects (never from arrays, as
//! derived structs would), and a repeated key is an error (a `Value` keeps
//! the last one), so such files go the general way.

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

fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T, key: &'static str) -> Result<(), E> {
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
                        "answer" => set_once(&mut answer, map.next_value::<Str<'de>>()?, "answer")?,
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
                "question" => set_once(&mut question, map.next_value::<Loose<'de>>()?, "question")?,
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
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Question<'de>, A::Error> {
                let mut qid = None;
                let mut mc = None;
                let mut question = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match &*key {
                        "question" => {
                            set_once(&mut question, map.next_value::<Loose<'de>>()?, "question")?
                        }
                        "question_id" => set_once(&mut qid, question_id(&mut map)?, "question_id")?,
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
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MergedQuestion, A::Error> {
                let mut qid = None;
                let mut question = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match &*key {
                        "question_id" => set_once(&mut qid, question_id(&mut map)?, "question_id")?,
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
pub(crate) fn answer_dicts(text: &str, wanted: &[usize]) -> Option<Vec<Vec<Map<String, Value>>>> {
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
