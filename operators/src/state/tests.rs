//! Tests of the state store: round trips, resume semantics, version and
//! corruption handling.

use super::*;

fn key(n: u8) -> Key {
    [n; 32]
}

fn update(q: u64, k: u8, body: &str) -> QueryUpdate {
    QueryUpdate {
        query_index: q,
        input_key: key(k),
        outcome: StoredOutcome::Record(body.as_bytes().to_vec()),
        candidates: Some((key(100 + k), encode_value(&vec![q, 1, 2]))),
        vqa: vec![(key(200 + k), encode_value(&format!("answer {q}")))],
    }
}

#[test]
fn updates_round_trip_and_records_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store
        .commit_updates(
            &[update(7, 1, "{\"q\":7}"), update(3, 2, "{\"q\":3}")],
            true,
        )
        .unwrap();
    let r = store.reader().unwrap();
    assert!(r.has_record(7, &key(1)).unwrap());
    assert!(!r.has_record(7, &key(2)).unwrap());
    assert!(!r.has_record(8, &key(1)).unwrap());
    assert_eq!(
        r.candidates::<Vec<u64>>(7, &key(101)).unwrap(),
        Some(vec![7, 1, 2])
    );
    assert_eq!(
        r.vqa::<String>(3, &key(202)).unwrap().as_deref(),
        Some("answer 3")
    );
    assert_eq!(r.vqa::<String>(3, &key(9)).unwrap(), None);
    drop(r);
    let mut seen = Vec::new();
    store
        .visit_records(
            &[(3, key(2)), (7, key(1))],
            |q, o| -> Result<(), StateError> {
                seen.push((q, o));
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(seen[0].0, 3);
    assert_eq!(seen[1].1, StoredOutcome::Record(b"{\"q\":7}".to_vec()));
    // A record computed from other inputs is not served as this run's.
    let err = store
        .visit_records(&[(3, key(9))], |_, _| Ok::<(), StateError>(()))
        .unwrap_err();
    assert!(err.to_string().contains("different inputs"), "{err}");
}

#[test]
fn completing_a_run_retracts_removed_queries_and_records_the_inputs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path()).unwrap();
        store
            .commit_updates(
                &[update(1, 1, "a"), update(2, 2, "b"), update(3, 3, "c")],
                false,
            )
            .unwrap();
        store
            .complete_run(&[], &[(1, key(1)), (2, key(2)), (3, key(3))], None)
            .unwrap();
        store
            .complete_run(&[2], &[(1, key(1)), (3, key(4))], Some(b"m"))
            .unwrap();
    }
    // Reopened: the previous inputs persist.
    let store = StateStore::open(dir.path()).unwrap();
    assert_eq!(
        store.previous_inputs().unwrap(),
        vec![(1, key(1)), (3, key(4))]
    );
    assert_eq!(store.output_manifest().unwrap().as_deref(), Some(&b"m"[..]));
    store
        .complete_run(&[], &[(1, key(1)), (3, key(4))], None)
        .unwrap();
    assert_eq!(
        store.output_manifest().unwrap(),
        None,
        "a run without a manifest removes the old one"
    );
    let r = store.reader().unwrap();
    assert!(!r.has_record(2, &key(2)).unwrap());
    let sizes = store.table_sizes().unwrap();
    assert_eq!(sizes["records"], 2);
    assert_eq!(sizes["vqa_answers"], 3, "cache entries are kept");
}

#[test]
fn a_second_opener_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _a = StateStore::open(dir.path()).unwrap();
    let err = StateStore::open(dir.path()).err().unwrap();
    assert!(
        err.to_string().contains("in use by another leverflow run"),
        "{err}"
    );
}

#[test]
fn a_newer_format_version_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path()).unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("format_version", 99u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let err = StateStore::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("format version 99"), "{err}");
    assert!(err.contains("delete the state directory"), "{err}");
    assert!(err.contains(STATE_FILE), "{err}");
}

/// Writes a store as format version 1 wrote it: records without their
/// `record_keys` entries, `format_version` 1.
fn write_version_1_store(dir: &Path, records: &[QueryUpdate]) {
    let store = StateStore::open_unchecked(dir);
    let txn = store.db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert("format_version", 1u32.to_le_bytes().as_slice())
            .unwrap();
        let mut table = txn.open_table(RECORDS).unwrap();
        for u in records {
            table
                .insert(
                    u.query_index,
                    enc_record(&u.input_key, &u.outcome).as_slice(),
                )
                .unwrap();
        }
    }
    txn.delete_table(RECORD_KEYS).unwrap();
    txn.commit().unwrap();
}

/// Writes a store of an older `version` holding `records` and an input
/// list (the tables of that version).
fn write_old_store(dir: &Path, version: u32, records: &[QueryUpdate]) {
    write_version_1_store(dir, records);
    let store = StateStore::open_unchecked(dir);
    let txn = store.db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert("format_version", version.to_le_bytes().as_slice())
            .unwrap();
        let mut inputs = txn.open_table(INPUTS).unwrap();
        for u in records {
            inputs
                .insert(u.query_index, u.input_key.as_slice())
                .unwrap();
        }
    }
    txn.commit().unwrap();
}

#[test]
fn older_stores_are_migrated_and_their_results_dropped_once() {
    for version in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        write_old_store(dir.path(), version, &[update(4, 1, "a"), update(9, 2, "b")]);
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.migrated_from(), Some(version));
        // Their keys cannot match this version's: the results are gone ...
        let r = store.reader().unwrap();
        assert!(!r.has_record(4, &key(1)).unwrap());
        assert!(!r.has_record(9, &key(2)).unwrap());
        drop(r);
        // ... the previous run's input list stays (queries count as changed).
        assert_eq!(store.previous_inputs().unwrap().len(), 2);
        let txn = store.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let v = meta
            .get("format_version")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        assert_eq!(v, STATE_FORMAT_VERSION.to_le_bytes());
        drop((meta, txn, store));
        // Once: the next open finds a current store.
        assert_eq!(StateStore::open(dir.path()).unwrap().migrated_from(), None);
    }
}

#[test]
fn record_keys_follow_rewritten_and_removed_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.commit_updates(&[update(5, 1, "a")], false).unwrap();
    // A later batch recomputes query 5 from other inputs.
    store.commit_updates(&[update(5, 2, "b")], false).unwrap();
    let r = store.reader().unwrap();
    assert!(!r.has_record(5, &key(1)).unwrap());
    assert!(r.has_record(5, &key(2)).unwrap());
    drop(r);
    store.complete_run(&[5], &[], None).unwrap();
    assert!(!store.reader().unwrap().has_record(5, &key(2)).unwrap());
}

#[test]
fn truncated_or_garbage_files_are_reported_with_the_file_and_the_fix() {
    for damage in ["truncate", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StateStore::open(dir.path()).unwrap();
            let many: Vec<QueryUpdate> = (0..2000).map(|q| update(q, 1, "x")).collect();
            store.commit_updates(&many, true).unwrap();
        }
        let path = dir.path().join(STATE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        match damage {
            "truncate" => {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(len / 3).unwrap();
            }
            _ => std::fs::write(&path, vec![0x5a; len as usize]).unwrap(),
        }
        let res = StateStore::open(dir.path()).and_then(|s| {
            s.previous_inputs()?;
            s.visit_records(&[(5, key(1))], |_, _| Ok::<(), StateError>(()))
        });
        let err = res
            .err()
            .unwrap_or_else(|| panic!("{damage}: no error"))
            .to_string();
        assert!(err.contains(STATE_FILE), "{damage}: {err}");
        assert!(
            err.contains("delete the state directory"),
            "{damage}: {err}"
        );
    }
}

#[test]
fn a_corrupt_cache_value_names_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut u = update(1, 1, "a");
    u.vqa = vec![(key(5), vec![0xff, 0xff, 0xff])];
    store.commit_updates(&[u], true).unwrap();
    let r = store.reader().unwrap();
    let err = r.vqa::<String>(1, &key(5)).unwrap_err().to_string();
    assert!(err.contains("table `vqa`"), "{err}");
    assert!(err.contains(&key_hex(&key(5))), "{err}");
}

#[test]
fn updates_survive_the_exchange_encoding() {
    let u = update(42, 3, "{}");
    assert_eq!(QueryUpdate::decode(&u.encode()).unwrap(), u);
    assert!(QueryUpdate::decode(&[1, 2]).is_err());
}

#[test]
fn remembered_file_digests_survive_reopening_and_serve_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.bin");
    std::fs::write(&input, b"beam data").unwrap();
    // Only a settled file's digest is remembered.
    std::thread::sleep(digests::SETTLE + std::time::Duration::from_millis(50));
    let state = dir.path().join("state");
    {
        let store = StateStore::open(&state).unwrap();
        let first = store.file_digests().unwrap();
        let sha = first.sha256(&input).unwrap();
        assert_eq!(first.served(), 0);
        store.remember_file_digests(&first).unwrap();
        // Nothing new: no transaction, no change.
        store
            .remember_file_digests(&FileDigests::default())
            .unwrap();
        assert_eq!(sha.len(), 64);
    }
    let store = StateStore::open(&state).unwrap();
    let next = store.file_digests().unwrap();
    let sha = next.sha256(&input).unwrap();
    assert_eq!(next.served(), 1);
    assert_eq!(sha, crate::tensor_io::file_sha256(&input).unwrap());
    assert!(next.fresh().is_empty());
    // An edited input is read again.
    std::fs::write(&input, b"beam dat!").unwrap();
    let after = store.file_digests().unwrap();
    assert_ne!(after.sha256(&input).unwrap(), sha);
    assert_eq!(after.served(), 0);
}

/// Set in the child process of
/// [`only_the_opening_call_silences_redb_panics`].
const PANIC_CHILD_ENV: &str = "LEVERFLOW_TEST_REDB_PANIC_CHILD";

#[test]
fn only_the_opening_call_silences_redb_panics() {
    if std::env::var_os(PANIC_CHILD_ENV).is_some() {
        // The child: a store damaged so that redb panics while opening it
        // (silenced, reported as an error), then two panics elsewhere
        // (printed by the default hook as usual).
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StateStore::open(dir.path()).unwrap();
            let many: Vec<QueryUpdate> = (0..2000).map(|q| update(q, 1, "x")).collect();
            store.commit_updates(&many, true).unwrap();
        }
        let path = dir.path().join(STATE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let err = StateStore::open(dir.path()).err().expect("a damaged store");
        eprintln!("CHILD: refused: {err}");
        let other = std::thread::spawn(|| panic!("CHILD: a panic on another thread"));
        assert!(other.join().is_err());
        let later = std::panic::catch_unwind(|| panic!("CHILD: a later panic on this thread"));
        assert!(later.is_err());
        return;
    }
    // The panic hook is the process's: watch a child process's stderr.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "state::tests::only_the_opening_call_silences_redb_panics",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PANIC_CHILD_ENV, "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CHILD: refused: ") && stderr.contains("damaged file ("),
        "redb panicked while opening the damaged store, reported as an error: {stderr}"
    );
    assert!(
        stderr.contains("panicked at") && stderr.contains("CHILD: a panic on another thread"),
        "{stderr}"
    );
    assert!(
        stderr.contains("CHILD: a later panic on this thread"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("/redb-"),
        "redb's own panic is not printed: {stderr}"
    );
}
