//! Records stashed by time until a batch is due: the state both batched
//! operators ([`super::batch`] and [`super::pending`]) keep between
//! activations, in the style of timely's `wordcount` example (each time's
//! capability kept beside its records).

use std::collections::BTreeMap;

use timely::dataflow::operators::Capability;
use timely::progress::frontier::AntichainRef;

/// The records received and not yet handed to a batch, grouped by time,
/// with a capability per time to send their outputs later.
pub(super) struct TimeStash<I> {
    by_time: BTreeMap<u64, (Capability<u64>, Vec<I>)>,
    len: usize,
}

impl<I> TimeStash<I> {
    /// An empty stash.
    pub(super) fn new() -> Self {
        TimeStash {
            by_time: BTreeMap::new(),
            len: 0,
        }
    }

    /// Moves the records of `containers` (all at `cap`'s time) into the stash.
    pub(super) fn push<'c>(
        &mut self,
        cap: Capability<u64>,
        containers: impl IntoIterator<Item = &'c mut Vec<I>>,
    ) where
        I: 'c,
    {
        let entry = self
            .by_time
            .entry(*cap.time())
            .or_insert_with(|| (cap, Vec::new()));
        for container in containers {
            self.len += container.len();
            entry.1.append(container);
        }
    }

    /// Whether a batch should start now: `batch_size` records are stashed,
    /// or the input `frontier` shows no more records can arrive for the
    /// oldest stashed time.
    pub(super) fn is_due(&self, batch_size: usize, frontier: AntichainRef<'_, u64>) -> bool {
        let complete = self
            .by_time
            .keys()
            .next()
            .is_some_and(|t| !frontier.less_equal(t));
        !self.by_time.is_empty() && (self.len >= batch_size || complete)
    }

    /// Drops every stashed record (after an error: nothing more is sent).
    pub(super) fn clear(&mut self) {
        self.by_time.clear();
        self.len = 0;
    }

    /// Takes every stashed record, oldest time first, with its capability.
    pub(super) fn take(&mut self) -> impl Iterator<Item = (Capability<u64>, Vec<I>)> {
        self.len = 0;
        std::mem::take(&mut self.by_time).into_values()
    }

    /// How many records are stashed.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}
