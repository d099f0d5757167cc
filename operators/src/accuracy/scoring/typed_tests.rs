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
            ann(r#"{"question_id": 1, "question_type": "a", "question_type": "b", "answers": []}"#),
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
            ann(r#"{"question_id": 1, "answer_type": null, "question_type": null, "answers": []}"#),
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
        ann(r#"{"question_id": 4, "question": "?", "answers": [{"answer": "a", "answer_id": 1}]}"#),
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
            ann(r#"{"question_id": 1, "image_id": 1, "multiple_choice_answer": 5, "answers": []}"#),
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
