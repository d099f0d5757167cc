//! Tests of the dataflow plumbing with test-double stages.

use super::*;
use std::sync::{Arc, Mutex};

type Seen = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Runs a pipeline squaring numbers through two batched stages and collects
/// what the sink saw. The square stage fails on record `fail_at` (an error)
/// and panics on record `panic_at`.
fn run(
    workers: usize,
    n: u64,
    fail_at: Option<u64>,
    panic_at: Option<u64>,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let seen: Seen = Arc::default();
    let seen2 = Arc::clone(&seen);
    let results = execute_threads(workers, move |worker| {
        let errors = ErrorSlot::default();
        let index = worker.index();
        let source = (index == 0).then(|| (0..n).map(Ok));
        let seen = Arc::clone(&seen2);
        let sink: Option<SinkFn> = (index == 0).then(|| {
            Box::new(move |q: u64, bytes: Vec<u8>| {
                seen.lock()
                    .map_err(|e| StageError::new("sink", Some(q), e.to_string()))?
                    .push((q, bytes));
                Ok(())
            }) as SinkFn
        });
        // Cheap work: the source batches grow from 7 up to 64 records.
        let config = DriverConfig {
            source_batch: 7,
            max_source_batch: 64,
            max_inflight: 2,
            sink_worker: 0,
        };
        run_worker(
            worker,
            &config,
            source,
            |x: &u64| *x,
            |stream, _probe| {
                let squared = batched(
                    stream,
                    "square",
                    5,
                    Box::new(move |xs: Vec<u64>| {
                        xs.into_iter()
                            .map(|x| {
                                if Some(x) == panic_at {
                                    panic!("the square stage exploded on record {x}");
                                }
                                if Some(x) == fail_at {
                                    Err(StageError::new(
                                        "square",
                                        Some(x),
                                        format!("bad record {x}"),
                                    ))
                                } else {
                                    Ok((x, x * x))
                                }
                            })
                            .collect()
                    }),
                    errors.clone(),
                );
                batched(
                    squared,
                    "serialise",
                    3,
                    Box::new(|xs: Vec<(u64, u64)>| {
                        Ok(xs
                            .into_iter()
                            .map(|(q, v)| (q, v.to_string().into_bytes()))
                            .collect())
                    }),
                    errors.clone(),
                )
            },
            sink,
            errors.clone(),
        )
    })?;
    for r in results {
        r.map_err(|e| e.to_string())?;
    }
    let mut out = seen.lock().map_err(|e| e.to_string())?.clone();
    out.sort();
    Ok(out)
}

#[test]
fn every_record_reaches_the_sink_for_any_worker_count() {
    let one = run(1, 100, None, None).unwrap();
    assert_eq!(one.len(), 100);
    assert_eq!(one[9], (9, b"81".to_vec()));
    for w in [2, 3, 4] {
        assert_eq!(run(w, 100, None, None).unwrap(), one, "workers = {w}");
    }
}

#[test]
fn a_stage_error_stops_the_run() {
    let err = run(2, 1000, Some(17), None).unwrap_err();
    assert!(err.contains("bad record 17"), "{err}");
    // The error keeps its stage, query and typed source.
    let slot = ErrorSlot::default();
    slot.set(StageError::new(
        "vqa",
        Some(3),
        std::io::Error::other("disk"),
    ));
    slot.set(StageError::new("reward", Some(4), "later"));
    let e = slot.get().unwrap();
    assert_eq!((e.stage, e.query), ("vqa", Some(3)));
    assert!(e.downcast_ref::<std::io::Error>().is_some());
}

#[test]
fn a_panicking_stage_is_reported_with_its_message_and_location() {
    for workers in [1, 2] {
        let err = run(workers, 100, None, Some(17)).unwrap_err();
        // Record 17 goes to worker 17 % workers.
        let expected = format!(
            "timely worker {} failed: the square stage exploded on record 17 (at ",
            17 % workers
        );
        assert!(err.starts_with(&expected), "{workers} workers: {err}");
        assert!(
            err.contains("dataflow/tests.rs:"),
            "{workers} workers: {err}"
        );
    }
}

/// Runs the incremental front on `previous` / `current` (query, key byte)
/// with small source batches, and returns the final classification and the
/// queries that went on to be computed.
///
/// The vqa double answers later, on threads of its own ([`Delayed`]), as a
/// server backend does.
fn classify(
    workers: usize,
    previous: Vec<(u64, u8)>,
    current: Vec<(u64, u8)>,
    stored: Vec<(u64, u8)>,
) -> (Vec<(u64, InputChange)>, Vec<u64>) {
    use std::collections::HashMap;
    let changes: Arc<Mutex<HashMap<(u64, InputChange), isize>>> = Arc::default();
    let computed: Seen = Arc::default();
    let (c2, s2) = (Arc::clone(&changes), Arc::clone(&computed));
    let results = execute_threads(workers, move |worker| {
        let errors = ErrorSlot::default();
        let index = worker.index();
        let items: Vec<SourceItem<u64>> = previous
            .iter()
            .map(|&(q, k)| SourceItem::Previous(q, [k; 32]))
            .chain(current.iter().map(|&(q, _)| SourceItem::Current(q)))
            .collect();
        let source = (index == 0).then(|| items.into_iter().map(Ok));
        let seen = Arc::clone(&s2);
        let sink: Option<SinkFn> = (index == 0).then(|| {
            Box::new(move |q: u64, bytes: Vec<u8>| {
                seen.lock()
                    .map_err(|e| StageError::new("sink", Some(q), e.to_string()))?
                    .push((q, bytes));
                Ok(())
            }) as SinkFn
        });
        let changes = Arc::clone(&c2);
        let keys: HashMap<u64, u8> = current.iter().copied().collect();
        let stored: HashMap<u64, u8> = stored.iter().copied().collect();
        let e2 = errors.clone();
        run_worker(
            worker,
            &DriverConfig {
                source_batch: 2,
                max_source_batch: 2,
                max_inflight: 2,
                sink_worker: 0,
            },
            source,
            |s: &SourceItem<u64>| s.query_index(|q| *q),
            move |stream, probe| {
                // Test doubles: the plan reads the keys above, the
                // candidates of a query are its index, its answer the
                // square, its score the answer plus one; the reward stage
                // serialises (query, score).
                let stages = Stages {
                    plan: Box::new(move |qs: Vec<u64>| {
                        Ok(qs
                            .into_iter()
                            .map(|q| Planned {
                                work: q,
                                query_index: q,
                                input_key: [keys[&q]; 32],
                                reuse: stored.get(&q) == keys.get(&q),
                            })
                            .collect())
                    }),
                    candidates: Box::new(|qs: Vec<u64>| Ok(qs)),
                    batch: 3,
                    then: Then::Vqa(VqaStages {
                        vqa: Box::new(Delayed::default()),
                        vqa_batch: 2,
                        accuracy: Box::new(|xs: Vec<(u64, u64)>| {
                            Ok(xs.into_iter().map(|(q, a)| (q, a + 1)).collect())
                        }),
                        reward: Box::new(|xs: Vec<(u64, u64)>| {
                            Ok(xs
                                .into_iter()
                                .map(|(q, s)| (q, s.to_string().into_bytes()))
                                .collect())
                        }),
                    }),
                };
                rl_graph(
                    stream,
                    stages,
                    move |q, change, diff| {
                        *changes.lock().unwrap().entry((q, change)).or_insert(0) += diff;
                    },
                    probe,
                    e2,
                )
            },
            sink,
            errors.clone(),
        )
    })
    .unwrap();
    for r in results {
        r.unwrap();
    }
    let mut final_changes: Vec<(u64, InputChange)> = changes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, &d)| d > 0)
        .map(|(k, _)| *k)
        .collect();
    final_changes.sort();
    let mut done: Vec<(u64, Vec<u8>)> = computed.lock().unwrap().clone();
    done.sort();
    for (q, bytes) in &done {
        assert_eq!(
            bytes,
            &(q * q + 1).to_string().into_bytes(),
            "every stage ran on {q}"
        );
    }
    (final_changes, done.into_iter().map(|(q, _)| q).collect())
}

#[test]
fn the_differential_comparison_classifies_every_query() {
    for workers in [1, 3] {
        let previous = vec![(1, 1), (2, 2), (3, 3), (5, 5)];
        let current = vec![(1, 1), (2, 9), (4, 4), (5, 5)];
        // Query 5's record is stored; query 1's is missing (a crash before
        // it was committed), so it is computed again although unchanged.
        let stored = vec![(2, 2), (5, 5)];
        let (changes, computed) = classify(workers, previous, current, stored);
        assert_eq!(
            changes,
            vec![
                (2, InputChange::Changed),
                (3, InputChange::Removed),
                (4, InputChange::Added)
            ],
            "{workers} workers"
        );
        assert_eq!(computed, vec![1, 2, 4], "{workers} workers");
    }
}

#[test]
fn previous_keys_are_interleaved_by_query_index() {
    use super::{interleave_previous, SourceItem};
    let key = |b: u8| [b; 32];
    let previous = vec![(1, key(1)), (2, key(2)), (5, key(5)), (9, key(9))];
    let current: Vec<Result<u64, String>> = vec![Ok(2), Ok(3), Ok(7)];
    let got: Vec<String> = interleave_previous(previous.clone(), current, |w: &u64| *w)
        .map(|r| match r.unwrap() {
            SourceItem::Previous(q, _) => format!("p{q}"),
            SourceItem::Current(w) => format!("c{w}"),
        })
        .collect();
    assert_eq!(got, ["p1", "p2", "c2", "c3", "p5", "c7", "p9"]);
    // Out-of-order current items: every item still comes exactly once.
    let current: Vec<Result<u64, String>> = vec![Ok(9), Ok(0), Err("bad".into()), Ok(1)];
    let got: Vec<String> = interleave_previous(previous, current, |w: &u64| *w)
        .map(|r| match r {
            Ok(SourceItem::Previous(q, _)) => format!("p{q}"),
            Ok(SourceItem::Current(w)) => format!("c{w}"),
            Err(e) => e,
        })
        .collect();
    assert_eq!(got, ["p1", "p2", "p5", "p9", "c9", "c0", "bad", "c1"]);
}

/// A finished batch of [`Delayed`].
type Squared = BatchResult<(u64, u64)>;

/// A [`PendingStage`] test double that answers each batch (query → square)
/// on a thread of its own after a delay that shrinks with each batch, so
/// batches finish out of order, as a server's answers do.
#[derive(Default)]
struct Delayed {
    started: u64,
    done: Arc<Mutex<Vec<Squared>>>,
}

impl PendingStage<u64, (u64, u64)> for Delayed {
    fn start(&mut self, id: u64, batch: Vec<u64>, wake: Waker) -> Result<(), StageError> {
        self.started += 1;
        let delay = std::time::Duration::from_millis(20u64.saturating_sub(self.started * 3));
        let done = Arc::clone(&self.done);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let out = batch.into_iter().map(|q| (q, q * q)).collect();
            done.lock().unwrap().push((id, Ok(out)));
            wake();
        });
        Ok(())
    }

    fn finished(&mut self) -> Vec<BatchResult<(u64, u64)>> {
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}
