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

/// Updates waiting for their time to complete: per time, its capability
/// and the summed weight of each (query, key).
type Stash = std::collections::BTreeMap<
    u64,
    (
        timely::dataflow::operators::Capability<u64>,
        std::collections::HashMap<(u64, Key), isize>,
    ),
>;

/// Sums equal updates of the same time on this worker and drops those that
/// cancel, before they reach differential's arrangement. In a rerun almost
/// every query's previous and current keys are equal and arrive at the same
/// time (`interleave_previous` sends them together), so this leaves the
/// `reduce` below a few thousand updates to arrange instead of two per
/// query. Consolidation is exact: the collection is unchanged.
fn cancel_equal_updates<'s>(
    stream: StreamVec<'s, u64, ((u64, Key), u64, isize)>,
) -> StreamVec<'s, u64, ((u64, Key), u64, isize)> {
    stream.unary_frontier::<CapacityContainerBuilder<Vec<((u64, Key), u64, isize)>>, _, _, _>(
        Pipeline,
        "CancelEqualUpdates",
        move |_cap, _info| {
            let mut stash: Stash = std::collections::BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        let t = *cap.time();
                        let entry = stash
                            .entry(t)
                            .or_insert_with(|| (cap, std::collections::HashMap::new()));
                        for container in data {
                            for (d, _, diff) in container.drain(..) {
                                *entry.1.entry(d).or_insert(0) += diff;
                            }
                        }
                    }
                });
                while let Some(t) = stash.keys().next().copied() {
                    if frontier.frontier().less_equal(&t) {
                        break;
                    }
                    if let Some((cap, sums)) = stash.remove(&t) {
                        // In any order: the arrangement sorts its input.
                        output.session(&cap).give_iterator(
                            sums.into_iter()
                                .filter(|(_, diff)| *diff != 0)
                                .map(|(d, diff)| (d, t, diff)),
                        );
                    }
                }
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
    cancel_equal_updates(now.concat(before).inner)
        .as_collection()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::{Input, Inspect, Probe};
    use timely::dataflow::{InputHandleVec, ProbeHandle};

    type Update = ((u64, Key), u64, isize);

    #[test]
    fn equal_updates_of_one_time_cancel_and_everything_else_passes() {
        let seen: Arc<Mutex<Vec<Update>>> = Arc::default();
        let out = Arc::clone(&seen);
        timely::execute_directly(move |worker| {
            let mut input: InputHandleVec<u64, Update> = InputHandleVec::new();
            let probe = ProbeHandle::new();
            worker.dataflow::<u64, _, _>(|scope| {
                let out = Arc::clone(&out);
                cancel_equal_updates(scope.input_from(&mut input))
                    .inspect(move |u| out.lock().unwrap().push(*u))
                    .probe_with(&probe);
            });
            let k = |n: u8| [n; 32];
            // Time 0: query 1 unchanged (cancels), query 2 changed, query 3
            // added; query 4's previous key arrives now, its current one
            // only at time 1 (no cancelling across times).
            for u in [
                ((1, k(1)), 0, -1),
                ((1, k(1)), 0, 1),
                ((2, k(2)), 0, -1),
                ((2, k(9)), 0, 1),
                ((3, k(3)), 0, 1),
                ((4, k(4)), 0, -1),
            ] {
                input.send(u);
            }
            input.advance_to(1);
            input.send(((4, k(4)), 1, 1));
            input.close();
            while !probe.done() {
                worker.step();
            }
        });
        let mut got = seen.lock().unwrap().clone();
        got.sort();
        let k = |n: u8| [n; 32];
        let mut want = vec![
            ((2, k(2)), 0, -1),
            ((2, k(9)), 0, 1),
            ((3, k(3)), 0, 1),
            ((4, k(4)), 0, -1),
            ((4, k(4)), 1, 1),
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
