//! Tests of the dataflow plumbing with test-double stages.

use super::*;
use std::sync::{Arc, Mutex};

type Seen = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Runs a pipeline squaring numbers through two batched stages and collects
/// what the sink saw.
fn run(workers: usize, n: u64, fail_at: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let seen: Seen = Arc::default();
    let seen2 = Arc::clone(&seen);
    let results = execute_threads(workers, move |worker| {
        let errors = ErrorSlot::default();
        let index = worker.index();
        let source = (index == 0).then(|| (0..n).map(Ok));
        let seen = Arc::clone(&seen2);
        let sink: Option<SinkFn> = (index == 0).then(|| {
            Box::new(move |q: u64, bytes: Vec<u8>| {
                seen.lock().map_err(|e| e.to_string())?.push((q, bytes));
                Ok(())
            }) as SinkFn
        });
        let config = DriverConfig {
            source_batch: 7,
            max_inflight: 2,
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
                                if Some(x) == fail_at {
                                    Err(format!("bad record {x}"))
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
        r?;
    }
    let mut out = seen.lock().map_err(|e| e.to_string())?.clone();
    out.sort();
    Ok(out)
}

#[test]
fn every_record_reaches_the_sink_for_any_worker_count() {
    let one = run(1, 100, None).unwrap();
    assert_eq!(one.len(), 100);
    assert_eq!(one[9], (9, b"81".to_vec()));
    for w in [2, 3, 4] {
        assert_eq!(run(w, 100, None).unwrap(), one, "workers = {w}");
    }
}

#[test]
fn a_stage_error_stops_the_run() {
    let err = run(2, 1000, Some(17)).unwrap_err();
    assert!(err.contains("bad record 17"), "{err}");
}
