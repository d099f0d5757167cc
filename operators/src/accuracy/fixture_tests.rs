//! Golden tests against `tests/fixtures/vqa_eval` (values from the original
//! Python evaluator).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vqa_eval")
}

fn load(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let bytes = std::fs::read(&path).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn index() -> ScoringIndex {
    let dir = fixture_dir();
    load_questions_annotations(&dir.join("questions.json"), &dir.join("annotations.json")).unwrap()
}

fn raw_answers(annotations: &Value) -> std::collections::HashMap<u64, Vec<String>> {
    annotations["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let answers = a["answers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["answer"].as_str().unwrap().to_owned())
                .collect();
            (a["question_id"].as_u64().unwrap(), answers)
        })
        .collect()
}

#[test]
fn every_prediction_case_matches() {
    let idx = index();
    let preds = load("predictions.json");
    let raw = raw_answers(&load("annotations.json"));
    let cases = preds["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2400);
    let mut norm = Normalizer::new();
    let mut failures = Vec::new();
    for c in cases {
        let qid = c["question_id"].as_u64().unwrap();
        let pred = c["pred"].as_str().unwrap();
        let expected_acc = c["expected_acc"].as_f64().unwrap();
        let expected_pct = c["evalqa_percent"].as_f64().unwrap();
        let gt = idx.gt(qid).unwrap();
        let p = norm.normalize(pred).to_owned();
        let acc = gt.accuracy(&p);
        let pct = gt.percent(&p);
        let via_index = idx.evaluate(qid, pred, &mut norm).unwrap();
        let via_raw = vqa_accuracy(pred, &raw[&qid]);
        if acc != expected_acc
            || pct != expected_pct
            || via_index != expected_acc
            || via_raw != expected_acc
        {
            failures.push(format!(
                "case {}: pred {pred:?} -> {p:?}: acc {acc} / {via_index} / {via_raw} pct {pct}, expected {expected_acc} / {expected_pct}",
                c["case_id"]
            ));
        }
        assert_eq!(vqa_correct(acc), u8::from(expected_acc > 0.0));
        if let Some(raw_gen) = c.get("raw_generation") {
            assert_eq!(
                postprocess_generation(raw_gen.as_str()),
                c["postprocessed"].as_str().unwrap()
            );
            assert_eq!(c["postprocessed"], c["pred"]);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_official_round_matches() {
    let idx = index();
    let preds = load("predictions.json");
    let cases = preds["cases"].as_array().unwrap();
    let by_id: std::collections::HashMap<u64, &Value> = cases
        .iter()
        .map(|c| (c["case_id"].as_u64().unwrap(), c))
        .collect();
    let rounds = preds["official_rounds"].as_array().unwrap();
    assert!(!rounds.is_empty());
    for (r, round) in rounds.iter().enumerate() {
        let ids = round["case_ids"].as_array().unwrap();
        let results: Vec<Value> = ids
            .iter()
            .map(|id| {
                let c = by_id[&id.as_u64().unwrap()];
                serde_json::json!({"question_id": c["question_id"], "answer": c["pred"]})
            })
            .collect();
        let report = score_results(&idx, &Value::Array(results), Path::new("round.json")).unwrap();
        let acc = &round["accuracy"];
        assert_eq!(
            report.overall,
            acc["overall"].as_f64().unwrap(),
            "round {r}"
        );
        for (k, v) in acc["perQuestionType"].as_object().unwrap() {
            assert_eq!(
                report.per_question_type[k],
                v.as_f64().unwrap(),
                "round {r} {k}"
            );
        }
        assert_eq!(
            report.per_question_type.len(),
            acc["perQuestionType"].as_object().unwrap().len()
        );
        for (k, v) in acc["perAnswerType"].as_object().unwrap() {
            assert_eq!(
                report.per_answer_type[k],
                v.as_f64().unwrap(),
                "round {r} {k}"
            );
        }
        for id in ids {
            let c = by_id[&id.as_u64().unwrap()];
            let qid = c["question_id"].as_u64().unwrap();
            assert_eq!(
                report.per_question[&qid],
                c["expected_acc"].as_f64().unwrap()
            );
        }
        let json = report.to_json();
        assert_eq!(json["overall"], acc["overall"]);
        assert_eq!(json["perQuestion"].as_object().unwrap().len(), ids.len());
    }
}

#[test]
fn every_postprocess_case_matches() {
    let preds = load("predictions.json");
    let cases = preds["postprocess_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 126);
    for c in cases {
        assert_eq!(
            postprocess_generation(c["raw_generation"].as_str()),
            c["postprocessed"].as_str().unwrap(),
            "{c}"
        );
    }
}

#[test]
fn every_relevance_case_matches() {
    let rel = load("relevance.json");
    let cases = rel["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 416);
    for (i, c) in cases.iter().enumerate() {
        let pred = c["pred"].as_str().unwrap_or("");
        let gts: Vec<String> = c["gt_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap_or("").to_owned())
            .collect();
        let r = relevance(pred, &gts);
        let e = &c["expected"];
        for (got, key) in [
            (r.token_f1, "vqa_rel_token_f1"),
            (r.edit_sim, "vqa_rel_edit_sim"),
            (r.score, "vqa_rel_score"),
        ] {
            let want = e[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-12,
                "case {i} {key}: got {got}, want {want}: {c}"
            );
        }
    }
}

#[test]
fn truncated_json_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preds.json");
    std::fs::write(
        &path,
        "[\n  {\"question_id\": 700000,\n   \"answer\": \"no\"},\n  {\"question_id\": 7",
    )
    .unwrap();
    let err = score_predictions(&index(), &path).unwrap_err();
    match &err {
        AccuracyError::Json { path: p, line, .. } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 4);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("preds.json:4:"), "{msg}");

    let ann = dir.path().join("ann.json");
    std::fs::write(&ann, "{\"annotations\": [\n").unwrap();
    let q = fixture_dir().join("questions.json");
    let err = load_questions_annotations(&q, &ann).unwrap_err();
    assert!(matches!(err, AccuracyError::Json { line: 2, .. }), "{err}");
    let missing = dir.path().join("nope.json");
    let err = load_questions_annotations(&missing, &ann).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn malformed_shapes_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let q = fixture_dir().join("questions.json");
    let ann = dir.path().join("ann.json");
    std::fs::write(
        &ann,
        r#"{"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]},
                            {"question_id": 2, "answers": [{"answer": "a"}, {"answer": 3}]}]}"#,
    )
    .unwrap();
    let err = load_questions_annotations(&q, &ann)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ann.json") && err.contains("annotations[1].answers[1].answer"),
        "{err}"
    );

    let idx = index();
    let res = dir.path().join("res.json");
    std::fs::write(
        &res,
        r#"[{"question_id": 700000, "answer": "no"}, {"question_id": 5, "answer": "x"}]"#,
    )
    .unwrap();
    let err = score_predictions(&idx, &res).unwrap_err().to_string();
    assert!(
        err.contains("res.json") && err.contains("[1].question_id") && err.contains("question 5"),
        "{err}"
    );
    std::fs::write(&res, r#"[{"question_id": 700000}]"#).unwrap();
    let err = score_predictions(&idx, &res).unwrap_err().to_string();
    assert!(err.contains("[0]") && err.contains("answer"), "{err}");
    std::fs::write(&res, r#"{"question_id": 700000}"#).unwrap();
    assert!(score_predictions(&idx, &res).is_err());
    std::fs::write(&res, "[]").unwrap();
    assert!(score_predictions(&idx, &res).is_err());
}

#[test]
fn merged_annotations_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged.json");
    let answers = |v: &[&str]| -> Vec<Value> {
        v.iter()
            .enumerate()
            .map(|(i, a)| serde_json::json!({"answer": a, "answer_confidence": "yes", "answer_id": i + 1}))
            .collect()
    };
    let doc = serde_json::json!({"annotations": [
        {"question_id": 10, "image_id": 1, "question": "what color?", "question_type": "what color",
         "answer_type": "other", "answers": answers(&["red", "red", "Red.", "blue", "blue", "green", "red", "red", "blue", "x"])},
        {"question_id": 11, "image_id": 2, "question": "how many?", "question_type": "how many",
         "answers": answers(&["two", "2", "3", "3", "3", "3", "3", "3", "3", "3"])},
    ]});
    std::fs::write(&merged, serde_json::to_vec(&doc).unwrap()).unwrap();
    let idx = load_questions_annotations(&merged, &merged).unwrap();
    assert_eq!(idx.len(), 2);
    assert_eq!(idx.types(11), Some((Some("how many"), "other")));
    let mut norm = Normalizer::new();
    assert_eq!(idx.evaluate(10, "RED", &mut norm), Some(1.0));
    assert_eq!(idx.evaluate(11, "Two", &mut norm), Some(0.6));
    assert_eq!(idx.evaluate(12, "x", &mut norm), None);

    // question 11 listed twice (last answer "2" counts twice), 10 once.
    let res = dir.path().join("res.json");
    std::fs::write(
        &res,
        r#"[{"question_id": 11, "answer": "3"}, {"question_id": 10, "answer": "blue"}, {"question_id": 11, "answer": "2"}]"#,
    )
    .unwrap();
    let report = score_predictions(&idx, &res).unwrap();
    assert_eq!(report.per_question[&11], 0.6);
    assert_eq!(report.per_question[&10], 0.9);
    let m11 = idx.gt(11).unwrap().mean_accuracy("2");
    let m10 = idx.gt(10).unwrap().mean_accuracy("blue");
    assert_eq!(report.overall, py_round(100.0 * (m11 + m10 + m11) / 3.0, 2));
    assert_eq!(
        report.per_question_type["how many"],
        py_round(100.0 * (m11 + m11) / 2.0, 2)
    );
}

#[test]
fn repeated_passes_strip_more_periods() {
    // An answer with 40 trailing periods keeps 8 after one pass and none
    // after two: listing the question twice scores the second listing against
    // the twice-normalised answers, like the original's in-place updates.
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.json");
    let a = dir.path().join("a.json");
    std::fs::write(&q, r#"{"task_type": "Open-Ended", "questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}"#).unwrap();
    let dots = format!("yes{}", ".".repeat(40));
    let answers: Vec<Value> = (0..10)
        .map(|i| serde_json::json!({"answer": if i < 4 { dots.as_str() } else { "no" }, "answer_id": i + 1}))
        .collect();
    let doc = serde_json::json!({"annotations": [{"question_id": 1, "question_type": "is", "answers": answers}]});
    std::fs::write(&a, serde_json::to_vec(&doc).unwrap()).unwrap();
    let idx = load_questions_annotations(&q, &a).unwrap();
    let res = dir.path().join("r.json");
    std::fs::write(&res, r#"[{"question_id": 1, "answer": "yes"}]"#).unwrap();
    let once = score_predictions(&idx, &res).unwrap();
    assert_eq!(once.per_question[&1], 0.0);
    std::fs::write(
        &res,
        r#"[{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "yes"}]"#,
    )
    .unwrap();
    let twice = score_predictions(&idx, &res).unwrap();
    assert_eq!(twice.per_question[&1], 1.0);
    assert_eq!(twice.overall, 50.0);
}

#[test]
fn duplicate_answer_dicts_exclude_each_other() {
    // No answer_id: identical dicts are all removed from "the other answers",
    // as the original's `item != gtAnsDatum` does.
    let q = serde_json::json!({"questions": [{"question_id": 1}]});
    let a = serde_json::json!({"annotations": [{"question_id": 1, "answers": [
        {"answer": "x"}, {"answer": "x"}, {"answer": "x"}, {"answer": "y"}]}]});
    let idx = ScoringIndex::from_values(&q, &a, Path::new("q"), Path::new("a")).unwrap();
    // i in the 'x's: 0 others; i = 'y': 3 -> 1.  mean 0.25
    assert_eq!(idx.gt(1).unwrap().percent("x"), 25.0);
    assert_eq!(idx.gt(1).unwrap().exclusions(), &[3, 3, 3, 1]);
}

/// Throughput of the hot path (normalise + score): run with
/// `cargo test -p leverflow-operators --lib accuracy::fixture_tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let idx = index();
    let preds = load("predictions.json");
    let cases: Vec<(u64, String)> = preds["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["question_id"].as_u64().unwrap(),
                c["pred"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut norm = Normalizer::new();
    let reps = 200;
    let start = std::time::Instant::now();
    let mut total = 0.0;
    for _ in 0..reps {
        for (qid, pred) in &cases {
            total += idx.evaluate(*qid, pred, &mut norm).unwrap_or(0.0);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = (reps * cases.len()) as f64;
    println!(
        "{n} evaluations in {secs:.3} s: {:.0} evaluations/s (checksum {total})",
        n / secs
    );
}
