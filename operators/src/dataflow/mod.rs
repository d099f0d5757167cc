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
pub mod incremental;

pub use batch::{batched, BatchFn};
pub use cluster::{
    devices_for_workers, execute_cluster, parse_devices, ClusterConfig, ClusterError,
    ClusterTimeouts,
};
pub use diff::InputChange;
pub use driver::{run_worker, DriverConfig, SinkFn, WorkerOutcome};
pub use incremental::{incremental_front, interleave_previous, Planned, SourceItem};

use std::sync::{Arc, Mutex};

/// The first error any stage of any worker raised; later errors are dropped.
///
/// Stages never panic on bad input: they record the error here, stop
/// producing, and the driver stops feeding the source, so the run ends
/// quickly with that error and no output is written.
#[derive(Clone, Default, Debug)]
pub struct ErrorSlot(Arc<Mutex<Option<String>>>);

impl ErrorSlot {
    /// Records `message` unless an error is already recorded.
    pub fn set(&self, message: String) {
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_none() {
            *guard = Some(message);
        }
    }

    /// Whether an error has been recorded.
    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }

    /// The recorded error, if any.
    pub fn get(&self) -> Option<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

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
