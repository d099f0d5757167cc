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

pub use batch::{batched, BatchFn};
pub use cluster::{
    devices_for_workers, execute_cluster, parse_devices, ClusterConfig, ClusterError,
    ClusterTimeouts,
};
pub use diff::InputChange;
pub use driver::{gather_at_worker_zero, run_worker, DriverConfig, SinkFn, WorkerOutcome};
pub use error::{BoxError, ErrorSlot, StageError};
pub use graph::{rl_graph, Finished, RecordStages, Stages, Then, VqaStages};
pub use incremental::{incremental_front, interleave_previous, Planned, SourceItem};

/// Runs `build` on `workers` timely worker threads of this process and
/// returns each worker's result in worker order.
///
/// `build` is called once per worker with the worker; it constructs the
/// worker's dataflow with [`run_worker`] and drives it to completion.
pub fn execute_threads<T, F>(workers: usize, build: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    let config = timely::Config::process(workers.max(1));
    let guards = timely::execute(config, build)?;
    guards
        .join()
        .into_iter()
        .map(|r| r.map_err(|e| format!("timely worker failed: {e}")))
        .collect()
}

#[cfg(test)]
mod tests;
