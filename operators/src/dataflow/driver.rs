//! The per-worker driver: builds the graph, feeds the source with
//! back-pressure, and runs the worker until the graph has drained.

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Exchange, Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle, StreamVec};
use timely::worker::Worker;
use timely::ExchangeData;

use super::{ErrorSlot, StageError};

/// How long a worker with nothing to do parks before looking again. A
/// message (data or progress) wakes it at once; parking instead of spinning
/// leaves the cores to the workers and threads that have work, and the
/// bound lets it notice a failed peer process.
const IDLE_PARK: std::time::Duration = std::time::Duration::from_millis(5);

/// A source batch that passed through the graph faster than this grows
/// (see [`DriverConfig::max_source_batch`]); one slower than
/// `4 × FAST_BATCH` shrinks again.
const FAST_BATCH: std::time::Duration = std::time::Duration::from_millis(2);

/// How the source feeds the graph.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Records sent per source batch (one timely time per batch).
    pub source_batch: usize,
    /// The largest source batch. While batches take under 2 ms each (cheap
    /// work, such as a rerun's queries whose stored records are reused),
    /// the batch doubles up to this size, since each timely time costs
    /// progress messages and wake-ups between workers whatever its size;
    /// when batches get slow (real work) it halves back to
    /// `source_batch`. Batch boundaries never change the results.
    pub max_source_batch: usize,
    /// How many source batches may be in flight (not yet through the sink)
    /// before the source waits: bounds memory however large the input is.
    pub max_inflight: u64,
    /// The worker whose sink receives this worker's finished records (in a
    /// multi-process run, each process's first worker).
    pub sink_worker: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            source_batch: 256,
            max_source_batch: 256,
            max_inflight: 4,
            sink_worker: 0,
        }
    }
}

/// Receives each finished record (query index, serialised bytes) on the
/// worker that owns the sink ([`DriverConfig::sink_worker`]).
pub type SinkFn = Box<dyn FnMut(u64, Vec<u8>) -> Result<(), StageError>>;

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerOutcome {
    /// Source records this worker fed into the graph.
    pub fed: u64,
}

/// What a worker returns when another thread of its run panicked (the
/// executor reports that panic instead).
const ANOTHER_FAILED: &str = "stopped: another thread of this run failed";

/// Builds this worker's dataflow and runs it to completion.
///
/// * `source`: the records to feed (only on the worker that reads the input;
///   `None` on the others). Each is routed to the worker `key(record) % peers`.
/// * `build`: the middle of the graph, from routed source records to
///   `(query_index, serialised record)` pairs. It gets the worker's probe,
///   to attach side branches (e.g. the incremental comparison) that must
///   also complete before the worker finishes.
/// * `sink`: called, on the sink worker only, with every finished record.
///
/// Stops feeding as soon as any stage reports an error in `errors`, and
/// returns that error once the graph has drained.  Stops at once when
/// another thread of the run panicked ([`execute_threads`](super::execute_threads),
/// [`execute_cluster`](super::execute_cluster) record those panics).
pub fn run_worker<W, S, F>(
    worker: &mut Worker,
    config: &DriverConfig,
    source: Option<S>,
    key: fn(&W) -> u64,
    build: F,
    sink: Option<SinkFn>,
    errors: ErrorSlot,
) -> Result<WorkerOutcome, std::sync::Arc<StageError>>
where
    W: ExchangeData + Clone,
    S: Iterator<Item = Result<W, StageError>>,
    F: for<'s> FnOnce(
        StreamVec<'s, u64, W>,
        &ProbeHandle<u64>,
    ) -> StreamVec<'s, u64, (u64, Vec<u8>)>,
{
    let mut input: InputHandleVec<u64, W> = InputHandleVec::new();
    let probe = ProbeHandle::new();
    let sink_errors = errors.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        let routed = scope
            .input_from(&mut input)
            .container::<Vec<W>>()
            .exchange(move |w: &W| key(w));
        let finished = build(routed, &probe);
        let mut sink = sink;
        let sink_worker = config.sink_worker;
        finished
            .exchange(move |_: &(u64, Vec<u8>)| sink_worker)
            .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                Pipeline,
                "sink",
                move |_cap, _info| {
                    move |input, _output| {
                        input.for_each(|_cap, data| {
                            for (query_index, bytes) in data.drain(..) {
                                if sink_errors.is_set() {
                                    continue;
                                }
                                match sink.as_mut() {
                                    Some(f) => {
                                        if let Err(e) = f(query_index, bytes) {
                                            sink_errors.set(e);
                                        }
                                    }
                                    None => sink_errors.set(StageError::new(
                                        "sink",
                                        Some(query_index),
                                        "internal error: a record reached a worker without a sink",
                                    )),
                                }
                            }
                        });
                    }
                },
            )
            .probe_with(&probe);
    });

    let mut outcome = WorkerOutcome::default();
    if let Some(records) = source {
        let min_batch = config.source_batch.max(1);
        let max_batch = config.max_source_batch.max(min_batch);
        let mut batch = min_batch;
        let mut batch_started = std::time::Instant::now();
        let mut pending = 0usize;
        for record in records {
            if errors.is_set() {
                break;
            }
            match record {
                Ok(r) => {
                    input.send(r);
                    outcome.fed += 1;
                    pending += 1;
                }
                Err(e) => {
                    errors.set(e);
                    break;
                }
            }
            if pending >= batch {
                pending = 0;
                let next = *input.time() + 1;
                input.advance_to(next);
                // Back-pressure: keep at most `max_inflight` batches in flight.
                while !errors.is_set() && probe.less_than(&next.saturating_sub(config.max_inflight))
                {
                    if crate::panics::current_run_failed() {
                        return Err(std::sync::Arc::new(StageError::new(
                            "dataflow",
                            None,
                            ANOTHER_FAILED,
                        )));
                    }
                    worker.step_or_park(Some(IDLE_PARK));
                }
                let took = batch_started.elapsed();
                batch_started = std::time::Instant::now();
                if took < FAST_BATCH {
                    batch = (batch * 2).min(max_batch);
                } else if took > 4 * FAST_BATCH {
                    batch = (batch / 2).max(min_batch);
                }
            }
        }
    }
    input.close();
    while !probe.done() {
        // A worker that panicked never makes progress again.
        if crate::panics::current_run_failed() {
            return Err(std::sync::Arc::new(StageError::new(
                "dataflow",
                None,
                ANOTHER_FAILED,
            )));
        }
        worker.step_or_park(Some(IDLE_PARK));
    }
    match errors.get() {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// Sends `report` (from the workers that have one) to worker 0, whose `sink`
/// receives each: a one-record dataflow every worker of every process takes
/// part in, so the processes of a run exchange their final reports through
/// the connections they already have, and nobody waits forever.
pub fn gather_at_worker_zero(
    worker: &mut Worker,
    report: Option<Vec<u8>>,
    sink: Option<SinkFn>,
) -> Result<(), std::sync::Arc<StageError>> {
    run_worker(
        worker,
        &DriverConfig {
            source_batch: 1,
            max_source_batch: 1,
            max_inflight: 1,
            sink_worker: 0,
        },
        report.map(|r| std::iter::once(Ok((0u64, r)))),
        |x: &(u64, Vec<u8>)| x.0,
        |stream, _probe| stream,
        sink,
        ErrorSlot::default(),
    )
    .map(|_| ())
}
