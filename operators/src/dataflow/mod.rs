//! The timely dataflow: every line of timely-facing code lives here.
//!
//! timely and differential-dataflow change their APIs often, so the rest of
//! leverflow never touches them: stages are plain batch functions
//! ([`BatchFn`]) and this module wires them into a graph
//!
//! ```text
//! source (beam reader, one per process) ─exchange by query index─▶ stage ▶ stage ▶ … ▶ serialise ─exchange to worker 0─▶ sink
//! ```
//!
//! where each stage is a [`batched`] operator: it stashes records under
//! their capabilities, and runs its batch function when enough records have
//! arrived (size trigger) or when the input frontier has passed the stashed
//! times (frontier trigger). Results keep the time of the record that produced
//! them, so the probe at the end tells the source how far the graph got.

mod batch;
pub mod cluster;
pub mod diff;
mod driver;
mod error;
pub mod graph;
pub mod incremental;
mod pending;
mod stash;

pub use batch::{batched, BatchFn};
pub use cluster::{
    execute_cluster, is_loopback_host, ClusterConfig, ClusterError, ClusterSecret, ClusterTimeouts,
    CLUSTER_SECRET_ENV,
};
pub use diff::InputChange;
pub use driver::{gather_at_worker_zero, run_worker, DriverConfig, SinkFn, WorkerOutcome};
pub use error::{BoxError, ErrorSlot, StageError};
pub use graph::{rl_graph, Finished, RecordStages, Stages, Then, VqaStages};
pub use incremental::{incremental_front, interleave_previous, Planned, SourceItem};
pub use pending::{batched_pending, BatchResult, PendingStage, Waker};

use std::sync::Mutex;

/// Runs `build` on `workers` timely worker threads of this process and
/// returns each worker's result in worker order.
///
/// `build` is called once per worker with the worker; it constructs the
/// worker's dataflow with [`run_worker`] and drives it to completion.  A
/// worker that panics makes the result `Err("timely worker W failed:
/// MESSAGE (at FILE:LINE:COLUMN)")` (with a backtrace when `RUST_BACKTRACE`
/// asks for one); the panic is not printed.
pub fn execute_threads<T, F>(workers: usize, build: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    let workers = workers.max(1);
    let config = timely::Config::process(workers);
    let failures = crate::panics::Recorded::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let done_tx = Mutex::new(done_tx);
    let build = recording_worker_panics(build, failures.clone());
    let guards = timely::execute(config, move |worker| {
        // Says "done" when the worker returns or unwinds.
        let _done = match done_tx.lock() {
            Ok(tx) => Done(tx.clone()),
            Err(p) => Done(p.into_inner().clone()),
        };
        build(worker)
    })?;
    // Wait for every worker; after a panic, for the others only a while
    // (a worker stuck waiting for the one that died is left behind).
    let mut finished = 0;
    let mut give_up: Option<std::time::Instant> = None;
    while finished < workers {
        let got = match give_up {
            None => done_rx.recv().map_err(|_| ()),
            Some(at) => done_rx
                .recv_timeout(at.saturating_duration_since(std::time::Instant::now()))
                .map_err(|_| ()),
        };
        if got.is_err() {
            break;
        }
        finished += 1;
        if give_up.is_none() && failures.any() {
            give_up = Some(std::time::Instant::now() + STOP_AFTER_PANIC);
        }
    }
    if finished < workers {
        std::mem::forget(guards);
        return Err(
            worker_failure(&failures.all()).unwrap_or_else(|| "a timely worker failed".to_string())
        );
    }
    let results = guards.join();
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        return Err(
            worker_failure(&failures.all()).unwrap_or_else(|| format!("timely worker failed: {e}"))
        );
    }
    Ok(results.into_iter().flatten().collect())
}

/// After a worker panicked, how long [`execute_threads`] waits for the
/// others to stop ([`run_worker`] stops at once; other code may never).
const STOP_AFTER_PANIC: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends on drop (a worker returned or unwound).
struct Done(std::sync::mpsc::Sender<()>);

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// `build`, with the panics of the worker thread running it recorded in
/// `failures` (`"timely worker W\tMESSAGE (at FILE:LINE:COLUMN)"`) instead
/// of printed.
pub(crate) fn recording_worker_panics<T, F>(
    build: F,
    failures: crate::panics::Recorded,
) -> impl Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static
where
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    move |worker| {
        let _run = crate::panics::enter_run(failures.clone());
        let recorded = failures.clone();
        let index = worker.index();
        let _scope = crate::panics::on_this_thread(move |info| {
            let mut text = crate::panics::describe(info);
            let trace = std::backtrace::Backtrace::capture();
            if trace.status() == std::backtrace::BacktraceStatus::Captured {
                text.push_str(&format!("\n{trace}"));
            }
            recorded.push(format!("timely worker {index}\t{text}"));
            true
        });
        let result = build(worker);
        if failures.any() {
            // The run failed: what is left of this worker's dataflows can
            // never complete, and timely steps a worker until its dataflows
            // have: drop them, so that the thread ends.
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        }
        result
    }
}

/// The first recorded worker panic as `"timely worker W failed: ..."`
/// (skipping the panics other workers raise because of it, when there is
/// another).
fn worker_failure(recorded: &[String]) -> Option<String> {
    let first = recorded
        .iter()
        .find(|m| !m.contains("poisoned"))
        .or(recorded.first())?;
    let (who, msg) = first
        .split_once('\t')
        .unwrap_or(("a timely worker", first.as_str()));
    Some(format!("{who} failed: {msg}"))
}

#[cfg(test)]
mod tests;
