//! The batched stage operator.

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::stash::TimeStash;
use super::{ErrorSlot, StageError};

/// A stage's batch function: one output per input, in input order.
///
/// It is built per worker (so it may own non-`Send` state such as a model
/// instance or a cache) and errors are typed ([`StageError`]), naming the
/// input and the place.
pub type BatchFn<I, O> = Box<dyn FnMut(Vec<I>) -> Result<Vec<O>, StageError>>;

/// Wraps `logic` as a timely operator named `name` that runs it on batches of
/// at least `batch_size` records, or fewer once the input frontier shows no
/// more records can arrive for the stashed times.
///
/// Each output keeps the time of its input, so downstream progress tracking
/// (and the driver's back-pressure) sees exactly which source batches are
/// finished. After an error has been recorded in `errors` the operator drops
/// its input.
pub fn batched<'s, I, O>(
    stream: StreamVec<'s, u64, I>,
    name: &str,
    batch_size: usize,
    mut logic: BatchFn<I, O>,
    errors: ErrorSlot,
) -> StreamVec<'s, u64, O>
where
    I: 'static,
    O: Clone + 'static,
{
    let batch_size = batch_size.max(1);
    let stage = name.to_string();
    let internal = |message: String| StageError::new("dataflow", None, message);
    stream.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(
        Pipeline,
        name,
        move |_capability, _info| {
            // Records waiting to be processed, grouped by time.
            let mut stash = TimeStash::new();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        stash.push(cap, data);
                    }
                });
                if errors.is_set() {
                    stash.clear();
                    return;
                }
                if !stash.is_due(batch_size, frontier.frontier()) {
                    return;
                }
                // Run the whole stash as one batch, remembering each time's share.
                let mut groups: Vec<(Capability<u64>, usize)> = Vec::new();
                let mut items = Vec::with_capacity(stash.len());
                for (cap, mut records) in stash.take() {
                    groups.push((cap, records.len()));
                    items.append(&mut records);
                }
                let expected = items.len();
                match logic(items) {
                    Ok(outputs) if outputs.len() == expected => {
                        let mut outputs = outputs.into_iter();
                        for (cap, n) in groups {
                            output.session(&cap).give_iterator(outputs.by_ref().take(n));
                        }
                    }
                    Ok(outputs) => errors.set(internal(format!(
                        "internal error in stage `{stage}`: {} outputs for {expected} inputs",
                        outputs.len()
                    ))),
                    Err(e) => errors.set(e),
                }
            }
        },
    )
}
