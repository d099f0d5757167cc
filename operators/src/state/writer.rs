//! The store's writer thread: finished queries arrive over a bounded
//! channel and are committed in batches (at most `max_batch` queries or
//! `max_age` old), off the dataflow's threads. A commit is made durable
//! (fsynced) when the previous durable one is at least `max_age` old, on
//! [`WriterHandle::sync`] and at the end; the others are atomic but not
//! fsynced (an fsync per batch made commits the pipeline's bottleneck), so a
//! crash redoes at most about `max_age` of finished work.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{QueryUpdate, StateError, StateStore};

/// What the writer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WriterStats {
    /// Durable commits.
    pub commits: u64,
    /// Queries committed.
    pub updates: u64,
    /// Seconds spent inside commits.
    pub commit_s: f64,
}

/// A message to the writer thread.
pub enum WriterMsg {
    /// A finished query to commit.
    Update(Box<QueryUpdate>),
    /// Commit everything received so far, then answer (with the error
    /// message if the writer has failed).
    Sync(SyncSender<Result<(), String>>),
}

/// A handle to send finished queries to the writer thread with.
#[derive(Clone)]
pub struct WriterHandle(SyncSender<WriterMsg>);

impl WriterHandle {
    /// Sends a finished query; fails once the writer has stopped on an
    /// error ([`StoreWriter::finish`] reports it).
    pub fn send(&self, u: QueryUpdate) -> Result<(), String> {
        self.0
            .send(WriterMsg::Update(Box::new(u)))
            .map_err(|_| "the state store writer stopped".to_string())
    }

    /// Waits until everything sent before is durably committed.
    pub fn sync(&self) -> Result<(), String> {
        let (tx, rx) = sync_channel(1);
        self.0
            .send(WriterMsg::Sync(tx))
            .map_err(|_| "the state store writer stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the state store writer stopped".to_string())?
    }
}

/// A running writer thread (see the module docs).
pub struct StoreWriter {
    tx: Option<SyncSender<WriterMsg>>,
    handle: Option<JoinHandle<Result<WriterStats, StateError>>>,
}

impl StoreWriter {
    /// Starts the writer for `store`.
    pub fn start(store: Arc<StateStore>, max_batch: usize, max_age: Duration) -> Self {
        let (tx, rx) = sync_channel::<WriterMsg>(max_batch.max(1) * 4);
        let handle = std::thread::Builder::new()
            .name("leverflow-store".into())
            .spawn(move || write_loop(&store, rx, max_batch.max(1), max_age))
            .ok();
        Self {
            tx: Some(tx),
            handle,
        }
    }

    /// A handle to send finished queries with.
    pub fn handle(&self) -> Option<WriterHandle> {
        self.tx.clone().map(WriterHandle)
    }

    /// Waits until every sent query is committed (all senders must be
    /// dropped first) and returns the writer's counts or its error.
    pub fn finish(mut self) -> Result<WriterStats, StateError> {
        self.tx.take();
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(StateError::Writer(
                    "the store writer thread panicked".into(),
                ))
            }),
            None => Err(StateError::Writer(
                "the store writer thread could not be started".into(),
            )),
        }
    }
}

fn write_loop(
    store: &StateStore,
    rx: Receiver<WriterMsg>,
    max_batch: usize,
    max_age: Duration,
) -> Result<WriterStats, StateError> {
    let mut stats = WriterStats::default();
    let mut batch: Vec<QueryUpdate> = Vec::with_capacity(max_batch);
    let mut oldest: Option<Instant> = None;
    let mut last_durable = Instant::now();
    let mut commit = |batch: &mut Vec<QueryUpdate>, stats: &mut WriterStats, force: bool| {
        let durable = force || last_durable.elapsed() >= max_age;
        if batch.is_empty() && !force {
            return Ok(());
        }
        let t = Instant::now();
        store.commit_updates(batch, durable)?;
        if durable {
            last_durable = Instant::now();
        }
        stats.commit_s += t.elapsed().as_secs_f64();
        stats.commits += 1;
        stats.updates += batch.len() as u64;
        batch.clear();
        Ok::<(), StateError>(())
    };
    loop {
        let wait = oldest.map_or(Duration::from_secs(3600), |t| {
            max_age.saturating_sub(t.elapsed())
        });
        match rx.recv_timeout(wait) {
            Ok(WriterMsg::Update(u)) => {
                oldest.get_or_insert_with(Instant::now);
                batch.push(*u);
                if batch.len() >= max_batch {
                    commit(&mut batch, &mut stats, false)?;
                    oldest = None;
                }
            }
            Ok(WriterMsg::Sync(reply)) => {
                let done = commit(&mut batch, &mut stats, true);
                oldest = None;
                let _ = reply.send(done.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                done?;
            }
            Err(RecvTimeoutError::Timeout) => {
                commit(&mut batch, &mut stats, false)?;
                oldest = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                commit(&mut batch, &mut stats, true)?;
                return Ok(stats);
            }
        }
    }
}
