//! The front of an incremental run's graph: the routed source carries the
//! previous run's input keys and this run's work; a planning stage computes
//! each query's input key and whether its stored record can be reused; the
//! keys feed the differential comparison ([`super::diff`]) and only the
//! queries that need work continue.

use serde::{Deserialize, Serialize};
use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Probe;
use timely::dataflow::{ProbeHandle, StreamVec};

use super::diff::{input_changes, InputChange};
use super::{batched, BatchFn, ErrorSlot};
use crate::state::Key;

/// A record of an incremental run's source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SourceItem<W> {
    /// A query of the previous completed run, with its input key.
    Previous(u64, Key),
    /// A query of this run.
    Current(W),
}

impl<W> SourceItem<W> {
    /// The query index, given how to read it from `W`.
    pub fn query_index(&self, of: impl Fn(&W) -> u64) -> u64 {
        match self {
            SourceItem::Previous(q, _) => *q,
            SourceItem::Current(w) => of(w),
        }
    }
}

/// The source of an incremental run: the previous run's (query, key)
/// pairs (ascending) merged into this run's work items by query index, each
/// previous pair just before the first current item with an index at least
/// as large (the rest at the end). When the beam data is in ascending
/// order, as it usually is, a query's previous and current keys enter the
/// differential comparison at the same time and an unchanged query produces
/// no update at all; otherwise the comparison still classifies it
/// correctly, through transient updates.
pub fn interleave_previous<W, E>(
    previous: impl IntoIterator<Item = (u64, Key)>,
    current: impl IntoIterator<Item = Result<W, E>>,
    index: fn(&W) -> u64,
) -> impl Iterator<Item = Result<SourceItem<W>, E>> {
    let mut previous = previous.into_iter().peekable();
    let mut current = current.into_iter();
    let mut pending: Option<Result<W, E>> = None;
    std::iter::from_fn(move || {
        if pending.is_none() {
            pending = current.next();
        }
        match &pending {
            Some(Ok(w)) => {
                let q = index(w);
                if let Some((p, k)) = previous.next_if(|(p, _)| *p <= q) {
                    return Some(Ok(SourceItem::Previous(p, k)));
                }
                pending.take().map(|r| r.map(SourceItem::Current))
            }
            Some(Err(_)) => pending.take().map(|r| r.map(SourceItem::Current)),
            None => previous.next().map(|(p, k)| Ok(SourceItem::Previous(p, k))),
        }
    })
}

/// What the planning stage decides for one query of this run.
#[derive(Debug, Clone)]
pub struct Planned<W> {
    /// The work item, its input key filled in.
    pub work: W,
    /// Query index.
    pub query_index: u64,
    /// Key of everything the query's record depends on.
    pub input_key: Key,
    /// The stored record was computed from the same inputs: nothing to do.
    pub reuse: bool,
}

/// Builds the front of the graph (see the module docs). `on_change` is
/// called on the worker owning each query with every differential update of
/// its classification (summing the weights per query and change gives the
/// final answer). Returns the work that must be computed.
pub fn incremental_front<'s, W>(
    source: StreamVec<'s, u64, SourceItem<W>>,
    plan: BatchFn<W, Planned<W>>,
    plan_batch: usize,
    mut on_change: impl FnMut(u64, InputChange, isize) + 'static,
    probe: &ProbeHandle<u64>,
    errors: ErrorSlot,
) -> StreamVec<'s, u64, W>
where
    W: Clone + 'static,
{
    let previous = source.clone().flat_map(|item| match item {
        SourceItem::Previous(q, k) => Some((q, k)),
        SourceItem::Current(_) => None,
    });
    let current = source.flat_map(|item| match item {
        SourceItem::Current(w) => Some(w),
        SourceItem::Previous(..) => None,
    });
    let planned = batched(current, "plan", plan_batch, plan, errors);
    let keys = planned.clone().map(|p| (p.query_index, p.input_key));
    input_changes(previous, keys)
        .inspect(move |((q, change), _t, diff)| on_change(*q, *change, *diff))
        .probe_with(probe);
    planned.flat_map(|p| (!p.reuse).then_some(p.work))
}
