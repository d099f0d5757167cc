use super::*;
use std::io::Write;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn reads_fixture_in_file_order() {
    let path = fixture("pointer_selector/beam_data.json");
    assert_eq!(detect_format(&path).unwrap(), BeamFormat::Json);
    let recs = read_all(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(recs.len(), obj.len());
    assert_eq!(recs.len(), 20);
    for (rec, (k, val)) in recs.iter().zip(obj) {
        assert_eq!(rec.query_index.to_string(), *k);
        let ids: Vec<Vec<u64>> = serde_json::from_value(val["id_list"].clone()).unwrap();
        let scores: Vec<f64> = serde_json::from_value(val["score_list"].clone()).unwrap();
        assert_eq!(rec.id_list, ids);
        assert_eq!(rec.score_list, scores);
    }
    assert_eq!(recs[0].query_index, 0);
    assert_eq!(recs[0].id_list[0], vec![65, 49, 0]);
    assert_eq!(recs[0].score_list[0], 0.086187);
    assert_eq!(recs[2].query_index, 3);
}

#[test]
fn extra_keys_with_any_value_are_ignored() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "b.json",
        r#"{"7": {"beams": [{"a": [1, {"b": null}]}], "id_list": [[1, 2, 7]], "shot_scores": null,
              "score_list": [0.5], "few_shot_num": 2, "x": "s\"}"}}"#,
    );
    assert_eq!(detect_format(&p).unwrap(), BeamFormat::Json);
    let recs = read_all(&p).unwrap();
    assert_eq!(
        recs,
        vec![BeamRecord {
            query_index: 7,
            id_list: vec![vec![1, 2, 7]],
            score_list: vec![0.5]
        }]
    );
}

#[test]
fn pretty_printed_json_is_detected_as_json() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "b.json",
        "{\n  \"1\": {\"id_list\": [[3, 1]], \"score_list\": [1.0]},\n  \"0\": {\"id_list\": [[4, 0]], \"score_list\": [2.0]}\n}\n",
    );
    assert_eq!(detect_format(&p).unwrap(), BeamFormat::Json);
    let keys: Vec<u64> = read_all(&p)
        .unwrap()
        .iter()
        .map(|r| r.query_index)
        .collect();
    assert_eq!(keys, vec![1, 0]);
}

#[test]
fn jsonl_both_forms_autodetected() {
    let d = tempfile::tempdir().unwrap();
    let text = "{\"3\": {\"id_list\": [[1, 3]], \"score_list\": [0.1], \"beams\": []}}\n\n\
                {\"id_list\": [[2, 5], [4, 5]], \"query_idx\": 5, \"score_list\": [0.2, 0.1]}\n";
    for name in ["b.json", "b.jsonl", "b.ndjson", "b.txt"] {
        let p = write(&d, name, text);
        assert_eq!(detect_format(&p).unwrap(), BeamFormat::JsonLines, "{name}");
        let recs = read_all(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].query_index, 3);
        assert_eq!(recs[1].query_index, 5);
        assert_eq!(recs[1].id_list, vec![vec![2, 5], vec![4, 5]]);
        assert_eq!(recs[1].score_list, vec![0.2, 0.1]);
    }
    // A single flat-form line is JSON Lines too.
    let p = write(
        &d,
        "one.json",
        "{\"query_idx\": 9, \"id_list\": [[1, 9]], \"score_list\": [1]}",
    );
    assert_eq!(detect_format(&p).unwrap(), BeamFormat::JsonLines);
    assert_eq!(read_all(&p).unwrap()[0].query_index, 9);
}

#[test]
fn truncated_json_names_file_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "trunc.json",
        "{\n\"0\": {\"id_list\": [[1, 0]], \"score_list\": [0.5]},\n\"1\": {\"id_list\": [[2, 1]], \"sc",
    );
    let mut it = BeamReader::open(&p).unwrap();
    assert_eq!(it.next().unwrap().unwrap().query_index, 0);
    let err = it.next().unwrap().unwrap_err();
    match &err {
        SourceError::Json { path, at, .. } => {
            assert_eq!(path, &p);
            assert_eq!(at.line, 3);
            assert!(at.column.unwrap() > 20);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("trunc.json") && msg.contains("line 3, column"),
        "{msg}"
    );
    assert!(it.next().is_none());
}

#[test]
fn malformed_json_error() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "bad.json",
        "{\"0\": {\"id_list\": [[1, 0]] \"score_list\": [0.5]}}",
    );
    let err = read_all(&p).unwrap_err();
    let SourceError::Json { at, message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(at.line, 1);
    assert_eq!(at.column, Some(28));
    assert!(message.contains("expected"), "{message}");
    assert!(!message.contains("at line"), "{message}");
    // Wrong value types are reported the same way.
    let p = write(
        &d,
        "bad2.json",
        "{\"0\": {\"id_list\": [[1, -1]], \"score_list\": [0.5]}}",
    );
    assert!(matches!(
        read_all(&p).unwrap_err(),
        SourceError::Json { .. }
    ));
    // A missing field too.
    let p = write(&d, "bad3.json", "{\"0\": {\"id_list\": [[1, 0]]}}");
    let err = read_all(&p).unwrap_err();
    assert!(err.to_string().contains("score_list"), "{err}");
}

#[test]
fn jsonl_errors_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "b.jsonl",
        "{\"0\": {\"id_list\": [[1, 0]], \"score_list\": [0.5]}}\n{\"1\": {\"id_list\": [[1, 1]], \"score_list\": [0.5]}\n",
    );
    let recs: Vec<_> = BeamReader::open(&p).unwrap().collect();
    assert_eq!(recs.len(), 2);
    let err = recs[1].as_ref().unwrap_err();
    let SourceError::Json { at, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(at.line, 2);
    assert!(err.to_string().contains("b.jsonl"));

    let p = write(&d, "c.jsonl", "{\"0\": {\"id_list\": [[1, 0]], \"score_list\": [0.5]}}\n{\"0\": {\"id_list\": [[1, 0]], \"score_list\": [0.5]}}\n");
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::DuplicateKey {
                key: 0,
                at: Position { line: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );

    let p = write(
        &d,
        "e.jsonl",
        "{\"q\": {\"id_list\": [[1, 0]], \"score_list\": [0.5]}}\n",
    );
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(&err, SourceError::KeyNotInteger { key, .. } if key == "q"),
        "{err:?}"
    );

    let p = write(
        &d,
        "f.jsonl",
        "{\"query_idx\": 4, \"id_list\": [[1, 0]], \"score_list\": [0.5]}\n",
    );
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::QueryMismatch {
                key: 4,
                beam: 0,
                found: Some(0),
                ..
            }
        ),
        "{err:?}"
    );

    let p = write(&d, "g.jsonl", "{\"query_idx\": 4, \"id_list\": [[1, 4]]}\n");
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(&err, SourceError::InvalidRecord { key: Some(k), .. } if k == "4"),
        "{err:?}"
    );
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn non_integer_key_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    for key in ["abc", "-1", "1.5", ""] {
        let p = write(
            &d,
            "k.json",
            &format!("{{\"0\": {{\"id_list\": [[1, 0]], \"score_list\": [0.5]}},\n \"{key}\": {{\"id_list\": [], \"score_list\": []}}}}"),
        );
        let recs: Vec<_> = BeamReader::open(&p).unwrap().collect();
        assert_eq!(recs.len(), 2, "{key}");
        let err = recs[1].as_ref().unwrap_err();
        match err {
            SourceError::KeyNotInteger { key: k, at, .. } => {
                assert_eq!(k, key);
                assert_eq!(at.line, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("k.json"));
    }
}

#[test]
fn duplicate_key_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "dup.json",
        "{\"2\": {\"id_list\": [[1, 2]], \"score_list\": [0.5]},\n \"02\": {\"id_list\": [[1, 2]], \"score_list\": [0.5]}}",
    );
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::DuplicateKey {
                key: 2,
                at: Position { line: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("duplicate query index 2"));
}

#[test]
fn query_mismatch_names_the_key() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "m.json",
        "{\"5\": {\"id_list\": [[1, 5], [2, 6]], \"score_list\": [0.5, 0.4]}}",
    );
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::QueryMismatch {
                key: 5,
                beam: 1,
                found: Some(6),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("query 5"), "{err}");
    let p = write(
        &d,
        "e.json",
        "{\"5\": {\"id_list\": [[]], \"score_list\": [0.5]}}",
    );
    let err = read_all(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::QueryMismatch {
                key: 5,
                beam: 0,
                found: None,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn empty_and_non_object_files() {
    let d = tempfile::tempdir().unwrap();
    let p = write(&d, "e.json", "  \n ");
    assert!(matches!(
        BeamReader::open(&p),
        Err(SourceError::Empty { .. })
    ));
    let p = write(&d, "a.json", "\n [1, 2]");
    let Err(SourceError::NotAnObject { found, at, .. }) = BeamReader::open(&p) else {
        panic!()
    };
    assert_eq!(found, '[');
    assert_eq!(
        at,
        Position {
            line: 2,
            column: Some(2)
        }
    );
    // An empty .jsonl file is simply empty.
    let p = write(&d, "e.jsonl", "");
    assert_eq!(read_all(&p).unwrap(), vec![]);
    let p = write(&d, "missing.json", "");
    std::fs::remove_file(&p).unwrap();
    let err = BeamReader::open(&p).err().unwrap();
    assert!(matches!(err, SourceError::Io { .. }));
    assert!(err.to_string().contains("missing.json"));
}

#[test]
fn slice_bounds_follow_python() {
    assert_eq!(slice_bounds(0, -1, 10), (0, 10));
    assert_eq!(slice_bounds(2, 5, 10), (2, 5));
    assert_eq!(slice_bounds(2, 50, 10), (2, 10));
    assert_eq!(slice_bounds(-3, -1, 10), (7, 10));
    assert_eq!(slice_bounds(0, -2, 10), (0, 8));
    assert_eq!(slice_bounds(-30, 3, 10), (0, 3));
    assert_eq!(slice_bounds(6, 2, 10), (6, 6));
    assert_eq!(slice_bounds(12, -1, 10), (10, 10));
}

#[test]
fn range_slices_keys_in_file_order() {
    let path = fixture("pointer_selector/beam_data.json");
    let all: Vec<u64> = read_all(&path)
        .unwrap()
        .iter()
        .map(|r| r.query_index)
        .collect();
    let take = |s: i64, e: i64| -> Vec<u64> {
        BeamReader::open(&path)
            .unwrap()
            .with_range(s, e)
            .unwrap()
            .map(|r| r.unwrap().query_index)
            .collect()
    };
    assert_eq!(take(0, -1), all);
    assert_eq!(take(2, 5), all[2..5].to_vec());
    assert_eq!(take(5, 100), all[5..].to_vec());
    assert_eq!(take(-3, -1), all[17..].to_vec());
    assert_eq!(take(0, -2), all[..18].to_vec());
    assert_eq!(take(7, 3), Vec::<u64>::new());

    // File order, not numeric order.
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "o.json",
        r#"{"9": {"id_list": [[1, 9]], "score_list": [1]}, "2": {"id_list": [[1, 2]], "score_list": [1]}, "5": {"id_list": [[1, 5]], "score_list": [1]}}"#,
    );
    let got: Vec<u64> = BeamReader::open(&p)
        .unwrap()
        .with_range(1, 3)
        .unwrap()
        .map(|r| r.unwrap().query_index)
        .collect();
    assert_eq!(got, vec![2, 5]);
    assert_eq!(count_records(&p).unwrap(), 3);
}

#[test]
fn dropping_a_reader_early_stops_the_parser() {
    let d = tempfile::tempdir().unwrap();
    let mut text = String::from("{");
    for i in 0..(CHANNEL_BOUND * 4) {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&format!(
            "\"{i}\": {{\"id_list\": [[1, {i}]], \"score_list\": [0.5]}}"
        ));
    }
    text.push('}');
    let p = write(&d, "big.json", &text);
    let mut r = BeamReader::open(&p).unwrap();
    assert_eq!(r.next().unwrap().unwrap().query_index, 0);
    drop(r); // must not hang
    assert_eq!(count_records(&p).unwrap(), (CHANNEL_BOUND * 4) as u64);
}

#[test]
fn sampler_cache_fixture_and_errors() {
    let path = fixture("pointer_selector/sampler_cache.json");
    let cache = load_sampler_cache(&path).unwrap();
    let v: BTreeMap<String, Vec<u64>> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(cache.len(), v.len());
    for (k, pool) in &v {
        assert_eq!(&cache[&k.parse::<u64>().unwrap()], pool);
        assert_eq!(pool.len(), 64);
    }

    let d = tempfile::tempdir().unwrap();
    let p = write(&d, "s.json", "{\"1\": [1, 2, 3],\n \"2\": [4, 5, 4]}");
    let err = load_sampler_cache(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::DuplicatePoolId {
                key: 2,
                id: 4,
                at: Position { line: 2, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("query 2") && err.to_string().contains("candidate id 4"));
    let p = write(&d, "s2.json", "{\"x\": [1]}");
    assert!(matches!(
        load_sampler_cache(&p).unwrap_err(),
        SourceError::KeyNotInteger { .. }
    ));
    let p = write(&d, "s3.json", "{\"1\": [1, 2.5]}");
    assert!(matches!(
        load_sampler_cache(&p).unwrap_err(),
        SourceError::Json { .. }
    ));
    let p = write(&d, "s4.json", "{\"1\": [1], \"1\": [2]}");
    assert!(matches!(
        load_sampler_cache(&p).unwrap_err(),
        SourceError::DuplicateKey { key: 1, .. }
    ));
}

#[test]
fn candidate_indices_fixture_and_errors() {
    let ids = load_candidate_indices(&fixture("pointer_selector/candidate_indices.json")).unwrap();
    assert_eq!(ids, (20..84).collect::<Vec<u64>>());
    let d = tempfile::tempdir().unwrap();
    let p = write(&d, "c.json", "[3, 4, 3]");
    assert!(matches!(
        load_candidate_indices(&p).unwrap_err(),
        SourceError::DuplicateCandidate {
            id: 3,
            first: 0,
            second: 2,
            ..
        }
    ));
    let p = write(&d, "c2.json", "[3, \"4\"]");
    let err = load_candidate_indices(&p).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Json {
                at: Position { line: 1, .. },
                ..
            }
        ),
        "{err:?}"
    );
}

/// Streams a generated ~50 MB file; run with `--ignored`.
#[test]
#[ignore]
fn streams_a_large_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("large.json");
    let mut f = std::io::BufWriter::new(File::create(&p).unwrap());
    let n = 200_000u64;
    f.write_all(b"{").unwrap();
    for i in 0..n {
        if i > 0 {
            f.write_all(b", ").unwrap();
        }
        write!(f, "\"{i}\": {{\"id_list\": [").unwrap();
        for b in 0..5 {
            if b > 0 {
                f.write_all(b", ").unwrap();
            }
            write!(f, "[{}, {}, {i}]", (i * 7 + b) % 1000, (i * 13 + b) % 1000).unwrap();
        }
        f.write_all(b"], \"score_list\": [0.086187, 0.070043, 0.044061, 0.033993, 0.03042], \"beams\": [[1,2,3],[4,5,6]]}").unwrap();
    }
    f.write_all(b"}").unwrap();
    f.flush().unwrap();
    drop(f);
    assert!(std::fs::metadata(&p).unwrap().len() > 40_000_000);
    let mut count = 0u64;
    for (i, r) in BeamReader::open(&p).unwrap().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.query_index, i as u64);
        count += 1;
    }
    assert_eq!(count, n);
}

#[test]
fn reader_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<BeamReader>();
    assert_send::<SourceError>();
    let path = fixture("pointer_selector/beam_data.json");
    let reader = BeamReader::open(&path).unwrap();
    let n = std::thread::spawn(move || reader.count()).join().unwrap();
    assert_eq!(n, 20);
}
