//! The incremental comparison of a run's input with the previous run's, as
//! a differential-dataflow collection keyed by query index.
//!
//! The previous input (query, input key) enters with weight −1 and the
//! current input with weight +1. Per query, what remains after
//! consolidation says how it changed: nothing (unchanged, the two cancel),
//! only +1 (added), only −1 (removed), or both (changed).

use differential_dataflow::collection::AsCollection;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use crate::state::Key;

/// How a query's input differs from the previous completed run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InputChange {
    /// New in this run.
    Added,
    /// Present before, absent now: its record is retracted.
    Removed,
    /// Present in both with different input keys: recomputed.
    Changed,
}

/// Stamps each record with its timely time and weight `diff`, making the
/// stream a differential collection.
fn stamp<'s, D: Clone + 'static>(
    stream: StreamVec<'s, u64, D>,
    diff: isize,
) -> StreamVec<'s, u64, (D, u64, isize)> {
    stream.unary::<CapacityContainerBuilder<Vec<(D, u64, isize)>>, _, _, _>(
        Pipeline,
        "StampUpdates",
        move |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        let t = *cap.time();
                        output
                            .session(&cap)
                            .give_iterator(data.drain(..).map(|d| (d, t, diff)));
                    }
                });
            }
        },
    )
}

/// The per-query changes between `previous` and `current` (both streams of
/// (query index, input key)), as differential updates
/// `((query, change), time, diff)`: summing the diffs of a (query, change)
/// pair over all times gives 1 for the final classification and 0 for
/// transient ones. Unchanged queries produce nothing.
pub fn input_changes<'s>(
    previous: StreamVec<'s, u64, (u64, Key)>,
    current: StreamVec<'s, u64, (u64, Key)>,
) -> StreamVec<'s, u64, ((u64, InputChange), u64, isize)> {
    let before = stamp(previous, -1).as_collection();
    let now = stamp(current, 1).as_collection();
    now.concat(before)
        .reduce(
            |_query, keys: &[(&Key, isize)], out: &mut Vec<(InputChange, isize)>| {
                let added = keys.iter().any(|(_, d)| *d > 0);
                let removed = keys.iter().any(|(_, d)| *d < 0);
                let change = match (added, removed) {
                    (true, true) => InputChange::Changed,
                    (true, false) => InputChange::Added,
                    (false, true) => InputChange::Removed,
                    (false, false) => return,
                };
                out.push((change, 1));
            },
        )
        .inner
}
