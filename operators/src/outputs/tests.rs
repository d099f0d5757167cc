//! End-to-end tests of the outputs: records in any order, sorted, through
//! the [`OutputWriter`] → JSON + Parquet,
//! schema conformance, and reading the JSON the way the original trainer does.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ::parquet::basic::Compression;
use leverflow_schemas::validate::{validate_meta, validate_record};
use leverflow_schemas::{
    arrow_schema, CandidateRecord, PointerLayout, QueryRecord, RlRecord, META_KEY, PARQUET_META_KEY,
};
use serde_json::{json, Value};

use super::*;

const METHODS: [&str; 5] = ["beam", "retrieval", "sample", "random", "source_beam"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pointer_selector")
        .join(name)
}

/// The shared pool with `--candidate_indices` (dataset indices 20..83).
fn candidate_indices() -> Vec<u64> {
    serde_json::from_str(&fs::read_to_string(fixture("candidate_indices.json")).unwrap()).unwrap()
}

/// Per-query pools: query id → 64 dataset indices.
fn sampler_cache() -> HashMap<u64, Vec<u64>> {
    let v: HashMap<String, Vec<u64>> =
        serde_json::from_str(&fs::read_to_string(fixture("sampler_cache.json")).unwrap()).unwrap();
    v.into_iter()
        .map(|(k, p)| (k.parse().unwrap(), p))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    /// Whole matrix, positions = dataset indices.
    SharedIdentity,
    /// Whole matrix = `candidate_indices` (positions != dataset indices).
    SharedSubset,
    /// `--sampler_cache`.
    PerQuery,
}

impl Case {
    fn layout(self) -> PointerLayout {
        match self {
            Case::SharedIdentity => PointerLayout::SharedPool {
                positions_are_indices: true,
            },
            Case::SharedSubset => PointerLayout::SharedPool {
                positions_are_indices: false,
            },
            Case::PerQuery => PointerLayout::PerQueryPool,
        }
    }

    /// The pool of query `q`: dataset index at each position.
    fn pool(self, q: u64) -> Vec<u64> {
        match self {
            Case::SharedIdentity => (0..64).collect(),
            Case::SharedSubset => candidate_indices(),
            Case::PerQuery => sampler_cache()[&q].clone(),
        }
    }
}

/// Deterministic positions of candidate `k` of query `q` (2 shots).
fn positions(q: u64, k: u64) -> Vec<u64> {
    let a = (q * 7 + k * 13) % 64;
    let b = (a + 1 + (q + k * 5) % 62) % 64;
    vec![a, b]
}

fn make_record(case: Case, q: u64, with_vqa: bool, with_prompts: bool) -> RlRecord {
    let pool = case.pool(q);
    let n = 3 + q % 4;
    let pointer_candidates = (0..n)
        .map(|k| {
            let pos = positions(q, k);
            let ds: Vec<u64> = pos.iter().map(|&p| pool[p as usize]).collect();
            let method = METHODS[(k % 5) as usize];
            let mut c =
                CandidateRecord::new(&pos, &ds, case.layout(), method, -(k as f64) * 0.37 - 0.1)
                    .unwrap();
            if method == "beam" {
                c.beam_rank = Some(k as u32);
                c.beam_score = Some(1.0 / (k as f64 + 3.0));
            }
            if method == "sample" {
                c.temperature = Some(1.3);
                c.sample_logprob_tempered = Some(-0.5 * k as f64);
            }
            if with_vqa {
                let ok = (q + k).is_multiple_of(3);
                c.vqa_raw_generation = Some(format!(" answer {k}\n"));
                c.vqa_pred_answer = Some(format!("answer {k}"));
                c.vqa_correct = Some(u8::from(ok));
                c.vqa_acc_score = Some(if ok { 0.6 } else { 0.0 });
                c.vqa_gt_prob = Some(0.125);
                c.vqa_rel_token_f1 = Some(0.5);
                c.vqa_rel_edit_sim = Some(0.25);
                c.vqa_rel_score = Some(0.4);
                c.vqa_eval_mode = Some(if k == 4 { "fallback" } else { "vqaEval" }.into());
                c.eval_split_used = Some("train".into());
                c.eval_failed = Some(k == 5);
                c.reward = Some(if ok { 1.6 } else { 0.1 });
                c.advantage = Some(k as f64 - 1.0);
            }
            if with_prompts {
                c.prompt_text = Some(format!("<|im_start|>user\nQ{q} shot {k}"));
            }
            c
        })
        .collect();
    RlRecord {
        query: QueryRecord {
            query_id: q,
            question_id: Some(q * 10 + 3),
            image_id: Some(100_000 + q),
            question: Some(format!("What is in image {q}? \u{1F600}")),
            gt_answers_raw: Some(vec!["Cat".into(), "cats".into(), "cat".into()]),
            gt_answers_norm: Some(vec!["cat".into(), "cat".into(), "cat".into()]),
        },
        candidate_pool_ids: (case == Case::PerQuery).then_some(pool),
        pointer_candidates,
    }
}

fn options(case: Case, with_vqa: bool, with_prompts: bool) -> ParquetOptions {
    ParquetOptions {
        per_query_pool: case == Case::PerQuery,
        with_vqa,
        with_prompts,
        shared_pool: (case == Case::SharedSubset).then(candidate_indices),
        batch_rows: 7,
        row_group_rows: 50,
        ..Default::default()
    }
}

/// Pushes `ids` in the given order through a spill and writes both formats.
fn write_outputs(
    dir: &Path,
    case: Case,
    ids: &[u64],
    with_vqa: bool,
    with_prompts: bool,
    meta: &Value,
) -> OutputConfig {
    let mut config = OutputConfig::for_formats(
        &dir.join("rl_data.json"),
        &[OutputFormat::Json, OutputFormat::Parquet],
    );
    config.parquet_options = options(case, with_vqa, with_prompts);
    let sorted: BTreeMap<u64, RlRecord> = ids
        .iter()
        .map(|&q| (q, make_record(case, q, with_vqa, with_prompts)))
        .collect();
    assert_eq!(sorted.len(), ids.len());
    let mut writer = OutputWriter::create(&config).unwrap();
    for (q, r) in &sorted {
        writer.write(*q, r).unwrap();
    }
    writer.finish(meta).unwrap();
    config
}

fn no_temp_files(dir: &Path) {
    let left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Out of order: a fixed shuffle of 0..40.
fn shuffled_ids() -> Vec<u64> {
    (0..40u64).map(|k| (k * 17 + 5) % 40).collect()
}

#[test]
fn both_formats_conform_to_the_schemas_in_every_layout() {
    let meta = json!({"n_queries": 40, "timings": {"total_s": 1.5}, "format": "leverflow"});
    for case in [Case::SharedIdentity, Case::SharedSubset, Case::PerQuery] {
        for (with_vqa, with_prompts) in [(false, false), (true, false), (true, true)] {
            let dir = tempfile::tempdir().unwrap();
            let config = write_outputs(
                dir.path(),
                case,
                &shuffled_ids(),
                with_vqa,
                with_prompts,
                &meta,
            );
            no_temp_files(dir.path());
            let label = format!("{case:?} vqa={with_vqa} prompts={with_prompts}");

            // JSON: ascending keys, _meta last, every record valid.
            let json_path = config.json.as_ref().unwrap();
            let top: Value = serde_json::from_str(&fs::read_to_string(json_path).unwrap()).unwrap();
            let obj = top.as_object().unwrap();
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            let mut expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
            expected.push(META_KEY.into());
            assert_eq!(keys, expected, "{label}");
            for (k, v) in obj {
                if k == META_KEY {
                    validate_meta(v).unwrap();
                    assert_eq!(v, &meta);
                } else if let Err(errors) = validate_record(v) {
                    panic!("{label}: record {k}: {errors:?}");
                }
            }
            let (read_meta, records) = read_rl_json(json_path).unwrap();
            assert_eq!(read_meta.as_ref(), Some(&meta));
            for (q, rec) in &records {
                assert_eq!(
                    rec,
                    &make_record(case, *q, with_vqa, with_prompts),
                    "{label}"
                );
            }

            // Parquet: schema, metadata, rows.
            let pq_path = config.parquet.as_ref().unwrap();
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(fs::File::open(pq_path).unwrap()).unwrap();
            let expected_schema = arrow_schema(case == Case::PerQuery, with_vqa, with_prompts);
            assert_eq!(
                builder.schema().fields(),
                expected_schema.fields(),
                "{label}"
            );
            let kv = builder
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .unwrap();
            let stored = kv.iter().find(|k| k.key == PARQUET_META_KEY).unwrap();
            let stored: Value = serde_json::from_str(stored.value.as_deref().unwrap()).unwrap();
            assert_eq!(stored, meta);

            let (pmeta, rows) = read_rl_parquet(pq_path).unwrap();
            assert_eq!(pmeta.as_ref(), Some(&meta));
            let total: usize = records
                .iter()
                .map(|(_, r)| r.pointer_candidates.len())
                .sum();
            assert_eq!(rows.len(), total, "{label}");
            for row in &rows {
                let q = row.query.query_id;
                let k = u64::from(row.candidate_index);
                let pool = case.pool(q);
                let pos = positions(q, k);
                let ds: Vec<u64> = pos.iter().map(|&p| pool[p as usize]).collect();
                assert_eq!(
                    row.pointer_pos, pos,
                    "{label}: pointer_pos = pool positions"
                );
                assert_eq!(row.pointer, ds, "{label}: pointer = dataset indices");
            }
            let grouped = rows_to_records(rows);
            assert_eq!(grouped, records, "{label}: Parquet round trip");
        }
    }
}

/// The original trainer's reading of one RL JSON file (`RLBeamDatasetWithEmbedding.__init__`):
/// keys that are not integers are skipped; per candidate, `eval_failed` ones and those whose
/// `vqa_eval_mode` is `fallback` (skip_fallback_reward, default on) or `error` are skipped;
/// the pointer is `pointer_pos` when that key exists, else `pointer`, and each value is looked
/// up as a dataset index in `{idx: pos for pos, idx in enumerate(candidate_indices)}` (a miss
/// is a KeyError) giving the label = position in the candidate embedding matrix; labels must
/// have `shot_num` entries.  Queries left with no candidate are dropped.
fn original_reader_labels(
    rl_data: &Value,
    candidate_indices: &[u64],
    shot_num: usize,
) -> Result<BTreeMap<u64, Vec<Vec<usize>>>, String> {
    let mut pos_of = HashMap::new();
    for (pos, &idx) in candidate_indices.iter().enumerate() {
        pos_of.insert(idx, pos); // later duplicates win, like the dict comprehension
    }
    let mut out = BTreeMap::new();
    for (key, qd) in rl_data.as_object().unwrap() {
        let Ok(q) = key.parse::<u64>() else { continue };
        let cands = qd
            .get("pointer_candidates")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut labels = Vec::new();
        for c in &cands {
            if c.get("eval_failed")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                continue;
            }
            let mode = c.get("vqa_eval_mode").and_then(Value::as_str);
            if mode == Some("fallback") || mode == Some("error") {
                continue;
            }
            let pointer = match (c.get("pointer_pos"), c.get("pointer")) {
                (Some(p), _) => p,
                (None, Some(p)) => p,
                (None, None) => return Err(format!("query {q}: no pointer nor pointer_pos")),
            };
            let mut mapped = Vec::new();
            for idx in pointer.as_array().unwrap() {
                let idx = idx.as_u64().unwrap();
                let Some(&p) = pos_of.get(&idx) else {
                    return Err(format!(
                        "query {q}: pointer index {idx} not in candidate_indices"
                    ));
                };
                mapped.push(p);
            }
            if mapped.len() != shot_num {
                return Err(format!("query {q}: pointer length {}", mapped.len()));
            }
            labels.push(mapped);
        }
        if !labels.is_empty() {
            out.insert(q, labels);
        }
    }
    Ok(out)
}

/// Which candidates of `make_record` the original reader keeps.
fn kept(with_vqa: bool, k: u64) -> bool {
    !(with_vqa && (k == 4 || k == 5))
}

#[test]
fn the_original_reader_recovers_the_dataset_indices_of_shared_pool_outputs() {
    for (case, reader_indices) in [
        (Case::SharedIdentity, (0..64).collect::<Vec<u64>>()),
        (Case::SharedSubset, candidate_indices()),
    ] {
        for with_vqa in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = write_outputs(
                dir.path(),
                case,
                &shuffled_ids(),
                with_vqa,
                false,
                &json!({}),
            );
            let data: Value =
                serde_json::from_str(&fs::read_to_string(config.json.unwrap()).unwrap()).unwrap();
            let labels = original_reader_labels(&data, &reader_indices, 2).unwrap();
            assert_eq!(labels.len(), 40);
            for (q, got) in labels {
                let n = 3 + q % 4;
                let want: Vec<Vec<u64>> = (0..n)
                    .filter(|&k| kept(with_vqa, k))
                    .map(|k| {
                        let pool = case.pool(q);
                        positions(q, k).iter().map(|&p| pool[p as usize]).collect()
                    })
                    .collect();
                let got: Vec<Vec<u64>> = got
                    .iter()
                    .map(|l| l.iter().map(|&p| reader_indices[p]).collect())
                    .collect();
                assert_eq!(got, want, "{case:?} query {q}");
            }
        }
    }

    // Why `pointer_pos` must be left out when positions differ from dataset indices:
    // the reader would take the positions for dataset indices.
    let pool = candidate_indices();
    let mut rec = make_record(Case::SharedSubset, 3, false, false);
    for (k, c) in rec.pointer_candidates.iter_mut().enumerate() {
        c.pointer_pos = Some(positions(3, k as u64));
    }
    let data = json!({"3": serde_json::to_value(&rec).unwrap()});
    match original_reader_labels(&data, &pool, 2) {
        Err(_) => {} // a position that is no dataset index of the pool: KeyError
        Ok(labels) => {
            let got: Vec<Vec<u64>> = labels[&3]
                .iter()
                .map(|l| l.iter().map(|&p| pool[p]).collect())
                .collect();
            let want: Vec<Vec<u64>> = rec
                .pointer_candidates
                .iter()
                .map(|c| c.pointer.clone())
                .collect();
            assert_ne!(got, want, "positions misread as dataset indices");
        }
    }
}

/// Per-query pools: the original reader has no notion of them (it reads
/// `pointer`, which here holds pool positions); a reader aware of the layout
/// takes `pointer_global`, and `candidate_pool_ids[pointer]` must agree.
#[test]
fn per_query_pool_outputs_carry_pool_and_global_indices() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_outputs(
        dir.path(),
        Case::PerQuery,
        &shuffled_ids(),
        true,
        false,
        &json!({}),
    );
    let data: Value =
        serde_json::from_str(&fs::read_to_string(config.json.unwrap()).unwrap()).unwrap();
    let cache = sampler_cache();
    for (key, qd) in data.as_object().unwrap() {
        let Ok(q) = key.parse::<u64>() else { continue };
        let pool: Vec<u64> = serde_json::from_value(qd["candidate_pool_ids"].clone()).unwrap();
        assert_eq!(pool, cache[&q]);
        for (k, c) in qd["pointer_candidates"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            assert!(c.get("pointer_pos").is_none());
            let pos: Vec<u64> = serde_json::from_value(c["pointer"].clone()).unwrap();
            let global: Vec<u64> = serde_json::from_value(c["pointer_global"].clone()).unwrap();
            assert_eq!(pos, positions(q, k as u64));
            let via_pool: Vec<u64> = pos.iter().map(|&p| pool[p as usize]).collect();
            assert_eq!(global, via_pool, "query {q} candidate {k}");
        }
    }
}

#[test]
fn outputs_are_byte_identical_whatever_the_arrival_order() {
    let meta = json!({"n": 40});
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ca = write_outputs(a.path(), Case::PerQuery, &shuffled_ids(), true, true, &meta);
    let ascending: Vec<u64> = (0..40).collect();
    let cb = write_outputs(b.path(), Case::PerQuery, &ascending, true, true, &meta);
    assert_eq!(
        fs::read(ca.json.unwrap()).unwrap(),
        fs::read(cb.json.unwrap()).unwrap()
    );
    assert_eq!(
        fs::read(ca.parquet.unwrap()).unwrap(),
        fs::read(cb.parquet.unwrap()).unwrap()
    );
}

#[test]
fn parquet_is_zstd_with_page_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_outputs(
        dir.path(),
        Case::SharedIdentity,
        &shuffled_ids(),
        true,
        false,
        &json!({}),
    );
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(fs::File::open(config.parquet.unwrap()).unwrap())
            .unwrap();
    let md = builder.metadata();
    assert_eq!(md.num_row_groups(), 4, "180 rows in row groups of 50");
    for rg in md.row_groups() {
        for col in rg.columns() {
            assert!(
                matches!(col.compression(), Compression::ZSTD(_)),
                "{}",
                col.column_path()
            );
            assert!(col.statistics().is_some(), "{}", col.column_path());
            assert!(
                col.column_index_offset().is_some(),
                "page index for {}",
                col.column_path()
            );
        }
    }
}

#[test]
fn a_failing_write_leaves_no_output_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutputConfig::for_formats(
        &dir.path().join("out.json"),
        &[OutputFormat::Json, OutputFormat::Parquet],
    );
    // A VQA record into outputs opened without VQA columns is refused (the
    // Parquet rows are encoded on the writer's own thread: the error comes
    // at the latest when the outputs are sealed) ...
    let mut writer = OutputWriter::create(&config).unwrap();
    writer
        .write(0, &make_record(Case::SharedIdentity, 0, false, false))
        .unwrap();
    let _ = writer.write(1, &make_record(Case::SharedIdentity, 1, true, false));
    let err = writer.finish(&json!({})).unwrap_err().to_string();
    assert!(
        err.contains("query 1, candidate 0") && err.contains("out.parquet"),
        "{err}"
    );
    // ... and so is a per-query record into shared-pool outputs.
    let mut writer = OutputWriter::create(&config).unwrap();
    let _ = writer.write(2, &make_record(Case::PerQuery, 2, false, false));
    assert!(writer.finish(&json!({})).is_err());
    // A caller that gives up drops the writer without finishing.
    let mut writer = OutputWriter::create(&config).unwrap();
    writer
        .write(0, &make_record(Case::SharedIdentity, 0, false, false))
        .unwrap();
    drop(writer);
    assert!(!dir.path().join("out.json").exists());
    assert!(!dir.path().join("out.parquet").exists());
    no_temp_files(dir.path());
}

#[test]
fn shared_subset_without_pool_list_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink =
        ParquetSink::create(dir.path().join("x.parquet"), ParquetOptions::default()).unwrap();
    let err = sink
        .write_record(0, &make_record(Case::SharedSubset, 0, false, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no pointer_pos"), "{err}");
    let dup = ParquetOptions {
        shared_pool: Some(vec![1, 2, 1]),
        ..Default::default()
    };
    assert!(ParquetSink::create(dir.path().join("y.parquet"), dup).is_err());
}

#[test]
fn format_list_and_paths() {
    let c = OutputConfig::for_formats(
        Path::new("/o/rl.json"),
        &[OutputFormat::Json, OutputFormat::Parquet],
    );
    assert_eq!(c.json.as_deref(), Some(Path::new("/o/rl.json")));
    assert_eq!(c.parquet.as_deref(), Some(Path::new("/o/rl.parquet")));
    let c = OutputConfig::for_formats(Path::new("/o/rl"), &[OutputFormat::Parquet]);
    assert_eq!(c.json, None);
    assert_eq!(c.parquet.as_deref(), Some(Path::new("/o/rl.parquet")));
}

#[test]
fn meta_must_be_an_object() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutputConfig::for_formats(&dir.path().join("m.json"), &[OutputFormat::Json]);
    let w = OutputWriter::create(&config).unwrap();
    let err = w.finish(&json!([1])).unwrap_err().to_string();
    assert!(err.contains("_meta must be a JSON object"), "{err}");
    assert!(!dir.path().join("m.json").exists());
    no_temp_files(dir.path());
}

#[test]
fn record_key_must_be_the_query_id() {
    let dir = tempfile::tempdir().unwrap();
    let rec = make_record(Case::SharedIdentity, 4, false, false);
    let mut json = JsonSink::create(dir.path().join("k.json"), JsonOptions::default()).unwrap();
    let err = json.write_record(5, &rec).unwrap_err().to_string();
    assert!(
        err.contains("record key 5 differs from its query.query_id 4"),
        "{err}"
    );
    let mut pq =
        ParquetSink::create(dir.path().join("k.parquet"), ParquetOptions::default()).unwrap();
    assert!(pq.write_record(5, &rec).is_err());
    pq.write_record(4, &rec).unwrap();
}

#[test]
fn parquet_visitor_streams_and_stops_on_callback_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_outputs(
        dir.path(),
        Case::PerQuery,
        &shuffled_ids(),
        false,
        false,
        &json!({"k": 1}),
    );
    let path = config.parquet.unwrap();
    let mut seen = 0usize;
    let meta = visit_rl_parquet(&path, |row| {
        assert_eq!(row.candidate_pool_ids.as_ref().map(Vec::len), Some(64));
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(meta, Some(json!({"k": 1})));
    assert_eq!(
        seen,
        (0..40u64).map(|q| (3 + q % 4) as usize).sum::<usize>()
    );
    let mut calls = 0;
    let err = visit_rl_parquet(&path, |_| {
        calls += 1;
        Err(SinkError::invalid(Path::new("cb"), "stop"))
    })
    .unwrap_err();
    assert_eq!(calls, 1);
    assert!(err.to_string().contains("stop"));
}

/// Throughput check (run with `--ignored`): 20,000 queries x 12 candidates,
/// pushed out of order, written as JSON + Parquet.
#[test]
#[ignore]
fn throughput_20k_queries() {
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    let template = make_record(Case::SharedIdentity, 0, true, false);
    let t0 = std::time::Instant::now();
    let mut sorted = BTreeMap::new();
    for k in 0..n {
        let q = (k * 7919) % n;
        let mut rec = template.clone();
        rec.query.query_id = q;
        rec.pointer_candidates = (0..12)
            .map(|j| template.pointer_candidates[j % 3].clone())
            .collect();
        sorted.insert(q, rec);
    }
    let t1 = t0.elapsed();
    let mut config = OutputConfig::for_formats(
        &dir.path().join("big.json"),
        &[OutputFormat::Json, OutputFormat::Parquet],
    );
    config.parquet_options.with_vqa = true;
    let mut w = OutputWriter::create(&config).unwrap();
    for (q, r) in &sorted {
        w.write(*q, r).unwrap();
    }
    w.finish(&json!({})).unwrap();
    let t2 = t0.elapsed();
    let js = fs::metadata(config.json.unwrap()).unwrap().len();
    let pq = fs::metadata(config.parquet.unwrap()).unwrap().len();
    eprintln!("spill {t1:?}, total {t2:?}, json {js} bytes, parquet {pq} bytes");
}

mod parts;

/// Writes queries `ids` (ascending) in segments of `n` queries with both
/// sinks, copying the segments listed in `copy` from `from` (the ranges a
/// previous call returned). Returns, per segment, (segment, JSON byte
/// range, first row group, row-group count, first and last query).
#[allow(clippy::type_complexity)]
fn write_segmented(
    dir: &Path,
    name: &str,
    records: &BTreeMap<u64, RlRecord>,
    n: u64,
    copy: &[u64],
    from: Option<(&Path, &[(u64, (u64, u64), usize, usize, u64, u64)])>,
) -> (
    PathBuf,
    PathBuf,
    Vec<(u64, (u64, u64), usize, usize, u64, u64)>,
) {
    let json_path = dir.join(format!("{name}.json"));
    let pq_path = dir.join(format!("{name}.parquet"));
    let mut opts = options(Case::SharedIdentity, true, true);
    opts.segment_queries = n;
    opts.row_group_rows = 20;
    let mut json = JsonSink::create(&json_path, JsonOptions::default()).unwrap();
    let mut pq = ParquetSink::create(&pq_path, opts).unwrap();
    let src = from.map(|(p, ranges)| {
        (
            fs::File::open(p.with_extension("json")).unwrap(),
            ParquetSource::open(p.with_extension("parquet")).unwrap(),
            ranges,
        )
    });
    let mut out = Vec::new();
    let mut by_segment: BTreeMap<u64, Vec<(&u64, &RlRecord)>> = BTreeMap::new();
    for (q, r) in records {
        by_segment
            .entry(segment_of(*q, n))
            .or_default()
            .push((q, r));
    }
    for (seg, recs) in by_segment {
        let first_q = *recs[0].0;
        let last_q = *recs[recs.len() - 1].0;
        if copy.contains(&seg) {
            let (file, source, ranges) = src.as_ref().unwrap();
            let &(_, (start, end), rg, count, f, l) = ranges.iter().find(|r| r.0 == seg).unwrap();
            assert_eq!(
                (f, l),
                (first_q, last_q),
                "copied segment {seg} has other queries"
            );
            let mut bytes = vec![0u8; (end - start) as usize];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, start).unwrap();
            let range = json.append_entries(first_q, last_q, &bytes).unwrap();
            let rg0 = pq.row_groups_written();
            pq.copy_row_groups(source, rg, count, first_q, last_q)
                .unwrap();
            out.push((seg, (range.start, range.end), rg0, count, first_q, last_q));
        } else {
            let rg0 = pq.row_groups_written();
            let mut start = None;
            for (q, r) in &recs {
                json.write_record(**q, r).unwrap();
                start.get_or_insert(json.last_entry_start());
                pq.write_record(**q, r).unwrap();
            }
            pq.cut_row_group().unwrap();
            let count = pq.row_groups_written() - rg0;
            out.push((
                seg,
                (start.unwrap(), json.bytes_written()),
                rg0,
                count,
                first_q,
                last_q,
            ));
        }
    }
    let meta = json!({"format": "leverflow"});
    json.finish(&meta).unwrap();
    pq.finish(&meta).unwrap();
    (json_path, pq_path, out)
}

#[test]
fn copied_segments_give_the_same_bytes_as_writing_everything() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |q: u64| make_record(Case::SharedIdentity, q, true, true);
    // The previous outputs: queries 0..30.
    let old: BTreeMap<u64, RlRecord> = (0..30).map(|q| (q, rec(q))).collect();
    let (old_json, _, old_ranges) = write_segmented(dir.path(), "old", &old, 8, &[], None);
    // Row groups never span segments; the row cap still splits them.
    let src = ParquetSource::open(dir.path().join("old.parquet")).unwrap();
    assert!(
        src.num_row_groups() > old_ranges.len(),
        "the 20-row cap splits segments"
    );
    // This run: query 13 changed, 30..40 added, 5 removed.
    let mut new: BTreeMap<u64, RlRecord> =
        (0..40).filter(|&q| q != 5).map(|q| (q, rec(q))).collect();
    new.get_mut(&13).unwrap().query.question = Some("changed".into());
    let (scratch_json, scratch_pq, _) = write_segmented(dir.path(), "scratch", &new, 8, &[], None);
    // Segment 2 (16..24) is unchanged: copy it; 0 lost query 5, 1 changed,
    // 3 and 4 have new queries: write them.
    let (json, pq, ranges) = write_segmented(
        dir.path(),
        "rerun",
        &new,
        8,
        &[2],
        Some((&old_json, &old_ranges)),
    );
    assert_eq!(fs::read(&json).unwrap(), fs::read(&scratch_json).unwrap());
    assert_eq!(fs::read(&pq).unwrap(), fs::read(&scratch_pq).unwrap());
    // And a copy of a copy: every segment from the rerun's outputs.
    let all: Vec<u64> = ranges.iter().map(|r| r.0).collect();
    let (json2, pq2, _) =
        write_segmented(dir.path(), "again", &new, 8, &all, Some((&json, &ranges)));
    assert_eq!(fs::read(&json2).unwrap(), fs::read(&scratch_json).unwrap());
    assert_eq!(fs::read(&pq2).unwrap(), fs::read(&scratch_pq).unwrap());
    let (_meta, rows) = read_rl_parquet(&pq2).unwrap();
    assert_eq!(rows_to_records(rows).len(), 39);
}

#[test]
fn copies_that_do_not_follow_or_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |q: u64| make_record(Case::SharedIdentity, q, true, true);
    let old: BTreeMap<u64, RlRecord> = (0..10).map(|q| (q, rec(q))).collect();
    let (old_json, old_pq, _) = write_segmented(dir.path(), "old", &old, 8, &[], None);
    let _ = old_json;
    let src = ParquetSource::open(&old_pq).unwrap();
    let mut opts = options(Case::SharedIdentity, true, true);
    opts.segment_queries = 8;
    let mut pq = ParquetSink::create(dir.path().join("x.parquet"), opts.clone()).unwrap();
    pq.write_record(3, &rec(3)).unwrap();
    let err = pq
        .copy_row_groups(&src, 0, 1, 0, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not follow"), "{err}");
    let err = pq
        .copy_row_groups(&src, 0, 99, 8, 9)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row groups 0..99"), "{err}");
    // Another schema (no prompts) cannot take these row groups.
    opts.with_prompts = false;
    let mut other = ParquetSink::create(dir.path().join("y.parquet"), opts).unwrap();
    let err = other
        .copy_row_groups(&src, 0, 1, 0, 7)
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema differs"), "{err}");
    let mut json = JsonSink::create(dir.path().join("x.json"), JsonOptions::default()).unwrap();
    json.write_record(3, &rec(3)).unwrap();
    let err = json
        .append_entries(2, 2, b"\"2\":{}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not follow"), "{err}");
}
