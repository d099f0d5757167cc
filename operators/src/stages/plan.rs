//! The `plan` stage: computes each query's input key (everything its record
//! depends on, [`RunKeys::input_key`]), notes it for the run's outputs, and
//! marks the queries whose stored record has the same key as reusable, so
//! only the others go on through the graph.

use std::sync::{Arc, Mutex};

use super::{Counters, Inputs, QueryWork, StageError};
use crate::dataflow::{BatchFn, Planned};
use crate::state::{ImageStamps, Key, RunKeys, StateStore};

/// The input key of `w` (`with_images`: the query image's identity is part
/// of it, as in runs that answer prompts).
pub fn input_key(
    inputs: &Inputs,
    keys: &RunKeys,
    w: &QueryWork,
    stamps: Option<&mut ImageStamps>,
) -> Result<Key, StageError> {
    let q = w.query_index;
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| StageError::new("plan", Some(q), e);
    let row = inputs.query_row(q).map_err(|e| fail(e.into()))?;
    if !inputs.with_dataset {
        return Ok(keys.index_only_input_key(q, &w.source_beams, row, inputs.pools.of_query(q)));
    }
    let item = inputs.dataset.get(q).map_err(|e| fail(e.into()))?;
    let pool = inputs.pools.of_query(q);
    let mut pool_items = Vec::new();
    if let Some(ids) = pool {
        for &i in ids {
            pool_items.push(inputs.dataset.get(i).map_err(|e| fail(e.into()))?);
        }
    }
    let mut items = pool_items.into_iter();
    let pool = pool.map(|ids| {
        (
            ids.as_slice(),
            &mut items as &mut dyn Iterator<Item = &crate::dataset::VqaItem>,
        )
    });
    Ok(keys.input_key(q, &w.source_beams, row, item, stamps, pool))
}

/// The `plan` stage. `current` collects every (query, input key) of the run.
pub fn plan(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    with_images: bool,
    current: Arc<Mutex<Vec<(u64, Key)>>>,
    counters: Arc<Counters>,
) -> BatchFn<QueryWork, Planned<QueryWork>> {
    let mut stamps = ImageStamps::default();
    Box::new(move |batch: Vec<QueryWork>| {
        let store_error = |e: crate::state::StateError| StageError::new("plan", None, e);
        let reader = store.reader().map_err(store_error)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut seen = Vec::with_capacity(batch.len());
        for mut w in batch {
            let key = input_key(&inputs, &keys, &w, with_images.then_some(&mut stamps))?;
            w.input_key = key;
            let reuse = reader
                .has_record(w.query_index, &key)
                .map_err(store_error)?;
            if reuse {
                Counters::add(&counters.queries_reused, 1);
                Counters::add(&counters.queries_done, 1);
            }
            seen.push((w.query_index, key));
            out.push(Planned {
                query_index: w.query_index,
                input_key: key,
                reuse,
                work: w,
            });
        }
        current
            .lock()
            .map_err(|_| StageError::new("plan", None, "a worker panicked"))?
            .extend(seen);
        Ok(out)
    })
}
