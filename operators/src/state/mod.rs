//! The persistent result store of incremental and resumable runs
//! (`--state_dir`).
//!
//! # Why redb
//! The store is written by one thread (the sink worker) in batches of a few
//! hundred records and read concurrently by every worker (cache lookups).
//! redb is a pure-Rust embedded B-tree with ACID transactions, MVCC readers
//! that never block the writer, and a copy-on-write commit that survives
//! `kill -9` at any instant (a crash loses at most the uncommitted batch).
//! It is one file, needs no background compaction threads (unlike fjall or
//! RocksDB, whose LSM compaction also costs a C++ toolchain for RocksDB),
//! and is actively maintained (sled is not). Append-only Parquet segments
//! would make point lookups by content key (the VQA cache) a scan.
//!
//! # Layout (format version [`STATE_FORMAT_VERSION`])
//! One file, `state.redb`, with these tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | `format_version` (u32 LE), ... |
//! | `records` | query index | [`Key`] of the inputs it was computed from, then the finished record ([`StoredOutcome`]) |
//! | `record_keys` | query index | the same [`Key`] alone (since format version 2): a rerun asks "is the stored record still valid?" for every query, and reading the 32-byte keys from their own small table touches a few hundred pages instead of one page of record bytes per query |
//! | `inputs` | query index | [`Key`] of that query's inputs in the last *completed* run |
//! | `candidates` | query index (big-endian) + candidate-set key | postcard of the candidate list |
//! | `vqa` | query index (big-endian) + prompt key | postcard of the answer |
//! | `file_digests` | absolute path of an input file | its identity when hashed and its SHA-256 ([`digests`]: unchanged inputs are not hashed again) |
//! | `outputs` | `manifest` | what the last completed run wrote to its outputs (per output segment: the queries' keys, byte ranges / row groups, summary counts), so the next run can copy unchanged segments instead of rewriting them; opaque to the store |
//!
//! `records` and `record_keys` always change in the same transaction.
//! `records` is filled while a run goes (committed every batch, so a killed
//! run resumes where it stopped); `inputs` changes only when a run completes,
//! which makes it "the previous run's input" that the next run's
//! differential comparison starts from.

pub mod digests;
pub mod keys;
mod record_codec;
pub mod snapshot;
mod writer;

#[cfg(test)]
mod tests;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use digests::{FileDigests, FileIdentity, StoredDigest};
pub use keys::{
    key_hex, provisional, CandidateSettings, ImageStamp, ImageStamps, Key, KeyHasher,
    RecordSettings, RunKeys, VqaSettings,
};
pub use writer::{StoreWriter, WriterHandle, WriterMsg, WriterStats};

/// Version of the on-disk layout; bumped on any incompatible change.
///
/// * 1: the first format.
/// * 2: adds `record_keys`; a version-1 store is migrated when opened (the
///   table is built from `records` in the opening transaction).
/// * 3: content keys encode every setting field by field (no `Debug`
///   text) and an image's identity includes its inode and status-change
///   time (a file replaced with `cp -p` is noticed). Keys of older stores
///   can never match: opening one empties its result tables (records,
///   candidate sets, answers) in the opening transaction, and
///   [`StateStore::migrated_from`] tells the caller, which says so.
pub const STATE_FORMAT_VERSION: u32 = 3;

/// The store's file inside the state directory.
pub const STATE_FILE: &str = "state.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const RECORD_KEYS: TableDefinition<u64, &[u8]> = TableDefinition::new("record_keys");
const INPUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("inputs");
const CANDIDATES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("candidates");
const VQA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vqa");
const OUTPUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("outputs");
const OUTPUT_MANIFEST: &str = "manifest";
const FILE_DIGESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_digests");

/// Errors of the state store. Every message names the file and says how to
/// recover.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file cannot be opened or read (truncated, corrupt, I/O).
    #[error("state store {path}: {detail}. The store cannot be trusted: delete the state directory {dir} (the next run recomputes everything) or restore it from a backup")]
    Unreadable {
        /// The state file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A value in the store does not decode.
    #[error("state store {path}: table `{table}`, key {key}: {detail}. The store is corrupt: delete the state directory {dir} (the next run recomputes everything) or restore it from a backup")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Table.
        table: &'static str,
        /// Key (decimal query index or hex content key).
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Another run holds the store.
    #[error("state store {path} is in use by another leverflow run; wait for it to finish or pass a different `state_dir`")]
    InUse {
        /// The state file.
        path: PathBuf,
    },
    /// The store was written by a newer leverflow.
    #[error("state store {path} has format version {found}, but this leverflow ({tool}) reads version {supported}: use a leverflow at least as new as the one that wrote it, or delete the state directory {dir} to start over (everything is recomputed)")]
    TooNew {
        /// The state file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Version found.
        found: u32,
        /// Version this build writes.
        supported: u32,
        /// This build's version.
        tool: &'static str,
    },
    /// The writer thread failed outside a commit.
    #[error("state store writer: {0}")]
    Writer(String),
    /// The state directory cannot be created.
    #[error("cannot create the state directory {dir}: {source}")]
    CreateDir {
        /// Directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What a query's finished record is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoredOutcome {
    /// The record's JSON bytes (as written to the JSON output).
    Record(Vec<u8>),
    /// The record's JSON bytes, zstd-compressed (how records are stored:
    /// about 6x smaller, so commits write far less; readers of
    /// [`StateStore::visit_records`] always get [`StoredOutcome::Record`]).
    Compressed(Vec<u8>),
    /// The query was skipped, with the reason.
    Skipped(String),
}

impl StoredOutcome {
    /// A record, compressed for storage (run on the workers, in parallel).
    pub fn compressed(json: &[u8]) -> Self {
        match record_codec::compress(json) {
            Ok(c) => StoredOutcome::Compressed(c),
            Err(_) => StoredOutcome::Record(json.to_vec()),
        }
    }
}

/// Everything the sink persists for one finished query: its record and the
/// newly computed results it depends on (cache entries), so that one
/// transaction stores a query's work atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryUpdate {
    /// Query index.
    pub query_index: u64,
    /// Key of the query's inputs ([`Key`] over everything the record
    /// depends on).
    pub input_key: Key,
    /// The finished record.
    pub outcome: StoredOutcome,
    /// A newly generated candidate set: (key, postcard bytes).
    pub candidates: Option<(Key, Vec<u8>)>,
    /// Newly computed VQA answers: (prompt key, postcard bytes).
    pub vqa: Vec<(Key, Vec<u8>)>,
}

impl QueryUpdate {
    /// Encodes for the dataflow exchange.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes what [`QueryUpdate::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("internal error: bad update ({e})"))
    }
}

/// The persistent store (see the module docs).
pub struct StateStore {
    db: Database,
    path: PathBuf,
    dir: PathBuf,
    migrated_from: Option<u32>,
}

/// The stored key of a cache entry: the query index (big-endian) before
/// the content key. Queries arrive in roughly ascending order, so a
/// commit's inserts land in a few neighbouring B-tree leaves instead of
/// touching (and, copy-on-write, rewriting) leaves all over the table, which
/// made commit cost grow with the table's size.
fn table_key(query_index: u64, key: &Key) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&query_index.to_be_bytes());
    k[8..].copy_from_slice(key);
    k
}

fn enc_record(input_key: &Key, outcome: &StoredOutcome) -> Vec<u8> {
    let mut v = Vec::with_capacity(33 + 64);
    v.extend_from_slice(input_key);
    match outcome {
        StoredOutcome::Record(b) => {
            v.push(0);
            v.extend_from_slice(b);
        }
        StoredOutcome::Skipped(reason) => {
            v.push(1);
            v.extend_from_slice(reason.as_bytes());
        }
        StoredOutcome::Compressed(b) => {
            v.push(2);
            v.extend_from_slice(b);
        }
    }
    v
}

impl StateStore {
    /// Opens (or creates) the store in `dir`, checking its format version.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(STATE_FILE);
        let unreadable = |detail: String| StateError::Unreadable {
            path: path.clone(),
            dir: dir.to_path_buf(),
            detail,
        };
        // redb asserts (panics) instead of returning an error on some damaged
        // files (e.g. one truncated below its header's recorded length):
        // turn that into the same clear error, without the panic message.
        // Only this call's panics are silenced: those of this thread while
        // it opens the file (the handler goes when `_quiet` drops).
        let opened = {
            let _quiet = crate::panics::on_this_thread(|_| true);
            std::panic::catch_unwind(|| Database::create(&path))
        };
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(StateError::InUse { path });
            }
            Ok(Err(e)) => return Err(unreadable(e.to_string())),
            Err(panic) => {
                let why = crate::panics::payload_text(panic.as_ref());
                return Err(unreadable(format!("damaged file ({why})")));
            }
        };
        let mut store = Self {
            db,
            path: path.clone(),
            dir: dir.to_path_buf(),
            migrated_from: None,
        };
        store.migrated_from = store.check_version()?;
        Ok(store)
    }

    /// The store in `dir` opened without a version check (tests write older
    /// formats with it).
    #[cfg(test)]
    fn open_unchecked(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            db: Database::create(dir.join(STATE_FILE)).unwrap(),
            path: dir.join(STATE_FILE),
            dir: dir.to_path_buf(),
            migrated_from: None,
        }
    }

    /// The older format version this store was migrated from when it was
    /// opened (`None`: it was current, or new). From a version before 3,
    /// every stored result was dropped: they are recomputed once.
    pub fn migrated_from(&self) -> Option<u32> {
        self.migrated_from
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn unreadable(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Unreadable {
            path: self.path.clone(),
            dir: self.dir.clone(),
            detail: e.to_string(),
        }
    }

    fn corrupt(&self, table: &'static str, key: String, detail: impl Into<String>) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            dir: self.dir.clone(),
            table,
            key,
            detail: detail.into(),
        }
    }

    /// Checks the format version, migrating an older store; returns the
    /// version migrated from.
    fn check_version(&self) -> Result<Option<u32>, StateError> {
        let mut migrated = None;
        let txn = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.unreadable(e))?;
            let found = match meta.get("format_version").map_err(|e| self.unreadable(e))? {
                Some(v) => {
                    let b = v.value();
                    let arr: [u8; 4] = b.try_into().map_err(|_| {
                        self.corrupt(
                            "meta",
                            "format_version".into(),
                            format!("{} bytes, expected 4", b.len()),
                        )
                    })?;
                    Some(u32::from_le_bytes(arr))
                }
                None => None,
            };
            match found {
                None => {
                    meta.insert(
                        "format_version",
                        STATE_FORMAT_VERSION.to_le_bytes().as_slice(),
                    )
                    .map_err(|e| self.unreadable(e))?;
                    meta.insert("created_by", env!("CARGO_PKG_VERSION").as_bytes())
                        .map_err(|e| self.unreadable(e))?;
                }
                Some(v) if v == STATE_FORMAT_VERSION => {}
                Some(old @ (1 | 2)) => {
                    if old == 1 {
                        self.migrate_v1(&txn)?;
                    }
                    self.drop_results(&txn)?;
                    meta.insert(
                        "format_version",
                        STATE_FORMAT_VERSION.to_le_bytes().as_slice(),
                    )
                    .map_err(|e| self.unreadable(e))?;
                    migrated = Some(old);
                }
                Some(v) if v > STATE_FORMAT_VERSION => {
                    return Err(StateError::TooNew {
                        path: self.path.clone(),
                        dir: self.dir.clone(),
                        found: v,
                        supported: STATE_FORMAT_VERSION,
                        tool: env!("CARGO_PKG_VERSION"),
                    })
                }
                // Version 1 is the first format: an older one cannot exist.
                // Later versions migrate above, inside this transaction.
                Some(v) => {
                    return Err(self.corrupt(
                        "meta",
                        "format_version".into(),
                        format!("unknown format version {v}"),
                    ))
                }
            }
            txn.open_table(RECORDS).map_err(|e| self.unreadable(e))?;
            txn.open_table(RECORD_KEYS)
                .map_err(|e| self.unreadable(e))?;
            txn.open_table(INPUTS).map_err(|e| self.unreadable(e))?;
            txn.open_table(CANDIDATES).map_err(|e| self.unreadable(e))?;
            txn.open_table(VQA).map_err(|e| self.unreadable(e))?;
            // Added after format version 1 shipped; older stores gain the
            // (empty) table here, which needs no migration.
            txn.open_table(OUTPUTS).map_err(|e| self.unreadable(e))?;
            txn.open_table(FILE_DIGESTS)
                .map_err(|e| self.unreadable(e))?;
        }
        txn.commit().map_err(|e| self.unreadable(e))?;
        Ok(migrated)
    }

    /// Format 2 -> 3: the content keys changed, so no stored result can be
    /// found again; their tables are emptied (space for the new ones).
    /// `inputs` stays: the next run's comparison then counts every query as
    /// changed, which is what its records are.
    fn drop_results(&self, txn: &redb::WriteTransaction) -> Result<(), StateError> {
        let fail = |e: redb::TableError| self.unreadable(e);
        txn.delete_table(RECORDS).map_err(fail)?;
        txn.delete_table(RECORD_KEYS).map_err(fail)?;
        txn.delete_table(CANDIDATES).map_err(fail)?;
        txn.delete_table(VQA).map_err(fail)?;
        txn.delete_table(OUTPUTS).map_err(fail)?;
        Ok(())
    }

    /// Format 1 -> 2: fills `record_keys` from the keys at the head of every
    /// stored record (inside the opening transaction: a crash leaves a
    /// version-1 store behind, which is migrated again next time).
    fn migrate_v1(&self, txn: &redb::WriteTransaction) -> Result<(), StateError> {
        let records = txn.open_table(RECORDS).map_err(|e| self.unreadable(e))?;
        let mut keys = txn
            .open_table(RECORD_KEYS)
            .map_err(|e| self.unreadable(e))?;
        for item in records.iter().map_err(|e| self.unreadable(e))? {
            let (k, v) = item.map_err(|e| self.unreadable(e))?;
            let q = k.value();
            let key = v
                .value()
                .get(..32)
                .ok_or_else(|| self.corrupt("records", q.to_string(), "value too short"))?;
            keys.insert(q, key).map_err(|e| self.unreadable(e))?;
        }
        Ok(())
    }

    /// The input-file digests remembered by earlier runs (see
    /// [`digests`]), ready to serve this run's.
    pub fn file_digests(&self) -> Result<FileDigests, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let table = txn
            .open_table(FILE_DIGESTS)
            .map_err(|e| self.unreadable(e))?;
        let mut known = std::collections::HashMap::new();
        for item in table.iter().map_err(|e| self.unreadable(e))? {
            let (k, v) = item.map_err(|e| self.unreadable(e))?;
            let path = path_from_key(k.value());
            let stored: StoredDigest = postcard::from_bytes(v.value()).map_err(|e| {
                self.corrupt("file_digests", path.display().to_string(), e.to_string())
            })?;
            known.insert(path, stored);
        }
        Ok(FileDigests::with_known(known))
    }

    /// Remembers the digests this run computed ([`FileDigests::fresh`]) for
    /// the next runs. One durable transaction; nothing when there are none.
    pub fn remember_file_digests(&self, digests: &FileDigests) -> Result<(), StateError> {
        let fresh = digests.fresh();
        if fresh.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        {
            let mut table = txn
                .open_table(FILE_DIGESTS)
                .map_err(|e| self.unreadable(e))?;
            for (path, stored) in &fresh {
                let value = postcard::to_stdvec(stored).map_err(|e| {
                    self.corrupt("file_digests", path.display().to_string(), e.to_string())
                })?;
                table
                    .insert(path.as_os_str().as_encoded_bytes(), value.as_slice())
                    .map_err(|e| self.unreadable(e))?;
            }
        }
        txn.commit().map_err(|e| self.unreadable(e))
    }

    /// The inputs of the last completed run: (query index, input key), in
    /// ascending query order.
    pub fn previous_inputs(&self) -> Result<Vec<(u64, Key)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let table = txn.open_table(INPUTS).map_err(|e| self.unreadable(e))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.unreadable(e))? {
            let (k, v) = item.map_err(|e| self.unreadable(e))?;
            let q = k.value();
            let key: Key = v
                .value()
                .try_into()
                .map_err(|_| self.corrupt("inputs", q.to_string(), "not a 32-byte key"))?;
            out.push((q, key));
        }
        Ok(out)
    }

    /// A consistent read view for cache lookups (cheap; one per batch).
    pub fn reader(&self) -> Result<StateReader<'_>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let open = |name| self.unreadable(format!("cannot open table {name}"));
        Ok(StateReader {
            record_keys: txn
                .open_table(RECORD_KEYS)
                .map_err(|_| open("record_keys"))?,
            candidates: txn.open_table(CANDIDATES).map_err(|_| open("candidates"))?,
            vqa: txn.open_table(VQA).map_err(|_| open("vqa"))?,
            store: self,
        })
    }

    /// Stores finished queries and their new cache entries in one
    /// transaction. With `durable`, the commit is fsynced (and so are all
    /// non-durable commits before it); without, it is atomic and visible to
    /// readers but a crash may undo it back to the last durable commit.
    pub fn commit_updates(&self, updates: &[QueryUpdate], durable: bool) -> Result<(), StateError> {
        if updates.is_empty() && !durable {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| self.unreadable(e))?;
        }
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| self.unreadable(e))?;
            let mut record_keys = txn
                .open_table(RECORD_KEYS)
                .map_err(|e| self.unreadable(e))?;
            let mut cands = txn.open_table(CANDIDATES).map_err(|e| self.unreadable(e))?;
            let mut vqa = txn.open_table(VQA).map_err(|e| self.unreadable(e))?;
            for u in updates {
                if let Some((k, v)) = &u.candidates {
                    cands
                        .insert(table_key(u.query_index, k).as_slice(), v.as_slice())
                        .map_err(|e| self.unreadable(e))?;
                }
                for (k, v) in &u.vqa {
                    vqa.insert(table_key(u.query_index, k).as_slice(), v.as_slice())
                        .map_err(|e| self.unreadable(e))?;
                }
                records
                    .insert(
                        u.query_index,
                        enc_record(&u.input_key, &u.outcome).as_slice(),
                    )
                    .map_err(|e| self.unreadable(e))?;
                record_keys
                    .insert(u.query_index, u.input_key.as_slice())
                    .map_err(|e| self.unreadable(e))?;
            }
        }
        txn.commit().map_err(|e| self.unreadable(e))
    }

    /// Stores VQA answers `(query, prompt key, postcard bytes)` at once,
    /// apart from their queries' records (a server's answers, kept even when
    /// the run stops before their queries finish). The commit is atomic; it
    /// is made durable by the writer's next durable commit.
    pub fn put_vqa(&self, answers: &[(u64, Key, Vec<u8>)]) -> Result<(), StateError> {
        if answers.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| self.unreadable(e))?;
        {
            let mut vqa = txn.open_table(VQA).map_err(|e| self.unreadable(e))?;
            for (q, k, v) in answers {
                vqa.insert(table_key(*q, k).as_slice(), v.as_slice())
                    .map_err(|e| self.unreadable(e))?;
            }
        }
        txn.commit().map_err(|e| self.unreadable(e))
    }

    /// The output manifest the last completed run stored with
    /// [`StateStore::complete_run`] (its format belongs to the caller).
    pub fn output_manifest(&self) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let table = txn.open_table(OUTPUTS).map_err(|e| self.unreadable(e))?;
        let v = table
            .get(OUTPUT_MANIFEST)
            .map_err(|e| self.unreadable(e))?
            .map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Completes a run: retracts the records of `removed` queries, makes
    /// `current` (every query of this run with its input key) the previous
    /// input of the next run, and stores the output manifest (`None`
    /// removes the previous one: outputs written without a manifest must
    /// never be described by an older one). One durable transaction.
    pub fn complete_run(
        &self,
        removed: &[u64],
        current: &[(u64, Key)],
        manifest: Option<&[u8]>,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.unreadable(e))?;
        {
            let mut outputs = txn.open_table(OUTPUTS).map_err(|e| self.unreadable(e))?;
            match manifest {
                Some(m) => outputs.insert(OUTPUT_MANIFEST, m),
                None => outputs.remove(OUTPUT_MANIFEST),
            }
            .map_err(|e| self.unreadable(e))?;
        }
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| self.unreadable(e))?;
            let mut record_keys = txn
                .open_table(RECORD_KEYS)
                .map_err(|e| self.unreadable(e))?;
            let mut inputs = txn.open_table(INPUTS).map_err(|e| self.unreadable(e))?;
            for q in removed {
                records.remove(*q).map_err(|e| self.unreadable(e))?;
                record_keys.remove(*q).map_err(|e| self.unreadable(e))?;
                inputs.remove(*q).map_err(|e| self.unreadable(e))?;
            }
            for (q, k) in current {
                let same = inputs
                    .get(*q)
                    .map_err(|e| self.unreadable(e))?
                    .is_some_and(|v| v.value() == k.as_slice());
                if !same {
                    inputs
                        .insert(*q, k.as_slice())
                        .map_err(|e| self.unreadable(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.unreadable(e))
    }

    /// Visits the stored records of `queries` (ascending) in ascending query
    /// order. A query without a record, or whose record was computed from
    /// other inputs than `queries` says, is an error: the run that should
    /// have produced it did not complete.
    pub fn visit_records<F, E>(&self, queries: &[(u64, Key)], mut f: F) -> Result<(), E>
    where
        F: FnMut(u64, StoredOutcome) -> Result<(), E>,
        E: From<StateError>,
    {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.unreadable(e))?;
        for (q, want) in queries {
            let v = table
                .get(*q)
                .map_err(|e| self.unreadable(e))?
                .ok_or_else(|| self.corrupt("records", q.to_string(), "missing after the run"))?;
            let (key, outcome) = self.decode_record(*q, v.value())?;
            if &key != want {
                return Err(self
                    .corrupt(
                        "records",
                        q.to_string(),
                        "computed from different inputs than this run's",
                    )
                    .into());
            }
            f(*q, outcome)?;
        }
        Ok(())
    }

    fn decode_record(&self, q: u64, b: &[u8]) -> Result<(Key, StoredOutcome), StateError> {
        if b.len() < 33 {
            return Err(self.corrupt("records", q.to_string(), "value too short"));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&b[..32]);
        let body = &b[33..];
        let outcome = match b[32] {
            0 => StoredOutcome::Record(body.to_vec()),
            1 => StoredOutcome::Skipped(String::from_utf8_lossy(body).into_owned()),
            2 => StoredOutcome::Record(record_codec::decompress(body).map_err(|e| {
                self.corrupt(
                    "records",
                    q.to_string(),
                    format!("compressed record does not decode ({e})"),
                )
            })?),
            t => {
                return Err(self.corrupt(
                    "records",
                    q.to_string(),
                    format!("unknown record tag {t}"),
                ))
            }
        };
        Ok((key, outcome))
    }

    /// Counts of the tables (for `stats` and the benchmarks).
    pub fn table_sizes(&self) -> Result<serde_json::Value, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.unreadable(e))?;
        let n = |r: Result<u64, redb::StorageError>| r.map_err(|e| self.unreadable(e));
        let records = n(txn
            .open_table(RECORDS)
            .map_err(|e| self.unreadable(e))?
            .len())?;
        let inputs = n(txn
            .open_table(INPUTS)
            .map_err(|e| self.unreadable(e))?
            .len())?;
        let cands = n(txn
            .open_table(CANDIDATES)
            .map_err(|e| self.unreadable(e))?
            .len())?;
        let vqa = n(txn.open_table(VQA).map_err(|e| self.unreadable(e))?.len())?;
        Ok(serde_json::json!({
            "records": records, "inputs": inputs, "candidate_sets": cands, "vqa_answers": vqa,
        }))
    }
}

/// A read view of the store (one per batch on each worker).
pub struct StateReader<'a> {
    record_keys: redb::ReadOnlyTable<u64, &'static [u8]>,
    candidates: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    vqa: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    store: &'a StateStore,
}

impl StateReader<'_> {
    /// Whether the stored record of `query_index` was computed from inputs
    /// with key `input_key` (then it can be reused as is).
    pub fn has_record(&self, query_index: u64, input_key: &Key) -> Result<bool, StateError> {
        let v = self
            .record_keys
            .get(query_index)
            .map_err(|e| self.store.unreadable(e))?;
        Ok(v.is_some_and(|v| v.value() == input_key.as_slice()))
    }

    /// A stored candidate set of a query.
    pub fn candidates<T: serde::de::DeserializeOwned>(
        &self,
        query_index: u64,
        key: &Key,
    ) -> Result<Option<T>, StateError> {
        self.get(&self.candidates, "candidates", query_index, key)
    }

    /// A stored VQA answer of a query's prompt.
    pub fn vqa<T: serde::de::DeserializeOwned>(
        &self,
        query_index: u64,
        key: &Key,
    ) -> Result<Option<T>, StateError> {
        self.get(&self.vqa, "vqa", query_index, key)
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
        name: &'static str,
        query_index: u64,
        key: &Key,
    ) -> Result<Option<T>, StateError> {
        match table
            .get(table_key(query_index, key).as_slice())
            .map_err(|e| self.store.unreadable(e))?
        {
            Some(v) => postcard::from_bytes(v.value())
                .map(Some)
                .map_err(|e| self.store.corrupt(name, key_hex(key), e.to_string())),
            None => Ok(None),
        }
    }
}

/// [`encode_value`], zstd-compressed: for large values such as a run's
/// output manifest.
pub fn encode_value_compressed<T: Serialize>(v: &T) -> Vec<u8> {
    zstd::stream::encode_all(encode_value(v).as_slice(), 3).unwrap_or_default()
}

/// Decodes a value written by [`encode_value_compressed`] (`None` if it does
/// not decode as a `T`).
pub fn decode_value_compressed<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    decode_value(&zstd::stream::decode_all(bytes).ok()?)
}

/// Decodes a value written by [`encode_value`] (`None` if it does not
/// decode as a `T`).
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

/// Encodes a cache value (postcard) for [`QueryUpdate`].
pub fn encode_value<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// The path of a `file_digests` key (the bytes of an absolute path as this
/// platform encodes it; written by this platform only).
fn path_from_key(bytes: &[u8]) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
    }
}
