//! Reading `torch.save` zip archives (PyTorch >= 1.6 format): the pickle in
//! `<archive>/data.pkl` plus one storage file per tensor storage in
//! `<archive>/data/<key>`.  The archive is memory-mapped; stored (uncompressed)
//! storages, which is what `torch.save` writes, are read in place.
//!
//! Hostile archives are bounded by the archive's real size, never by sizes
//! written in it:
//! * a compressed entry (`torch.save` never writes one; it appears when an
//!   archive was re-zipped) may expand at most [`MAX_COMPRESSION_RATIO`]
//!   times its compressed size and to at most [`MAX_ENTRY_BYTES`]; all
//!   entries decompressed from one archive together at most
//!   [`MAX_COMPRESSION_RATIO`] times the archive's size (so a storage
//!   decompressed again for each of many tensors is bounded too);
//! * a tensor may not have more elements than its storage holds (views
//!   that repeat storage elements, such as a broadcast `expand` with
//!   stride 0, are refused) nor read past it, with every product checked;
//! * all tensors materialised from one archive together hold at most
//!   [`MAX_OUTPUT_PER_BYTE`] bytes of `f32` per archive byte plus
//!   [`OUTPUT_ALLOWANCE`] (several tensor entries may point at one storage).

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::pickle::{self, StorageDtype, TensorRef, Value};
use super::TensorIoError;

/// Largest expansion of a compressed entry over its compressed size.
pub const MAX_COMPRESSION_RATIO: u64 = 64;
/// Largest decompressed size of one entry (2 GiB).
pub const MAX_ENTRY_BYTES: u64 = 2 << 30;
/// Bytes of `f32` output allowed per byte of archive.
pub const MAX_OUTPUT_PER_BYTE: usize = 8;
/// Bytes of `f32` output every archive may produce beyond
/// [`MAX_OUTPUT_PER_BYTE`] (64 MiB).
pub const OUTPUT_ALLOWANCE: usize = 64 << 20;
/// Decompressed bytes every archive may produce beyond its ratio (1 MiB).
const DECOMPRESSED_ALLOWANCE: u64 = 1 << 20;

struct Entry {
    start: usize,
    size: u64,
    compressed_size: u64,
    stored: bool,
}

/// An opened torch zip archive with its decoded pickle.
pub struct TorchArchive {
    path: PathBuf,
    mmap: Mmap,
    entries: HashMap<String, Entry>,
    prefix: String,
    /// Bytes decompressed so far (bounded, see the module documentation).
    decompressed: Cell<u64>,
    /// Bytes of `f32` materialised so far by [`TorchArchive::tensor_f32`].
    materialised: Cell<usize>,
    /// The decoded top-level pickle value.
    pub root: Value,
}

fn fmt_err(path: &Path, msg: impl std::fmt::Display) -> TensorIoError {
    TensorIoError::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

impl TorchArchive {
    /// Opens `path`, indexes the zip and decodes `data.pkl`.
    pub fn open(path: &Path) -> Result<Self, TensorIoError> {
        let file = File::open(path).map_err(|e| TensorIoError::io(path, e))?;
        // SAFETY: the file is opened read-only and only read through this map;
        // like every memory-mapped reader we assume it is not truncated by
        // another process while we read it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| TensorIoError::io(path, e))?;
        if mmap.len() >= 2 && mmap[0] == 0x80 {
            return Err(fmt_err(
                path,
                "legacy (pre-1.6, non-zip) torch.save format is not supported; re-save with a recent PyTorch",
            ));
        }
        let mut archive = zip::ZipArchive::new(Cursor::new(&mmap[..]))
            .map_err(|e| fmt_err(path, format!("not a PyTorch zip archive (torch.save): {e}")))?;
        let mut entries = HashMap::new();
        let mut pkl: Option<String> = None;
        for i in 0..archive.len() {
            let f = archive
                .by_index(i)
                .map_err(|e| fmt_err(path, format!("corrupt zip entry {i}: {e}")))?;
            let name = f.name().to_string();
            let stored = f.compression() == zip::CompressionMethod::Stored;
            let start = usize::try_from(f.data_start())
                .map_err(|_| fmt_err(path, format!("zip entry {name}: offset out of range")))?;
            let size = f.size();
            let compressed_size = f.compressed_size();
            if name.ends_with("data.pkl") && pkl.as_ref().is_none_or(|p| name.len() < p.len()) {
                pkl = Some(name.clone());
            }
            entries.insert(
                name,
                Entry {
                    start,
                    size,
                    compressed_size,
                    stored,
                },
            );
        }
        let pkl =
            pkl.ok_or_else(|| fmt_err(path, "zip archive has no data.pkl: not a torch.save file"))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut me = TorchArchive {
            path: path.to_path_buf(),
            mmap,
            entries,
            prefix,
            decompressed: Cell::new(0),
            materialised: Cell::new(0),
            root: Value::None,
        };
        let bytes = me.entry_bytes(&pkl)?;
        me.root = pickle::parse(&bytes).map_err(|e| fmt_err(path, format!("data.pkl: {e}")))?;
        Ok(me)
    }

    fn entry_bytes(&self, name: &str) -> Result<std::borrow::Cow<'_, [u8]>, TensorIoError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| fmt_err(&self.path, format!("missing zip entry {name}")))?;
        if e.stored {
            let end = usize::try_from(e.size)
                .ok()
                .and_then(|size| e.start.checked_add(size));
            let Some(end) = end.filter(|&end| end <= self.mmap.len()) else {
                return Err(fmt_err(
                    &self.path,
                    format!("zip entry {name} is truncated"),
                ));
            };
            return Ok(std::borrow::Cow::Borrowed(&self.mmap[e.start..end]));
        }
        // A compressed entry: its size in the header is a claim, not a
        // fact. The output is bounded by the compressed size (a ratio), an
        // absolute cap and what is left of the archive's allowance; memory
        // grows with the bytes actually decompressed, never with the claim.
        let archive_len = self.mmap.len() as u64;
        let total_limit = archive_len
            .saturating_mul(MAX_COMPRESSION_RATIO)
            .saturating_add(DECOMPRESSED_ALLOWANCE);
        let left = total_limit.saturating_sub(self.decompressed.get());
        let limit = e
            .compressed_size
            .min(archive_len)
            .saturating_mul(MAX_COMPRESSION_RATIO)
            .saturating_add(DECOMPRESSED_ALLOWANCE)
            .min(MAX_ENTRY_BYTES)
            .min(left);
        if e.size > limit {
            return Err(fmt_err(
                &self.path,
                format!(
                    "zip entry {name} claims {} bytes decompressed from {} bytes: more than the \
                     {limit} bytes allowed (at most {MAX_COMPRESSION_RATIO}x the compressed size, \
                     {MAX_ENTRY_BYTES} bytes per entry)",
                    e.size, e.compressed_size
                ),
            ));
        }
        let mut archive = zip::ZipArchive::new(Cursor::new(&self.mmap[..]))
            .map_err(|err| fmt_err(&self.path, err))?;
        let f = archive
            .by_name(name)
            .map_err(|err| fmt_err(&self.path, format!("zip entry {name}: {err}")))?;
        // `take(limit + 1)`: one byte more than allowed tells "too large"
        // from "exactly at the limit" without reading further.
        let mut buf = Vec::new();
        f.take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|err| fmt_err(&self.path, format!("zip entry {name}: {err}")))?;
        let got = buf.len() as u64;
        self.decompressed
            .set(self.decompressed.get().saturating_add(got));
        if got > limit {
            return Err(fmt_err(
                &self.path,
                format!(
                    "zip entry {name} decompresses to more than {limit} bytes (at most \
                     {MAX_COMPRESSION_RATIO}x its {} compressed bytes, {MAX_ENTRY_BYTES} bytes per entry)",
                    e.compressed_size
                ),
            ));
        }
        if got != e.size {
            return Err(fmt_err(
                &self.path,
                format!(
                    "zip entry {name} decompresses to {got} bytes, its header says {}",
                    e.size
                ),
            ));
        }
        Ok(std::borrow::Cow::Owned(buf))
    }

    /// Materialises `t` as row-major f32 values (any strides; f32/f16/bf16/f64).
    ///
    /// The tensor must lie inside its storage and have at most as many
    /// elements as the storage: views that repeat storage elements (a
    /// broadcast `expand`, stride 0) are refused. Sizes are checked
    /// products, never wrapped.
    pub fn tensor_f32(&self, t: &TensorRef, what: &str) -> Result<Vec<f32>, TensorIoError> {
        let name = format!("{}data/{}", self.prefix, t.key);
        let es = t.dtype.size().max(1);
        let Some(numel) = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        else {
            return Err(fmt_err(
                &self.path,
                format!(
                    "{what}: shape {:?} has more elements than fit in memory",
                    t.shape
                ),
            ));
        };
        if numel == 0 {
            return Ok(vec![]);
        }
        let bytes = self.entry_bytes(&name)?;
        let n_storage = bytes.len() / es;
        if numel > n_storage {
            return Err(fmt_err(
                &self.path,
                format!(
                    "{what}: shape {:?} has {numel} elements but its storage {name} holds {n_storage}: \
                     a tensor may not have more elements than its storage (broadcast views with \
                     stride 0 are not supported)",
                    t.shape
                ),
            ));
        }
        // Largest element index read: offset + sum((size - 1) * stride),
        // every step checked (all sizes are >= 1 here since numel > 0).
        let max_index = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&s, &st)| {
                (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
            });
        let Some(max_index) = max_index.filter(|&m| m < n_storage) else {
            return Err(fmt_err(
                &self.path,
                format!(
                    "{what}: tensor extends past its storage {name} (offset {}, shape {:?}, stride {:?}; {n_storage} elements present)",
                    t.offset, t.shape, t.stride
                ),
            ));
        };
        let out_bytes = numel.saturating_mul(std::mem::size_of::<f32>());
        let limit = self
            .mmap
            .len()
            .saturating_mul(MAX_OUTPUT_PER_BYTE)
            .saturating_add(OUTPUT_ALLOWANCE);
        let total = self.materialised.get().saturating_add(out_bytes);
        if total > limit {
            return Err(fmt_err(
                &self.path,
                format!(
                    "{what}: the tensors read from this archive would take {total} bytes, more than \
                     {MAX_OUTPUT_PER_BYTE}x the archive's {} bytes + {} MiB (tensors repeating one storage?)",
                    self.mmap.len(),
                    OUTPUT_ALLOWANCE >> 20
                ),
            ));
        }
        self.materialised.set(total);
        debug_assert!(max_index < n_storage);
        let read: fn(&[u8]) -> f32 = match t.dtype {
            StorageDtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::F64 => |b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                f64::from_le_bytes(a) as f32
            },
            StorageDtype::Other(n, _) => {
                return Err(fmt_err(
                    &self.path,
                    format!("{what}: dtype {n} is not a floating-point tensor"),
                ))
            }
        };
        // Contiguous row-major: one linear pass.
        let mut expect = 1usize;
        let mut contiguous = true;
        for (s, st) in t.shape.iter().zip(&t.stride).rev() {
            if *s > 1 && *st != expect {
                contiguous = false;
            }
            expect *= s;
        }
        if contiguous {
            let b = &bytes[t.offset * es..(t.offset + numel) * es];
            return Ok(b.chunks_exact(es).map(read).collect());
        }
        let mut out = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let off = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.push(read(&bytes[off * es..(off + 1) * es]));
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}
