//! The pipeline as a library: a [`RunConfig`] in, a [`RunSummary`] out.
//!
//! [`Pipeline::run`] loads the inputs and the VQA backend, opens the state
//! store, runs the dataflow ([`crate::dataflow::rl_graph`] over the
//! [`crate::stages`]) on the configured workers and processes, writes the
//! outputs ([`crate::outputs`]) and completes the run in the store.
//!
//! | module | what |
//! |---|---|
//! | [`load`] | loading and cross-checking every input |
//! | `run` | the run from start to end (single process) |
//! | [`cluster`] | the end of a multi-process run (part files, manifest) |
//! | [`summary`] | the typed [`RunSummary`] and `_meta` |
//! | [`write`](mod@write) | the outputs from the state store (segment copy, delta) |
//! | [`progress`] | how a run reports phases and live counters |
//! | [`error`] | [`PipelineError`] |
//!
//! ```no_run
//! use leverflow_operators::config::RunConfig;
//! use leverflow_operators::pipeline::{Job, Pipeline};
//!
//! let config = RunConfig {
//!     sft_ckpt: Some("demo/sft.ckpt".into()),
//!     beam_data: Some("demo/beam_data.json".into()),
//!     output_path: Some("out/rl_data.json".into()),
//!     ..RunConfig::default()
//! };
//! let summary = Pipeline::new(config, Job::Generate).run()?;
//! println!("{} queries", summary.summary.queries);
//! # Ok::<(), leverflow_operators::pipeline::PipelineError>(())
//! ```

pub mod cluster;
pub mod error;
pub mod load;
mod outputs_check;
pub mod progress;
mod run;
pub mod summary;
pub mod write;

use std::sync::Arc;

pub use crate::config::RunConfig;
pub use crate::stages::context::Job;
pub use error::PipelineError;
pub use progress::{Counters, Progress, Silent};
pub use run::state_dir;
pub use summary::{ClusterSummary, RunSummary};

/// A configured run of `generate` or `candidates`.
pub struct Pipeline {
    config: RunConfig,
    job: Job,
    progress: Arc<dyn Progress>,
}

impl Pipeline {
    /// A run of `job` with `config`, reporting no progress.
    pub fn new(config: RunConfig, job: Job) -> Self {
        Self {
            config,
            job,
            progress: Arc::new(Silent),
        }
    }

    /// Reports phases and live counters to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// The run's settings.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// Runs it: loads, computes what the state store does not hold yet,
    /// writes the outputs and returns what was done.
    pub fn run(&self) -> Result<RunSummary, PipelineError> {
        run::run(self)
    }
}
