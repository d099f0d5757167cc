use serde_json::{json, Value};

use super::*;

fn query(id: u64) -> QueryRecord {
    QueryRecord {
        query_id: id,
        question_id: Some(id * 10 + 1),
        image_id: Some(9000 + id),
        question: Some(format!("what is {id}?")),
        gt_answers_raw: Some(vec!["Two".into(), "2".into()]),
        gt_answers_norm: Some(vec!["2".into(), "2".into()]),
    }
}

fn full_candidate(layout: PointerLayout) -> CandidateRecord {
    let mut c = CandidateRecord::new(&[3, 5], &[3, 5], layout, "sample", -1.25).unwrap();
    c.beam_rank = Some(0);
    c.beam_score = Some(0.5);
    c.temperature = Some(1.3);
    c.sample_logprob_tempered = Some(-0.75);
    c.vqa_raw_generation = Some(" two".into());
    c.vqa_pred_answer = Some("2".into());
    c.vqa_correct = Some(1);
    c.vqa_acc_score = Some(0.6);
    c.vqa_gt_prob = Some(0.1);
    c.vqa_rel_token_f1 = Some(1.0);
    c.vqa_rel_edit_sim = Some(1.0);
    c.vqa_rel_score = Some(1.0);
    c.vqa_eval_mode = Some("vqaEval".into());
    c.eval_split_used = Some("train".into());
    c.eval_failed = Some(false);
    c.reward = Some(1.6);
    c.advantage = Some(0.0);
    c.prompt_text = Some("prompt".into());
    c
}

#[test]
fn pointer_fields_follow_the_layout() {
    let shared = PointerFields::new(
        &[3, 5],
        &[3, 5],
        PointerLayout::SharedPool {
            positions_are_indices: true,
        },
    )
    .unwrap();
    assert_eq!(shared.pointer, vec![3, 5]);
    assert_eq!(shared.pointer_pos, Some(vec![3, 5]));
    assert_eq!(shared.pointer_global, None);

    let subset = PointerFields::new(
        &[0, 2],
        &[20, 22],
        PointerLayout::SharedPool {
            positions_are_indices: false,
        },
    )
    .unwrap();
    assert_eq!(subset.pointer, vec![20, 22]);
    assert_eq!(subset.pointer_pos, None);
    assert_eq!(subset.pointer_global, None);

    let per_query = PointerFields::new(&[0, 2], &[20, 22], PointerLayout::PerQueryPool).unwrap();
    assert_eq!(per_query.pointer, vec![0, 2]);
    assert_eq!(per_query.pointer_pos, None);
    assert_eq!(per_query.pointer_global, Some(vec![20, 22]));

    assert!(PointerFields::new(&[0], &[1, 2], PointerLayout::PerQueryPool).is_err());
    assert!(PointerFields::new(
        &[0, 2],
        &[20, 22],
        PointerLayout::SharedPool {
            positions_are_indices: true
        }
    )
    .is_err());
}

#[test]
fn candidate_accessors_recover_indices_and_positions() {
    let c =
        CandidateRecord::new(&[1, 4], &[21, 24], PointerLayout::PerQueryPool, "beam", 0.0).unwrap();
    assert_eq!(c.dataset_indices(), &[21, 24]);
    assert_eq!(c.positions(), Some(&[1u64, 4][..]));
    let c = CandidateRecord::new(
        &[1, 4],
        &[21, 24],
        PointerLayout::SharedPool {
            positions_are_indices: false,
        },
        "beam",
        0.0,
    )
    .unwrap();
    assert_eq!(c.dataset_indices(), &[21, 24]);
    assert_eq!(c.positions(), None);
    assert!(!c.has_vqa_fields());
}

#[test]
fn serialisation_order_and_skipping() {
    let c = CandidateRecord::new(
        &[3, 5],
        &[3, 5],
        PointerLayout::SharedPool {
            positions_are_indices: true,
        },
        "beam",
        -0.1,
    )
    .unwrap();
    let rec = RlRecord {
        query: query(7),
        candidate_pool_ids: None,
        pointer_candidates: vec![c],
    };
    let text = serde_json::to_string(&rec).unwrap();
    assert_eq!(
        text,
        r#"{"query":{"query_id":7,"question_id":71,"image_id":9007,"question":"what is 7?","gt_answers_raw":["Two","2"],"gt_answers_norm":["2","2"]},"pointer_candidates":[{"pointer":[3,5],"pointer_pos":[3,5],"gen_method":"beam","logprob_score":-0.1}]}"#
    );

    let c = CandidateRecord::new(
        &[0, 1],
        &[40, 41],
        PointerLayout::PerQueryPool,
        "random",
        2.0,
    )
    .unwrap();
    let rec = RlRecord {
        query: query(8),
        candidate_pool_ids: Some(vec![40, 41]),
        pointer_candidates: vec![c],
    };
    let v: Value = serde_json::to_value(&rec).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["query", "candidate_pool_ids", "pointer_candidates"]);
    let ckeys: Vec<&str> = v["pointer_candidates"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ckeys,
        ["pointer", "pointer_global", "gen_method", "logprob_score"]
    );
    let back: RlRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, rec);
}

#[test]
fn full_record_round_trips_and_keeps_declaration_order() {
    let c = full_candidate(PointerLayout::SharedPool {
        positions_are_indices: true,
    });
    let v = serde_json::to_value(&c).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "pointer",
            "pointer_pos",
            "gen_method",
            "beam_rank",
            "beam_score",
            "logprob_score",
            "temperature",
            "sample_logprob_tempered",
            "vqa_raw_generation",
            "vqa_pred_answer",
            "vqa_correct",
            "vqa_acc_score",
            "vqa_gt_prob",
            "vqa_rel_token_f1",
            "vqa_rel_edit_sim",
            "vqa_rel_score",
            "vqa_eval_mode",
            "eval_split_used",
            "eval_failed",
            "reward",
            "advantage",
            "prompt_text"
        ]
    );
    let back: CandidateRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, c);
    assert!(c.has_vqa_fields());
}

#[test]
fn lenient_reading_of_original_files() {
    // Ids as strings, an extra key the original writes, a non-finite float written as null.
    let v = json!({
        "query": {"query_id": 3, "question_id": "30", "image_id": 5, "question": "q",
                  "gt_answers_raw": [], "gt_answers_norm": []},
        "pointer_candidates": [{"pointer": [1, 2], "gen_method": "beam", "logprob_score": null,
                                "vqa_prompt_len": 12}]
    });
    let rec: RlRecord = serde_json::from_value(v).unwrap();
    assert_eq!(rec.query.question_id, Some(30));
    assert!(rec.pointer_candidates[0].logprob_score.is_nan());
    let bad = json!({"query_id": 3, "question_id": "x", "image_id": 5, "question": "q",
                     "gt_answers_raw": [], "gt_answers_norm": []});
    assert!(serde_json::from_value::<QueryRecord>(bad).is_err());
}

/// Every `properties` entry anywhere in the schema has a description.
fn assert_described(v: &Value, path: &str) {
    if let Some(obj) = v.as_object() {
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                assert!(
                    p.get("description").and_then(Value::as_str).is_some(),
                    "{path}.properties.{k} has no description"
                );
            }
        }
        for (k, child) in obj {
            assert_described(child, &format!("{path}.{k}"));
        }
    }
}

#[test]
fn json_schema_is_documented_and_covers_every_field() {
    let schema = json_schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_described(&schema, "$");
    for def in ["query", "candidate", "meta"] {
        assert!(schema["$defs"][def]["description"].is_string(), "{def}");
    }
    // Every serialised key is a documented property and vice versa.
    let c = serde_json::to_value(full_candidate(PointerLayout::SharedPool {
        positions_are_indices: true,
    }))
    .unwrap();
    let mut keys: Vec<String> = c.as_object().unwrap().keys().cloned().collect();
    keys.push("pointer_global".into());
    keys.sort();
    let mut props: Vec<String> = schema["$defs"]["candidate"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    props.sort();
    assert_eq!(keys, props);
    let mut qprops: Vec<String> = schema["$defs"]["query"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    qprops.sort();
    let mut qkeys: Vec<String> = serde_json::to_value(query(1))
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    qkeys.sort();
    assert_eq!(qkeys, qprops);
}

#[test]
fn validator_accepts_records_and_rejects_violations() {
    for layout in [
        PointerLayout::SharedPool {
            positions_are_indices: true,
        },
        PointerLayout::SharedPool {
            positions_are_indices: false,
        },
        PointerLayout::PerQueryPool,
    ] {
        let rec = RlRecord {
            query: query(1),
            candidate_pool_ids: (layout == PointerLayout::PerQueryPool).then(|| vec![9, 3, 5]),
            pointer_candidates: vec![full_candidate(layout)],
        };
        let v = serde_json::to_value(&rec).unwrap();
        validate::validate_record(&v).unwrap();
    }
    validate::validate_meta(&json!({"n": 1})).unwrap();
    assert!(validate::validate_meta(&json!([1])).is_err());

    let good = serde_json::to_value(RlRecord {
        query: query(1),
        candidate_pool_ids: None,
        pointer_candidates: vec![full_candidate(PointerLayout::SharedPool {
            positions_are_indices: true,
        })],
    })
    .unwrap();
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        validate::validate_record(&v)
    };
    assert!(mutate(&|v| {
        v["query"].as_object_mut().unwrap().remove("question");
    })
    .is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["gen_method"] = json!("greedy")).is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["pointer"] = json!([-1, 2])).is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["vqa_correct"] = json!(2)).is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["pointer_global"] = json!([1, 2])).is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["eval_failed"] = json!(null)).is_err());
    assert!(mutate(&|v| v["pointer_candidates"][0]["surprise"] = json!(1)).is_err());
    assert!(mutate(&|v| v["query"]["image_id"] = json!("12")).is_err());
    // A null float (non-finite value) is allowed.
    assert!(mutate(&|v| v["pointer_candidates"][0]["logprob_score"] = json!(null)).is_ok());
}

#[test]
fn arrow_schema_columns_and_descriptions() {
    let names = |s: &arrow::datatypes::Schema| -> Vec<String> {
        s.fields().iter().map(|f| f.name().clone()).collect()
    };
    let base = arrow_schema(false, false, false);
    assert_eq!(
        names(&base),
        [
            "query_id",
            "question_id",
            "image_id",
            "question",
            "gt_answers_raw",
            "gt_answers_norm",
            "candidate_index",
            "pointer",
            "pointer_pos",
            "gen_method",
            "beam_rank",
            "beam_score",
            "logprob_score",
            "temperature",
            "sample_logprob_tempered"
        ]
    );
    let full = arrow_schema(true, true, true);
    let full_names = names(&full);
    assert_eq!(full_names.len(), base.fields().len() + 1 + 13 + 1);
    assert_eq!(full_names[6], "candidate_pool_ids");
    assert_eq!(full_names.last().unwrap(), "prompt_text");
    assert_eq!(&full_names[16..29], vqa_column_names().as_slice());
    for f in full.fields() {
        let d = f.metadata().get(DESCRIPTION_KEY);
        assert!(
            d.is_some_and(|d| !d.is_empty()),
            "{} has no description",
            f.name()
        );
    }
    // Every candidate field of the JSON has a column (pointer_global is folded into pointer).
    let c = serde_json::to_value(full_candidate(PointerLayout::PerQueryPool)).unwrap();
    for k in c.as_object().unwrap().keys() {
        if k != "pointer_global" {
            assert!(full_names.contains(k), "no column for {k}");
        }
    }
}

#[test]
fn a_query_known_by_its_index_only_is_valid_and_keeps_no_other_key() {
    let q = QueryRecord::index_only(7);
    let v = serde_json::to_value(&q).unwrap();
    assert_eq!(v, json!({"query_id": 7}));
    let record = json!({"query": v, "pointer_candidates": []});
    validate::validate_record(&record).unwrap();
    // Partly there is not allowed: the dataset's fields come together.
    let partial = json!({"query": {"query_id": 7, "question_id": 3}, "pointer_candidates": []});
    let errs = validate::validate_record(&partial).unwrap_err();
    assert!(errs.iter().any(|e| e.contains("needs key")), "{errs:?}");
    let back: QueryRecord = serde_json::from_value(json!({"query_id": 7})).unwrap();
    assert_eq!(back, q);
    assert!(!back.has_dataset_fields());
}

#[test]
fn the_arrow_schema_without_the_dataset_keeps_query_id_only() {
    let with = arrow_schema(false, false, false);
    let without = arrow_schema_of(false, false, false, false);
    assert_eq!(with.fields().len(), without.fields().len() + 5);
    assert_eq!(without.field(0).name(), "query_id");
    assert!(without.field_with_name("question").is_err());
}
