//! Part-file datasets and `merge`: several "processes" of parts (one with no
//! rows), interleaved query indices, duplicates, bad datasets, and byte
//! equality with what [`JsonSink`] writes for the same records.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::super::merge::{merge, merged_meta, resolve_inputs, InputMeta, MergeOutputs};
use super::super::parts::*;
use super::*;

fn part_options(case: Case, with_vqa: bool, rows_per_part: u64) -> PartOptions {
    PartOptions {
        parquet: options(case, with_vqa, false),
        rows_per_part,
    }
}

/// Query ids of "process" `p` of 3: interleaved (q % 2 == p), process 2
/// gets none (its workers write empty parts).
fn owned(p: u64, n: u64) -> Vec<u64> {
    (0..n).filter(|q| q % 2 == p).collect()
}

/// Writes a dataset of 3 processes × 2 workers; worker w of process p gets
/// every other query of `owned(p)`.  Returns the part infos.
fn write_dataset(dir: &Path, case: Case, with_vqa: bool, n: u64) -> Vec<PartInfo> {
    prepare_dataset_dir(dir).unwrap();
    let mut parts = Vec::new();
    for p in 0..3usize {
        let ids = owned(p as u64, n);
        for w in 0..2usize {
            let mut writer =
                PartWriter::create(dir, p, w, part_options(case, with_vqa, 20)).unwrap();
            for q in ids.iter().copied().skip(w).step_by(2) {
                writer
                    .write_record(q, &make_record(case, q, with_vqa, false))
                    .unwrap();
            }
            parts.extend(writer.finish().unwrap());
        }
    }
    parts
}

/// The JSON `JsonSink` writes for queries `ids` with `meta`.
fn reference_json(dir: &Path, case: Case, with_vqa: bool, ids: &[u64], meta: &Value) -> Vec<u8> {
    let path = dir.join("reference.json");
    let mut sink = JsonSink::create(&path, JsonOptions::default()).unwrap();
    for &q in ids {
        sink.write_record(q, &make_record(case, q, with_vqa, false))
            .unwrap();
    }
    sink.finish(meta).unwrap();
    fs::read(&path).unwrap()
}

fn merge_to(
    dir: &Path,
    inputs: &[PathBuf],
    parquet: bool,
) -> (PathBuf, Result<MergeSummary, SinkError>) {
    let out = dir.join("merged.json");
    let result = resolve_inputs(inputs).and_then(|i| {
        merge(
            &i,
            &MergeOutputs {
                json: Some(out.clone()),
                parquet: parquet.then(|| dir.join("merged.parquet")),
                batch_rows: 5,
                ..Default::default()
            },
            &mut |_, _| {},
        )
    });
    (out, result)
}

#[test]
fn part_names_round_trip() {
    assert_eq!(part_file_name(1, 3, 2), "part-00001-00003-000002.parquet");
    assert_eq!(
        parse_part_file_name("part-00001-00003-000002.parquet"),
        Some((1, 3, 2))
    );
    assert_eq!(
        parse_part_file_name(&part_file_name(123_456, 7, 1_234_567)),
        Some((123_456, 7, 1_234_567))
    );
    for bad in [
        "part-1-2.parquet",
        "part-1-2-3-4.parquet",
        "part-a-2-3.parquet",
        ".part-00001-00003-000002.parquet.tmp-1",
        ".part-00001-00003-000002.parquet.0123456789abcdef.tmp",
        "_manifest.json",
        "part--2-3.parquet",
    ] {
        assert_eq!(parse_part_file_name(bad), None, "{bad}");
    }
}

#[test]
fn dataset_of_three_processes_merges_to_the_json_sink_bytes() {
    for case in [Case::SharedIdentity, Case::SharedSubset, Case::PerQuery] {
        let tmp = tempfile::tempdir().unwrap();
        let ds = tmp.path().join("ds");
        let n = 40;
        let parts = write_dataset(&ds, case, true, n);
        // Rolling: 20 rows per part at most (records hold 3..=6 rows).
        assert!(parts.iter().all(|p| p.rows < 20 + 6), "{parts:?}");
        assert!(
            parts
                .iter()
                .filter(|p| p.process == 0 && p.worker == 0)
                .count()
                >= 2
        );
        // Process 2 has no rows: one empty part per worker.
        let empty: Vec<&PartInfo> = parts.iter().filter(|p| p.process == 2).collect();
        assert_eq!(empty.len(), 2);
        assert!(empty
            .iter()
            .all(|p| p.rows == 0 && p.queries == 0 && p.min_query.is_none()));
        // Each part sorted, its info right.
        for p in &parts {
            assert_eq!(&describe_part(&ds, &p.file).unwrap(), p);
        }
        let meta = json!({"tool": "leverflow", "counts": {"queries": n}});
        // No manifest yet: merge refuses the directory.
        let (_, r) = merge_to(tmp.path(), std::slice::from_ref(&ds), false);
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("no manifest") && err.contains("_manifest.json"),
            "{err}"
        );

        let manifest = write_manifest(&ds, &parts, &meta).unwrap();
        assert_eq!(manifest.queries, n);
        assert_eq!(manifest.parts.len(), parts.len());
        assert_eq!(
            manifest.schema,
            schema_to_json(&arrow_schema(case == Case::PerQuery, true, false))
        );
        let text: Value =
            serde_json::from_str(&fs::read_to_string(ds.join(MANIFEST_NAME)).unwrap()).unwrap();
        let keys: Vec<&String> = text.as_object().unwrap().keys().collect();
        assert_eq!(
            keys.last().map(|k| k.as_str()),
            Some("_meta"),
            "_meta written last"
        );
        assert_eq!(read_dataset(&ds).unwrap().manifest, manifest);
        assert_eq!(scan_parts(&ds).unwrap(), manifest.parts);

        let (out, r) = merge_to(tmp.path(), std::slice::from_ref(&ds), true);
        let summary = r.unwrap();
        assert_eq!(summary.queries, n);
        assert_eq!(summary.meta, meta);
        let ids: Vec<u64> = (0..n).collect();
        let want = reference_json(tmp.path(), case, true, &ids, &meta);
        assert_eq!(
            fs::read(&out).unwrap(),
            want,
            "{case:?}: byte-identical JSON"
        );
        // The merged Parquet holds the same rows as a single-file output.
        let (pmeta, rows) = read_rl_parquet(tmp.path().join("merged.parquet")).unwrap();
        assert_eq!(pmeta, Some(meta.clone()));
        let records = rows_to_records(rows);
        assert_eq!(records.len() as u64, n);
        for (q, r) in records {
            assert_eq!(r, make_record(case, q, true, false), "{case:?}");
        }
        no_temp_files(tmp.path());
        no_temp_files(&ds);
    }
}

#[test]
fn overlapping_sorted_runs_with_roll_merge_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let mut w =
        PartWriter::create(&ds, 0, 0, part_options(Case::SharedIdentity, false, 1000)).unwrap();
    for q in [5u64, 9, 30] {
        w.write_record(q, &make_record(Case::SharedIdentity, q, false, false))
            .unwrap();
    }
    // Out of order within a part: refused, naming the file.
    let err = w
        .write_record(2, &make_record(Case::SharedIdentity, 2, false, false))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SinkError::OutOfOrder {
                index: 2,
                previous: 30,
                ..
            }
        ),
        "{err}"
    );
    w.roll().unwrap();
    for q in [1u64, 7, 31] {
        w.write_record(q, &make_record(Case::SharedIdentity, q, false, false))
            .unwrap();
    }
    let parts = w.finish().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[1].min_query, parts[1].max_query),
        (Some(1), Some(31))
    );
    write_manifest(&ds, &parts, &json!({})).unwrap();
    let (out, r) = merge_to(tmp.path(), &[ds], false);
    r.unwrap();
    let want = reference_json(
        tmp.path(),
        Case::SharedIdentity,
        false,
        &[1, 5, 7, 9, 30, 31],
        &json!({}),
    );
    assert_eq!(fs::read(out).unwrap(), want);
}

#[test]
fn duplicate_query_across_parts_names_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let mut parts = Vec::new();
    for (p, ids) in [(0usize, vec![1u64, 4, 8]), (1, vec![2, 4, 9])] {
        let mut w =
            PartWriter::create(&ds, p, 0, part_options(Case::SharedIdentity, false, 1000)).unwrap();
        for q in ids {
            w.write_record(q, &make_record(Case::SharedIdentity, q, false, false))
                .unwrap();
        }
        parts.extend(w.finish().unwrap());
    }
    write_manifest(&ds, &parts, &json!({})).unwrap();
    let (out, r) = merge_to(tmp.path(), &[ds], true);
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("query index 4")
            && err.contains("part-00000-00000-000000.parquet")
            && err.contains("part-00001-00000-000000.parquet"),
        "{err}"
    );
    assert!(!out.exists(), "no half-written output");
    assert!(!tmp.path().join("merged.parquet").exists());
    no_temp_files(tmp.path());
}

#[test]
fn bad_datasets_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let parts = write_dataset(&ds, Case::SharedIdentity, false, 12);
    write_manifest(&ds, &parts, &json!({"a": 1})).unwrap();
    let victim = ds.join(&parts[0].file);

    // Row count mismatch in the manifest.
    let manifest_path = ds.join(MANIFEST_NAME);
    let good = fs::read_to_string(&manifest_path).unwrap();
    let mut v: Value = serde_json::from_str(&good).unwrap();
    v["parts"][0]["rows"] = json!(parts[0].rows + 1);
    fs::write(&manifest_path, serde_json::to_string(&v).unwrap()).unwrap();
    let err = read_dataset(&ds).unwrap_err().to_string();
    assert!(
        err.contains(&parts[0].file) && err.contains("manifest lists"),
        "{err}"
    );
    fs::write(&manifest_path, &good).unwrap();

    // Corrupt part file.
    let bytes = fs::read(&victim).unwrap();
    fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_dataset(&ds).unwrap_err().to_string();
    assert!(err.contains(&parts[0].file), "{err}");

    // Missing part file.
    fs::remove_file(&victim).unwrap();
    let err = read_dataset(&ds).unwrap_err().to_string();
    assert!(
        err.contains(&parts[0].file) && err.contains("missing"),
        "{err}"
    );
    let (_, r) = merge_to(tmp.path(), std::slice::from_ref(&ds), false);
    assert!(r.unwrap_err().to_string().contains("missing"));
    // write_manifest checks too.
    let err = write_manifest(&ds, &parts, &json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&parts[0].file) && err.contains("missing"),
        "{err}"
    );
    fs::write(&victim, &bytes).unwrap();

    // Unknown version, wrong format, non-object meta.
    v = serde_json::from_str(&good).unwrap();
    v["version"] = json!(99);
    fs::write(&manifest_path, serde_json::to_string(&v).unwrap()).unwrap();
    assert!(read_dataset(&ds)
        .unwrap_err()
        .to_string()
        .contains("version 99"));
    v["version"] = json!(MANIFEST_VERSION);
    v["format"] = json!("other");
    fs::write(&manifest_path, serde_json::to_string(&v).unwrap()).unwrap();
    assert!(read_dataset(&ds).unwrap_err().to_string().contains("other"));
    fs::write(&manifest_path, "{").unwrap();
    assert!(read_dataset(&ds)
        .unwrap_err()
        .to_string()
        .contains(MANIFEST_NAME));
    assert!(write_manifest(&ds, &parts, &json!([1])).is_err());
    assert!(write_manifest(&ds, &[], &json!({})).is_err());

    // A stale manifest is withdrawn before a new run; a new writer removes
    // its own old parts.
    write_manifest(&ds, &parts, &json!({})).unwrap();
    prepare_dataset_dir(&ds).unwrap();
    assert!(!manifest_path.exists());
    let before = scan_parts(&ds).unwrap().len();
    let w = PartWriter::create(&ds, 0, 0, part_options(Case::SharedIdentity, false, 20)).unwrap();
    let mine = parts
        .iter()
        .filter(|p| p.process == 0 && p.worker == 0)
        .count();
    assert_eq!(scan_parts(&ds).unwrap().len(), before - mine);
    drop(w);
}

#[test]
fn empty_records_and_half_written_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let mut w =
        PartWriter::create(&ds, 0, 1, part_options(Case::SharedIdentity, false, 1000)).unwrap();
    let mut r = make_record(Case::SharedIdentity, 3, false, false);
    r.pointer_candidates.clear();
    let err = w.write_record(3, &r).unwrap_err().to_string();
    assert!(err.contains("no candidates"), "{err}");
    w.write_record(4, &make_record(Case::SharedIdentity, 4, false, false))
        .unwrap();
    drop(w); // dies before finish: nothing visible, no temp file
    assert!(scan_parts(&ds).unwrap().is_empty());
    no_temp_files(&ds);
}

#[test]
fn manual_shards_merge_without_manifest() {
    // The original's --start_idx/--end_idx sharding: single-file outputs.
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    fs::create_dir(&shards).unwrap();
    let mut metas = Vec::new();
    for (s, ids) in [(0u64, vec![0u64, 1, 2]), (1, vec![]), (2, vec![3, 5, 6, 7])] {
        let path = shards.join(format!("rl_{s}.parquet"));
        let mut sink =
            ParquetSink::create(&path, options(Case::SharedSubset, true, false)).unwrap();
        for q in ids {
            sink.write_record(q, &make_record(Case::SharedSubset, q, true, false))
                .unwrap();
        }
        let meta = json!({"tool": "leverflow", "args": {"start_idx": s}});
        sink.finish(&meta).unwrap();
        metas.push(InputMeta {
            input: path,
            meta: Some(meta),
        });
    }
    let (out, r) = merge_to(tmp.path(), std::slice::from_ref(&shards), false);
    let summary = r.unwrap();
    assert_eq!(summary.queries, 7);
    let meta = merged_meta(&metas);
    assert_eq!(summary.meta, meta);
    assert_eq!(
        meta["args"]["start_idx"], 0,
        "first input's meta is the base"
    );
    assert_eq!(meta["merged_from"].as_array().unwrap().len(), 3);
    let want = reference_json(
        tmp.path(),
        Case::SharedSubset,
        true,
        &[0, 1, 2, 3, 5, 6, 7],
        &meta,
    );
    assert_eq!(fs::read(&out).unwrap(), want);

    // The same files named one by one give the same bytes.
    let files: Vec<PathBuf> = metas.iter().map(|m| m.input.clone()).collect();
    let (out2, r) = merge_to(&tmp.path().join("shards"), &files, false);
    r.unwrap();
    assert_eq!(fs::read(&out2).unwrap(), want);
    fs::remove_file(&out2).unwrap();

    // A file given twice, and overlapping shards.
    let (_, r) = merge_to(tmp.path(), &[files[0].clone(), shards.clone()], false);
    assert!(r.unwrap_err().to_string().contains("given twice"));
    let extra = tmp.path().join("extra.parquet");
    let mut sink = ParquetSink::create(&extra, options(Case::SharedSubset, true, false)).unwrap();
    sink.write_record(6, &make_record(Case::SharedSubset, 6, true, false))
        .unwrap();
    sink.finish(&json!({})).unwrap();
    let (_, r) = merge_to(tmp.path(), &[shards.clone(), extra], false);
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("query index 6")
            && err.contains("rl_2.parquet")
            && err.contains("extra.parquet"),
        "{err}"
    );

    // Different columns (a `candidates` shard next to a `generate` one).
    let other = tmp.path().join("other.parquet");
    let mut sink = ParquetSink::create(&other, options(Case::SharedSubset, false, false)).unwrap();
    sink.write_record(9, &make_record(Case::SharedSubset, 9, false, false))
        .unwrap();
    sink.finish(&json!({})).unwrap();
    let (_, r) = merge_to(tmp.path(), &[shards, other], false);
    assert!(r.unwrap_err().to_string().contains("columns differ"));
}

#[test]
fn merged_meta_rules() {
    let m = |p: &str, v: Option<Value>| InputMeta {
        input: PathBuf::from(p),
        meta: v,
    };
    assert_eq!(merged_meta(&[]), json!({}));
    assert_eq!(merged_meta(&[m("a", None)]), json!({}));
    assert_eq!(
        merged_meta(&[m("a", Some(json!({"x": 1}))), m("b", Some(json!({"x": 1})))]),
        json!({"x": 1})
    );
    assert_eq!(
        merged_meta(&[
            m("a", Some(json!({"x": 1}))),
            m("b", None),
            m("c", Some(json!({"x": 2})))
        ]),
        json!({"x": 1, "merged_from": [
            {"input": "a", "_meta": {"x": 1}},
            {"input": "b", "_meta": null},
            {"input": "c", "_meta": {"x": 2}},
        ]})
    );
}

/// Bounded memory by design: the merge holds one decoded batch per file,
/// so the buffered rows of every reader stay below `batch_rows` each.
#[test]
fn readers_hold_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.parquet");
    let mut sink = ParquetSink::create(&path, options(Case::SharedIdentity, false, false)).unwrap();
    for q in 0..300u64 {
        sink.write_record(q, &make_record(Case::SharedIdentity, q, false, false))
            .unwrap();
    }
    sink.finish(&json!({})).unwrap();
    let mut reader = ParquetRecordReader::open(&path, 16).unwrap();
    let mut n = 0;
    while let Some(r) = reader.next_record().unwrap() {
        assert_eq!(r.query_index, n);
        assert!(reader.buffered_rows() <= 16, "{}", reader.buffered_rows());
        n += 1;
    }
    assert_eq!(n, 300);
}
