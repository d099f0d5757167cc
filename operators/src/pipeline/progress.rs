//! How a run tells its caller what it is doing: phases ("loading inputs",
//! "writing outputs") and the dataflow's live counters. The binary draws a
//! bar or prints JSON lines; a library caller may ignore it all.

use std::sync::Arc;

pub use crate::stages::Counters;

/// Receives a run's progress. Every method has a default that does nothing.
pub trait Progress: Send + Sync {
    /// A new phase of the run begins.
    fn phase(&self, _message: &str) {}

    /// The dataflow starts; `counters` change until [`Progress::finished`].
    /// `job` is `generate` or `candidates`.
    fn started(&self, _counters: Arc<Counters>, _job: &str) {}

    /// The dataflow has stopped (successfully or not).
    fn finished(&self) {}
}

/// No progress reporting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
