//! Weights of a Hugging Face Qwen2.5-VL checkpoint directory.
//!
//! A [`WeightStore`] reads the headers of `model.safetensors` (or of every
//! shard listed in `model.safetensors.index.json`) and then reads single
//! tensors on demand, with plain file reads in chunks: as `f32`, or, for a
//! bf16 tensor, as its 16-bit words ([`WeightStore::read_bf16`]). Nothing
//! stays mapped, so the pages of the files never count towards the
//! process's memory, and no tensor is held twice while it is converted.
//!
//! Key names are normalised to one canonical form, the *published* layout of
//! the Qwen2.5-VL checkpoints (`model.layers.*`, `model.embed_tokens.weight`,
//! `model.norm.weight`, `visual.*`, `lm_head.weight`).  Checkpoints saved by
//! newer transformers (`model.language_model.*`, `model.visual.*`) are
//! accepted too: their keys are renamed on open, and queries may use either
//! spelling.

use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Canonical name of the LM head.
pub const LM_HEAD: &str = "lm_head.weight";
/// Canonical name of the token embedding (the LM head when tied).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// A bf16 tensor's words (row-major) and its shape.
pub type Bf16Tensor = (Vec<u16>, Vec<usize>);
/// Bytes per read of [`WeightStore`] (a multiple of every element size).
const READ_CHUNK: usize = 1 << 20;

/// Errors while opening a checkpoint or reading a tensor from it.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file could not be opened, read or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A safetensors file has an invalid header.
    #[error("{path}: invalid safetensors file: {message}")]
    Format {
        /// File that failed.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The shard index is malformed.
    #[error("{path}: invalid shard index: {message}")]
    Index {
        /// Index file.
        path: PathBuf,
        /// What is wrong (naming the key).
        message: String,
    },
    /// Neither `model.safetensors` nor an index exists in the directory.
    #[error("{dir}: no {SINGLE_FILE} or {INDEX_FILE}")]
    NoCheckpoint {
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor is absent from the checkpoint.
    #[error("{dir}: missing tensor `{key}`")]
    Missing {
        /// Checkpoint directory.
        dir: PathBuf,
        /// Canonical key.
        key: String,
    },
    /// A tensor has an unexpected shape.
    #[error("tensor `{key}` in {path}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// File holding the tensor.
        path: PathBuf,
        /// Canonical key.
        key: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor's dtype cannot be converted to `f32`.
    #[error("tensor `{key}` in {path}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// File holding the tensor.
        path: PathBuf,
        /// Canonical key.
        key: String,
        /// Stored dtype.
        dtype: String,
    },
    /// Several tensors are missing or mis-shaped (from [`WeightStore::check_all`]).
    #[error("{dir}: {} tensor problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Check {
        /// Checkpoint directory.
        dir: PathBuf,
        /// One line per missing or mis-shaped tensor, naming its key.
        problems: Vec<String>,
    },
}

/// One safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// Where a canonical tensor lives.
#[derive(Debug, Clone)]
struct Location {
    shard: usize,
    /// Key as spelled in the file.
    file_key: String,
}

/// Memory-mapped weights of a checkpoint directory, read per tensor as `f32`.
pub struct WeightStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, Location>,
    tie_word_embeddings: bool,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .field("tie_word_embeddings", &self.tie_word_embeddings)
            .finish()
    }
}

/// Maps a key of either layout to the canonical (published) spelling:
/// `model.language_model.X` -> `model.X`, `model.visual.X` -> `visual.X`.
pub fn canonical_name(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        key.to_string()
    }
}

/// Whether `name` is one normal path component (`model-00001.safetensors`):
/// not empty, no separator of any platform, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) && !name.contains(['/', '\\', '\0'])
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_shard(path: &Path) -> Result<Shard, WeightsError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the file is mapped only while its header is parsed, and
    // treated as read-only meanwhile; modifying it then is a caller error,
    // as with any memory-mapped model loader. Only the header's pages are
    // touched (the parser checks the data offsets against the file's size).
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: 8 + header_len,
        metadata,
    })
}

impl WeightStore {
    /// Opens a checkpoint directory: the shards named by
    /// `model.safetensors.index.json` if present, else `model.safetensors`.
    /// `tie_word_embeddings` (from `config.json`) decides whether a missing
    /// `lm_head.weight` falls back to the token embedding.
    pub fn open(dir: &Path, tie_word_embeddings: bool) -> Result<Self, WeightsError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let bad = |message: String| WeightsError::Index {
                path: index_path.clone(),
                message,
            };
            let root: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad(format!("invalid JSON at line {}: {e}", e.line())))?;
            let map = root
                .get("weight_map")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| bad("missing object `weight_map`".into()))?;
            let mut shard_of_file: HashMap<String, usize> = HashMap::new();
            for (key, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("`weight_map.{key}` is not a file name")))?;
                // Only a plain file name inside the model directory: an
                // absolute path or `..` would map any file of the machine.
                if !is_plain_file_name(file) {
                    return Err(bad(format!(
                        "`weight_map.{key}` is {file:?}: shard names must be plain file names \
                         inside the model directory (no path separators, `..` or absolute paths)"
                    )));
                }
                let shard = match shard_of_file.get(file) {
                    Some(&s) => s,
                    None => {
                        shards.push(open_shard(&dir.join(file))?);
                        shard_of_file.insert(file.to_string(), shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if shards[shard].metadata.info(key).is_none() {
                    return Err(bad(format!(
                        "`{key}` is mapped to {file}, which does not contain it"
                    )));
                }
                index.entry(canonical_name(key)).or_insert(Location {
                    shard,
                    file_key: key.clone(),
                });
            }
        } else if single_path.is_file() {
            let shard = open_shard(&single_path)?;
            let mut keys: Vec<String> = shard.metadata.tensors().into_keys().collect();
            keys.sort();
            for key in keys {
                index.entry(canonical_name(&key)).or_insert(Location {
                    shard: 0,
                    file_key: key,
                });
            }
            shards.push(shard);
        } else {
            return Err(WeightsError::NoCheckpoint {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            tie_word_embeddings,
        })
    }

    /// Checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Canonical names of every stored tensor, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// Resolves a key of either layout to its stored location, applying the
    /// tied-embedding fallback for `lm_head.weight`.
    fn locate(&self, name: &str) -> Result<&Location, WeightsError> {
        let canon = canonical_name(name);
        if let Some(loc) = self.index.get(&canon) {
            return Ok(loc);
        }
        if canon == LM_HEAD && self.tie_word_embeddings {
            if let Some(loc) = self.index.get(EMBED_TOKENS) {
                return Ok(loc);
            }
        }
        Err(WeightsError::Missing {
            dir: self.dir.clone(),
            key: canon,
        })
    }

    /// Whether a tensor can be read (with the tied LM head fallback).
    pub fn contains(&self, name: &str) -> bool {
        self.locate(name).is_ok()
    }

    /// Stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        let loc = self.locate(name)?;
        Ok(self.info(loc).shape.clone())
    }

    fn info(&self, loc: &Location) -> &safetensors::tensor::TensorInfo {
        // The index only holds keys present in their shard's header.
        self.shards[loc.shard]
            .metadata
            .info(&loc.file_key)
            .unwrap_or_else(|| unreachable!("indexed key {} not in its shard", loc.file_key))
    }

    /// Reads a tensor converted to `f32` (row-major) with its stored shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightsError> {
        let loc = self.locate(name)?;
        let info = self.info(loc);
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F64 => 8,
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    path: self.shards[loc.shard].path.clone(),
                    key: canonical_name(name),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let mut values = Vec::with_capacity((end - start) / width);
        self.read_chunks(loc, &mut |bytes| match info.dtype {
            Dtype::F32 => values.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::BF16 => values.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            Dtype::F16 => values.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            _ => values.extend(bytes.chunks_exact(8).map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })),
        })?;
        Ok((values, info.shape.clone()))
    }

    /// The words of a tensor stored in bf16, with its stored shape; `None`
    /// when it is stored in another dtype. The words are read into their
    /// final buffer: no other copy exists at any time.
    pub fn read_bf16(&self, name: &str) -> Result<Option<Bf16Tensor>, WeightsError> {
        let loc = self.locate(name)?;
        let info = self.info(loc);
        if info.dtype != Dtype::BF16 {
            return Ok(None);
        }
        let (start, end) = info.data_offsets;
        let mut words = Vec::with_capacity((end - start) / 2);
        self.read_chunks(loc, &mut |bytes| {
            words.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            )
        })?;
        Ok(Some((words, info.shape.clone())))
    }

    /// The dtype a tensor is stored in.
    pub fn dtype(&self, name: &str) -> Result<Dtype, WeightsError> {
        let loc = self.locate(name)?;
        Ok(self.info(loc).dtype)
    }

    /// Streams the bytes of a tensor to `f` in chunks of at most
    /// [`READ_CHUNK`] bytes, each a whole number of elements (plain reads,
    /// no mapping).
    fn read_chunks(&self, loc: &Location, f: &mut dyn FnMut(&[u8])) -> Result<(), WeightsError> {
        use std::io::{Read, Seek, SeekFrom};
        let shard = &self.shards[loc.shard];
        let info = self.info(loc);
        let (start, end) = info.data_offsets;
        let bad = |message: String| WeightsError::Format {
            path: shard.path.clone(),
            message,
        };
        let first = shard
            .data_start
            .checked_add(start)
            .and_then(|x| u64::try_from(x).ok())
            .ok_or_else(|| bad(format!("tensor `{}`: offset out of range", loc.file_key)))?;
        let mut file = std::fs::File::open(&shard.path).map_err(io_err(&shard.path))?;
        file.seek(SeekFrom::Start(first))
            .map_err(io_err(&shard.path))?;
        let mut left = end.checked_sub(start).ok_or_else(|| {
            bad(format!(
                "tensor `{}`: data offsets out of order",
                loc.file_key
            ))
        })?;
        let mut buf = vec![0u8; READ_CHUNK.min(left)];
        while left > 0 {
            let n = READ_CHUNK.min(left);
            file.read_exact(&mut buf[..n])
                .map_err(io_err(&shard.path))?;
            f(&buf[..n]);
            left -= n;
        }
        Ok(())
    }

    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), WeightsError> {
        let loc = self.locate(name)?;
        let found = &self.info(loc).shape;
        if found.as_slice() != expected {
            return Err(WeightsError::ShapeMismatch {
                path: self.shards[loc.shard].path.clone(),
                key: canonical_name(name),
                expected: expected.to_vec(),
                found: found.clone(),
            });
        }
        Ok(())
    }

    /// Loads a tensor as an `f32` burn tensor after checking that its stored
    /// shape is exactly `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, WeightsError> {
        self.check_shape(name, &shape)?;
        let (values, _) = self.read_f32(name)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// Loads a Hugging Face linear layer `{prefix}.weight` [d_out, d_in]
    /// (and `{prefix}.bias` `[d_out]` when `bias`) as a burn [`Linear`]
    /// (whose weight is stored transposed, [d_in, d_out]).
    pub fn linear<B: Backend>(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>, WeightsError> {
        let key = format!("{prefix}.weight");
        let weight = match self.host_bf16_linear::<B>(&key, d_in, d_out)? {
            Some(w) => w,
            None => {
                let w: Tensor<B, 2> = self.tensor(&key, [d_out, d_in], device)?;
                w.transpose()
            }
        };
        let bias = if bias {
            let b: Tensor<B, 1> = self.tensor(&format!("{prefix}.bias"), [d_out], device)?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// On the host backend, the weight `key` [d_out, d_in] of a linear
    /// layer held in bf16 as the checkpoint stores it (see
    /// `host_bf16::bf16_linear_weight`); `None` when it is stored in
    /// another dtype or `B` is not the host backend.
    fn host_bf16_linear<B: Backend>(
        &self,
        key: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Option<Tensor<B, 2>>, WeightsError> {
        if !super::host::is_host::<B>() || self.dtype(key)? != Dtype::BF16 {
            return Ok(None);
        }
        self.check_shape(key, &[d_out, d_in])?;
        let Some((words, _)) = self.read_bf16(key)? else {
            return Ok(None);
        };
        Ok(super::host_bf16::bf16_linear_weight::<B>(
            words, d_out, d_in,
        ))
    }

    /// Streams the rows of a bf16 matrix `key` [rows, d] to `f` as
    /// (first row, whole rows), a few at a time, so a caller can re-lay it
    /// while it is read. `false` (nothing read) when it is not stored in
    /// bf16.
    pub fn bf16_rows(
        &self,
        key: &str,
        shape: [usize; 2],
        f: &mut dyn FnMut(usize, &[u16]),
    ) -> Result<bool, WeightsError> {
        if self.dtype(key)? != Dtype::BF16 {
            return Ok(false);
        }
        self.check_shape(key, &shape)?;
        let d = shape[1].max(1);
        let loc = self.locate(key)?;
        let mut pending: Vec<u16> = Vec::with_capacity(READ_CHUNK / 2 + d);
        let mut row = 0usize;
        self.read_chunks(loc, &mut |bytes| {
            pending.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]])),
            );
            let full = pending.len() / d * d;
            if full > 0 {
                f(row, &pending[..full]);
                row += full / d;
                pending.drain(..full);
            }
        })?;
        Ok(true)
    }

    /// Loads an RMSNorm weight `name` `[d]` as a burn [`RmsNorm`] with `eps`
    /// (same formula as transformers' Qwen2RMSNorm in f32).
    pub fn rms_norm<B: Backend>(
        &self,
        name: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<RmsNorm<B>, WeightsError> {
        let gamma: Tensor<B, 1> = self.tensor(name, [d], device)?;
        Ok(RmsNorm {
            gamma: Param::from_tensor(gamma),
            epsilon: eps,
        })
    }

    /// Checks every tensor the model needs (see [`expected_shapes`]) and
    /// reports all missing or mis-shaped ones at once.
    pub fn check_all(&self, config: &Qwen25VlConfig) -> Result<(), WeightsError> {
        let mut problems = Vec::new();
        for (name, shape) in expected_shapes(config) {
            match self.check_shape(&name, &shape) {
                Ok(()) => {}
                Err(WeightsError::Missing { key, .. }) => problems.push(format!("missing `{key}`")),
                Err(WeightsError::ShapeMismatch {
                    key,
                    expected,
                    found,
                    ..
                }) => problems.push(format!(
                    "`{key}`: expected shape {expected:?}, found {found:?}"
                )),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Check {
                dir: self.dir.clone(),
                problems,
            })
        }
    }
}

/// Every tensor of the Qwen2.5-VL model with its expected shape, in canonical
/// names (`lm_head.weight` included; it resolves to the embedding when tied).
pub fn expected_shapes(config: &Qwen25VlConfig) -> Vec<(String, Vec<usize>)> {
    let t = &config.text;
    let h = t.hidden_size;
    let hd = t.head_dim();
    let q = t.num_attention_heads * hd;
    let kv = t.num_key_value_heads * hd;
    let i = t.intermediate_size;
    let mut out: Vec<(String, Vec<usize>)> = vec![(EMBED_TOKENS.into(), vec![t.vocab_size, h])];
    for l in 0..t.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    out.push((LM_HEAD.into(), vec![t.vocab_size, h]));

    let v = &config.vision;
    let d = v.hidden_size;
    let vi = v.intermediate_size;
    let merged = d * v.spatial_merge_size * v.spatial_merge_size;
    out.push((
        "visual.patch_embed.proj.weight".into(),
        vec![
            d,
            v.in_chans,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    ));
    for b in 0..v.depth {
        let p = format!("visual.blocks.{b}.");
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm2.weight", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("mlp.gate_proj.weight", vec![vi, d]),
            ("mlp.gate_proj.bias", vec![vi]),
            ("mlp.up_proj.weight", vec![vi, d]),
            ("mlp.up_proj.bias", vec![vi]),
            ("mlp.down_proj.weight", vec![d, vi]),
            ("mlp.down_proj.bias", vec![d]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    for (name, shape) in [
        ("visual.merger.ln_q.weight", vec![d]),
        ("visual.merger.mlp.0.weight", vec![merged, merged]),
        ("visual.merger.mlp.0.bias", vec![merged]),
        (
            "visual.merger.mlp.2.weight",
            vec![v.out_hidden_size, merged],
        ),
        ("visual.merger.mlp.2.bias", vec![v.out_hidden_size]),
    ] {
        out.push((name.into(), shape));
    }
    out
}

/// The shared weight store feeds the language-model loader.
impl super::text::TensorSource for WeightStore {
    fn tensor_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, super::text::TextError> {
        let (data, found) = self
            .read_f32(key)
            .map_err(|e| super::text::TextError::Weight {
                key: key.to_string(),
                message: e.to_string(),
            })?;
        if found != shape {
            return Err(super::text::TextError::Weight {
                key: key.to_string(),
                message: format!("expected shape {shape:?}, found {found:?}"),
            });
        }
        Ok(data)
    }

    fn tensor_bf16(
        &self,
        key: &str,
        shape: &[usize],
    ) -> Result<Option<Vec<u16>>, super::text::TextError> {
        let weight_err = |e: WeightsError| super::text::TextError::Weight {
            key: key.to_string(),
            message: e.to_string(),
        };
        self.check_shape(key, shape).map_err(weight_err)?;
        Ok(self.read_bf16(key).map_err(weight_err)?.map(|(w, _)| w))
    }

    fn bf16_rows(
        &self,
        key: &str,
        shape: [usize; 2],
        f: &mut dyn FnMut(usize, &[u16]),
    ) -> Result<bool, super::text::TextError> {
        WeightStore::bf16_rows(self, key, shape, f).map_err(|e| super::text::TextError::Weight {
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    /// Stored under this name: unlike [`WeightStore::contains`], a tied
    /// `lm_head.weight` that only resolves to the embedding is not held, so
    /// the loader keeps one copy instead of reading the embedding twice.
    fn contains(&self, key: &str) -> bool {
        self.index.contains_key(&canonical_name(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use safetensors::tensor::TensorView;

    type B = NdArray<f32>;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny")
    }

    fn fixture_config() -> Qwen25VlConfig {
        Qwen25VlConfig::from_file(&fixture_dir().join("config.json")).unwrap()
    }

    #[test]
    fn shard_names_must_be_plain_file_names() {
        // A shard outside the model directory: the old reader mapped it.
        let outside = tempfile::tempdir().unwrap();
        let bytes = [0u8; 16];
        let view = TensorView::new(Dtype::F32, vec![4], &bytes).unwrap();
        let shard = outside.path().join("evil.safetensors");
        safetensors::serialize_to_file(vec![("w", view)], None, &shard).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let escape = format!(
            "{}/evil.safetensors",
            Path::new("..")
                .join(outside.path().file_name().unwrap())
                .display()
        );
        for file in [
            shard.display().to_string(),
            escape,
            "..".to_string(),
            "sub/model.safetensors".to_string(),
            String::new(),
        ] {
            let index = serde_json::json!({"weight_map": {"w": file}});
            std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
            let e = WeightStore::open(dir.path(), false).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, WeightsError::Index { .. }), "{file}: {msg}");
            assert!(
                msg.contains(INDEX_FILE)
                    && msg.contains("weight_map.w")
                    && msg.contains("plain file names"),
                "{msg}"
            );
        }
        // A plain name inside the directory is read.
        std::fs::copy(&shard, dir.path().join("evil.safetensors")).unwrap();
        let index = serde_json::json!({"weight_map": {"w": "evil.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let store = WeightStore::open(dir.path(), false).unwrap();
        assert_eq!(store.read_f32("w").unwrap().1, vec![4]);
    }

    #[test]
    fn loads_fixture_and_checks_all() {
        let config = fixture_config();
        let store = WeightStore::open(&fixture_dir(), config.text.tie_word_embeddings).unwrap();
        store.check_all(&config).unwrap();
        let dev = Default::default();
        let norm: Tensor<B, 1> = store.tensor("model.norm.weight", [32], &dev).unwrap();
        assert_eq!(norm.dims(), [32]);
        // Nested spelling resolves to the same tensor.
        let a = store.read_f32("visual.blocks.0.attn.qkv.weight").unwrap();
        let b = store
            .read_f32("model.visual.blocks.0.attn.qkv.weight")
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.1, vec![96, 32]);
        // Tied head: lm_head is the embedding.
        let head = store.read_f32(LM_HEAD).unwrap();
        let emb = store.read_f32(EMBED_TOKENS).unwrap();
        assert_eq!(head.1, vec![151936, 32]);
        assert!(head.0 == emb.0);
        // The embedding's EOS row was scaled to norm 14 (README): proves the
        // bf16 decoding is right.
        let row = &emb.0[151645 * 32..151646 * 32];
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 14.0).abs() < 0.1, "{norm}");
    }

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes `tensors` (name, dtype, shape, bytes) into `path`.
    fn write_file(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// A full synthetic checkpoint for `config` in the nested (transformers
    /// 5.x) layout with an untied head; vision in f32, text in bf16.
    /// Entries can be removed or re-shaped by `edit`.
    fn synthetic(
        config: &Qwen25VlConfig,
        edit: impl Fn(&str, &mut Vec<usize>) -> bool,
    ) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let mut out = Vec::new();
        for (k, (name, shape)) in expected_shapes(config).into_iter().enumerate() {
            let mut shape = shape;
            if !edit(&name, &mut shape) {
                continue;
            }
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (k * 7 + i % 13) as f32 * 0.25).collect();
            let nested = if let Some(rest) = name.strip_prefix("model.") {
                format!("model.language_model.{rest}")
            } else if let Some(rest) = name.strip_prefix("visual.") {
                format!("model.visual.{rest}")
            } else {
                name.clone()
            };
            if name.starts_with("visual.") {
                out.push((nested, Dtype::F32, shape, f32_bytes(&values)));
            } else {
                out.push((nested, Dtype::BF16, shape, bf16_bytes(&values)));
            }
        }
        out
    }

    fn small_config() -> Qwen25VlConfig {
        let mut c = fixture_config();
        c.text.vocab_size = 50;
        c.text.tie_word_embeddings = false;
        c
    }

    #[test]
    fn sharded_nested_untied_mixed_dtypes() {
        let config = small_config();
        let dir = tempfile::tempdir().unwrap();
        let all = synthetic(&config, |_, _| true);
        let (first, second) = all.split_at(all.len() / 2);
        let files = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        write_file(&dir.path().join(files[0]), first);
        write_file(&dir.path().join(files[1]), second);
        let mut map = serde_json::Map::new();
        for (i, part) in [first, second].iter().enumerate() {
            for (name, ..) in part.iter() {
                map.insert(name.clone(), files[i].into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();

        let store = WeightStore::open(dir.path(), false).unwrap();
        assert_eq!(store.shards.len(), 2);
        store.check_all(&config).unwrap();
        let dev = Default::default();
        // Untied head is its own tensor, not the embedding.
        let head: Tensor<B, 2> = store.tensor(LM_HEAD, [50, 32], &dev).unwrap();
        let emb: Tensor<B, 2> = store.tensor(EMBED_TOKENS, [50, 32], &dev).unwrap();
        assert!(head.to_data() != emb.to_data());
        // bf16 text tensor and f32 vision tensor, with canonical names.
        let k = expected_shapes(&config)
            .iter()
            .position(|(n, _)| n == "model.norm.weight")
            .unwrap();
        let norm: Tensor<B, 1> = store.tensor("model.norm.weight", [32], &dev).unwrap();
        let want: Vec<f32> = (0..32).map(|i| (k * 7 + i % 13) as f32 * 0.25).collect();
        let want: Vec<f32> = want
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(norm.into_data().to_vec::<f32>().unwrap(), want);
        let k = expected_shapes(&config)
            .iter()
            .position(|(n, _)| n == "visual.merger.ln_q.weight")
            .unwrap();
        let lnq: Tensor<B, 1> = store
            .tensor("visual.merger.ln_q.weight", [32], &dev)
            .unwrap();
        let want: Vec<f32> = (0..32).map(|i| (k * 7 + i % 13) as f32 * 0.25).collect();
        assert_eq!(lnq.into_data().to_vec::<f32>().unwrap(), want);
    }

    #[test]
    fn reports_every_missing_and_mismatched_tensor() {
        let config = small_config();
        let dir = tempfile::tempdir().unwrap();
        let tensors = synthetic(&config, |name, shape| {
            if name == "visual.blocks.2.attn.qkv.weight" {
                shape[0] = 95;
            }
            name != LM_HEAD && name != "model.layers.1.mlp.up_proj.weight"
        });
        write_file(&dir.path().join(SINGLE_FILE), &tensors);
        let store = WeightStore::open(dir.path(), false).unwrap();
        let err = store.check_all(&config).unwrap_err();
        let WeightsError::Check { problems, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 3, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("missing `lm_head.weight`"), "{msg}");
        assert!(
            msg.contains("missing `model.layers.1.mlp.up_proj.weight`"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "`visual.blocks.2.attn.qkv.weight`: expected shape [96, 32], found [95, 32]"
            ),
            "{msg}"
        );
        // Single-tensor errors name key and shapes too.
        let dev = Default::default();
        let e = store
            .tensor::<B, 2>("visual.blocks.2.attn.qkv.weight", [96, 32], &dev)
            .unwrap_err();
        assert!(matches!(e, WeightsError::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("[95, 32]"), "{e}");
        let e = store.tensor::<B, 2>(LM_HEAD, [50, 32], &dev).unwrap_err();
        assert!(matches!(e, WeightsError::Missing { ref key, .. } if key == LM_HEAD));
        // With tying, the missing head falls back to the embedding.
        let tied = WeightStore::open(dir.path(), true).unwrap();
        assert_eq!(tied.shape(LM_HEAD).unwrap(), vec![50, 32]);
    }

    #[test]
    fn linear_applies_hf_weight() {
        let store = WeightStore::open(&fixture_dir(), true).unwrap();
        let dev = Default::default();
        let lin = store
            .linear::<B>("visual.blocks.0.attn.proj", 32, 32, true, &dev)
            .unwrap();
        let (w, _) = store.read_f32("visual.blocks.0.attn.proj.weight").unwrap();
        let (b, _) = store.read_f32("visual.blocks.0.attn.proj.bias").unwrap();
        let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: Vec<f32> = (0..32)
            .map(|o| b[o] + (0..32).map(|i| w[o * 32 + i] * x[i]).sum::<f32>())
            .collect();
        // The fixture is bf16: on the host the weight stays bf16, read by
        // the host kernel.
        assert!(super::super::host_bf16::HostBf16::of(&lin.weight.val()).is_some());
        let got = super::super::host::apply_linear(
            &lin,
            Tensor::<B, 2>::from_data(TensorData::new(x, [1, 32]), &dev),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let e = store
            .linear::<B>("visual.blocks.0.attn.proj", 32, 31, true, &dev)
            .unwrap_err();
        assert!(
            e.to_string().contains("visual.blocks.0.attn.proj.weight"),
            "{e}"
        );
    }

    #[test]
    fn empty_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = WeightStore::open(dir.path(), true).unwrap_err();
        assert!(matches!(e, WeightsError::NoCheckpoint { .. }), "{e}");
    }
}
