//! Reading `torch.save` zip archives (PyTorch >= 1.6 format): the pickle in
//! `<archive>/data.pkl` plus one storage file per tensor storage in
//! `<archive>/data/<key>`.  The archive is memory-mapped; stored (uncompressed)
//! storages, which is what `torch.save` writes, are read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::pickle::{self, StorageDtype, TensorRef, Value};
use super::TensorIoError;

struct Entry {
    start: usize,
    size: usize,
    stored: bool,
}

/// An opened torch zip archive with its decoded pickle.
pub struct TorchArchive {
    path: PathBuf,
    mmap: Mmap,
    entries: HashMap<String, Entry>,
    prefix: String,
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
            let start = f.data_start() as usize;
            let size = f.size() as usize;
            if name.ends_with("data.pkl") && pkl.as_ref().is_none_or(|p| name.len() < p.len()) {
                pkl = Some(name.clone());
            }
            entries.insert(
                name,
                Entry {
                    start,
                    size,
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
            let end = e.start.saturating_add(e.size);
            if end > self.mmap.len() {
                return Err(fmt_err(
                    &self.path,
                    format!("zip entry {name} is truncated"),
                ));
            }
            return Ok(std::borrow::Cow::Borrowed(&self.mmap[e.start..end]));
        }
        let mut archive = zip::ZipArchive::new(Cursor::new(&self.mmap[..]))
            .map_err(|err| fmt_err(&self.path, err))?;
        let mut f = archive
            .by_name(name)
            .map_err(|err| fmt_err(&self.path, format!("zip entry {name}: {err}")))?;
        let mut buf = Vec::with_capacity(e.size);
        f.read_to_end(&mut buf)
            .map_err(|err| fmt_err(&self.path, format!("zip entry {name}: {err}")))?;
        Ok(std::borrow::Cow::Owned(buf))
    }

    /// Materialises `t` as row-major f32 values (any strides; f32/f16/bf16/f64).
    pub fn tensor_f32(&self, t: &TensorRef, what: &str) -> Result<Vec<f32>, TensorIoError> {
        let name = format!("{}data/{}", self.prefix, t.key);
        let bytes = self.entry_bytes(&name)?;
        let es = t.dtype.size();
        let n_storage = bytes.len() / es;
        let numel: usize = t.shape.iter().product();
        if numel == 0 {
            return Ok(vec![]);
        }
        let max_index = t.offset
            + t.shape
                .iter()
                .zip(&t.stride)
                .map(|(s, st)| (s - 1) * st)
                .sum::<usize>();
        if max_index >= n_storage {
            return Err(fmt_err(
                &self.path,
                format!(
                    "{what}: tensor extends past its storage {name} ({} elements needed, {n_storage} present)",
                    max_index + 1
                ),
            ));
        }
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
