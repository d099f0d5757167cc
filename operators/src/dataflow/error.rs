//! Errors as a typed stream beside the data: a stage that fails on a batch
//! records a [`StageError`] in the run's [`ErrorSlot`] and stops producing;
//! the driver stops feeding the source, and the run ends with that error.

use std::sync::{Arc, Mutex};

/// A boxed error, kept whole so callers can inspect it (downcast).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A stage's failure: which stage, which query (when one is to blame), and
/// the stage's own typed error. Displays as its source (which names the
/// file and the place).
#[derive(Debug)]
pub struct StageError {
    /// The stage (`plan`, `candidates`, `vqa`, `accuracy`, `reward`, ...).
    pub stage: &'static str,
    /// The query the error is about, if one is.
    pub query: Option<u64>,
    /// What went wrong.
    pub source: BoxError,
}

impl StageError {
    /// An error of `stage` about `query`.
    pub fn new(stage: &'static str, query: Option<u64>, source: impl Into<BoxError>) -> Self {
        Self {
            stage,
            query,
            source: source.into(),
        }
    }

    /// The typed error inside, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.source.downcast_ref::<E>()
    }
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for StageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// The first error any stage of any worker raised; later errors are dropped.
///
/// Stages never panic on bad input: they record the error here, stop
/// producing, and the driver stops feeding the source, so the run ends
/// quickly with that error and no output is written.
#[derive(Clone, Default, Debug)]
pub struct ErrorSlot(Arc<Mutex<Option<Arc<StageError>>>>);

impl ErrorSlot {
    /// Records `error` unless an error is already recorded.
    pub fn set(&self, error: StageError) {
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_none() {
            *guard = Some(Arc::new(error));
        }
    }

    /// Whether an error has been recorded.
    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }

    /// The recorded error, if any.
    pub fn get(&self) -> Option<Arc<StageError>> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}
