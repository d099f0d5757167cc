//! The batched stage operator whose batches finish later: a stage that waits
//! on something outside the worker (requests to an inference server) starts
//! a batch and returns at once, so the worker goes on running the other
//! stages; when the batch is done, the stage wakes the operator (from any
//! thread) and its outputs are sent with the capability kept for them.

use std::collections::HashMap;
use std::sync::Arc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::stash::TimeStash;
use super::{ErrorSlot, StageError};

/// Wakes the operator of a [`PendingStage`] (callable from any thread).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A finished batch: its id and its outputs (one per input, in order).
pub type BatchResult<O> = (u64, Result<Vec<O>, StageError>);

/// Each time's capability in a batch and its share of the batch's records.
type Groups = Vec<(Capability<u64>, usize)>;

/// A stage whose batches finish later. Built per worker, like a
/// [`super::BatchFn`].
pub trait PendingStage<I, O> {
    /// Starts batch `id`. When it is finished (now or later, on any thread)
    /// the stage calls `wake`, and [`PendingStage::finished`] returns it.
    fn start(&mut self, id: u64, batch: Vec<I>, wake: Waker) -> Result<(), StageError>;

    /// The batches finished since the last call: one output per input, in
    /// input order.
    fn finished(&mut self) -> Vec<BatchResult<O>>;
}

/// Batches started and not yet finished: each time's capability and its
/// share of the batch.
type InFlight = HashMap<u64, (usize, Groups)>;

/// Wraps `stage` as a timely operator named `name` that starts batches of
/// `batch_size` records once that many are stashed (or fewer once the input
/// frontier shows no more can arrive for the stashed times) without waiting
/// for them, and
/// sends each batch's outputs when it is finished, at the times of its
/// inputs. After an error has been recorded in `errors` the operator drops
/// its input and the outputs of batches still finishing.
pub fn batched_pending<'s, I, O>(
    stream: StreamVec<'s, u64, I>,
    name: &str,
    batch_size: usize,
    mut stage: Box<dyn PendingStage<I, O>>,
    errors: ErrorSlot,
) -> StreamVec<'s, u64, O>
where
    I: 'static,
    O: Clone + 'static,
{
    let batch_size = batch_size.max(1);
    let stage_name = name.to_string();
    let worker = stream.scope().worker();
    stream.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(
        Pipeline,
        name,
        move |_capability, info| {
            let activator = worker.sync_activator_for(info.address.to_vec());
            let activator = std::sync::Mutex::new(activator);
            let wake: Waker = Arc::new(move || {
                if let Ok(a) = activator.lock() {
                    // An error means the worker is gone: nothing to wake.
                    let _ = a.activate();
                }
            });
            let mut stash = TimeStash::new();
            let mut in_flight: InFlight = HashMap::new();
            let mut next_id = 0u64;
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        stash.push(cap, data);
                    }
                });
                if errors.is_set() {
                    stash.clear();
                    in_flight.clear();
                    return;
                }
                if stash.is_due(batch_size, frontier.frontier()) {
                    // Batches of `batch_size` records, each started at once:
                    // their outputs are sent as each finishes.
                    let mut batches: Vec<(Groups, Vec<I>)> = Vec::new();
                    for (cap, records) in stash.take() {
                        for r in records {
                            match batches.last_mut() {
                                Some((groups, items)) if items.len() < batch_size => {
                                    match groups.last_mut() {
                                        Some((c, n)) if c.time() == cap.time() => *n += 1,
                                        _ => groups.push((cap.clone(), 1)),
                                    }
                                    items.push(r);
                                }
                                _ => batches.push((vec![(cap.clone(), 1)], vec![r])),
                            }
                        }
                    }
                    for (groups, items) in batches {
                        let id = next_id;
                        next_id += 1;
                        in_flight.insert(id, (items.len(), groups));
                        if let Err(e) = stage.start(id, items, Arc::clone(&wake)) {
                            errors.set(e);
                            in_flight.clear();
                            return;
                        }
                    }
                }
                for (id, result) in stage.finished() {
                    let Some((expected, groups)) = in_flight.remove(&id) else {
                        continue;
                    };
                    match result {
                        Ok(outputs) if outputs.len() == expected => {
                            let mut outputs = outputs.into_iter();
                            for (cap, n) in groups {
                                output.session(&cap).give_iterator(outputs.by_ref().take(n));
                            }
                        }
                        Ok(outputs) => {
                            errors.set(StageError::new(
                                "dataflow",
                                None,
                                format!(
                                    "internal error in stage `{stage_name}`: {} outputs for {expected} inputs",
                                    outputs.len()
                                ),
                            ));
                            in_flight.clear();
                            return;
                        }
                        Err(e) => {
                            errors.set(e);
                            in_flight.clear();
                            return;
                        }
                    }
                }
            }
        },
    )
}
