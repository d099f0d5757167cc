//! Reading tensors from disk: embedding matrices (`.pt`, `.safetensors`,
//! `.npy`), checkpoints / state dicts (`.ckpt`, `.pt`, `.safetensors`), and
//! streamed SHA-256 hashes of input files.
//!
//! Everything is converted to row-major `f32`.  Files are memory-mapped, so
//! only the converted copy of the tensor is held in memory.

mod npy;
pub mod pickle;
mod torch_zip;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use pickle::Value;
use torch_zip::TorchArchive;

/// Errors of this module; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        source: std::io::Error,
    },
    /// The file is not in the expected format (corrupt, not a tensor, ...).
    #[error("{path}: {msg}")]
    Format {
        /// the file
        path: PathBuf,
        /// what is wrong
        msg: String,
    },
    /// A tensor holds NaN or infinity.
    #[error("{path}: non-finite value {value} in {tensor} at row {row}, column {col}")]
    NonFinite {
        /// the file
        path: PathBuf,
        /// tensor name (or "tensor")
        tensor: String,
        /// row (first index)
        row: usize,
        /// column (flattened remaining indices)
        col: usize,
        /// the offending value
        value: f32,
    },
}

impl TensorIoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TensorIoError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn format(path: &Path, msg: impl Into<String>) -> Self {
        TensorIoError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// A dense row-major `f32` matrix (e.g. `[N, d]` embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// number of rows
    pub rows: usize,
    /// number of columns
    pub cols: usize,
    /// `rows * cols` values, row-major
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `i` as a slice (panics if out of range, like slice indexing).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// A new matrix made of the given rows, in that order (`None` if an index
    /// is out of range).
    pub fn select_rows(&self, rows: &[usize]) -> Option<Matrix> {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &r in rows {
            if r >= self.rows {
                return None;
            }
            data.extend_from_slice(self.row(r));
        }
        Some(Matrix {
            rows: rows.len(),
            cols: self.cols,
            data,
        })
    }
}

/// A named tensor of a state dict: shape and row-major `f32` values.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// logical shape
    pub shape: Vec<usize>,
    /// row-major values
    pub data: Vec<f32>,
}

fn check_finite(
    path: &Path,
    name: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<(), TensorIoError> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let cols: usize = shape.iter().skip(1).product::<usize>().max(1);
        return Err(TensorIoError::NonFinite {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            row: if shape.is_empty() { 0 } else { i / cols },
            col: if shape.is_empty() { 0 } else { i % cols },
            value: data[i],
        });
    }
    Ok(())
}

fn to_matrix(
    path: &Path,
    name: &str,
    shape: &[usize],
    data: Vec<f32>,
) -> Result<Matrix, TensorIoError> {
    if shape.len() != 2 {
        return Err(TensorIoError::format(
            path,
            format!("{name}: expected a 2-D tensor [N, d], found shape {shape:?}"),
        ));
    }
    check_finite(path, name, shape, &data)?;
    Ok(Matrix {
        rows: shape[0],
        cols: shape[1],
        data,
    })
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Loads a 2-D float matrix `[N, d]` from a `torch.save`d tensor (`.pt`,
/// `.pth`, `.bin`), a `.safetensors` file (its only tensor, or the one named
/// `embeddings`/`embedding`/`emb`), or a `.npy` file (f32/f16/f64, C order).
///
/// NaN/Inf values are rejected with the row and column.
pub fn load_matrix(path: &Path) -> Result<Matrix, TensorIoError> {
    match extension(path).as_str() {
        "safetensors" => load_matrix_safetensors(path),
        "npy" => {
            let (shape, data) = npy::load(path)?;
            to_matrix(path, "array", &shape, data)
        }
        _ => load_matrix_torch(path),
    }
}

fn load_matrix_torch(path: &Path) -> Result<Matrix, TensorIoError> {
    let ar = TorchArchive::open(path)?;
    match &ar.root {
        Value::Tensor(t) => {
            let t = t.clone();
            let data = ar.tensor_f32(&t, "tensor")?;
            to_matrix(path, "tensor", &t.shape, data)
        }
        Value::Dict(items) => {
            let names: Vec<String> = items
                .iter()
                .filter(|(_, v)| matches!(v, Value::Tensor(_)))
                .filter_map(|(k, _)| key_str(k))
                .collect();
            let pick = pick_name(&names);
            match pick {
                Some(n) => {
                    let t = items
                        .iter()
                        .find_map(|(k, v)| match (key_str(k), v) {
                            (Some(kk), Value::Tensor(t)) if kk == n => Some(t.clone()),
                            _ => None,
                        })
                        .ok_or_else(|| TensorIoError::format(path, "internal: tensor vanished"))?;
                    let data = ar.tensor_f32(&t, &n)?;
                    to_matrix(path, &n, &t.shape, data)
                }
                None => Err(TensorIoError::format(
                    path,
                    format!(
                        "expected a single tensor (torch.save(tensor)); found a dict with tensors {names:?} (none named 'embeddings')"
                    ),
                )),
            }
        }
        other => Err(TensorIoError::format(
            path,
            format!(
                "expected a tensor (torch.save(tensor)); found {}",
                describe(other)
            ),
        )),
    }
}

fn pick_name(names: &[String]) -> Option<String> {
    if names.len() == 1 {
        return Some(names[0].clone());
    }
    ["embeddings", "embedding", "emb"]
        .iter()
        .find(|c| names.iter().any(|n| n == *c))
        .map(|c| c.to_string())
}

fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "a bool".into(),
        Value::Int(_) => "an int".into(),
        Value::Float(_) => "a float".into(),
        Value::Str(_) => "a string".into(),
        Value::Bytes(_) => "bytes".into(),
        Value::Tuple(_) => "a tuple".into(),
        Value::List(_) => "a list".into(),
        Value::Dict(_) => "a dict".into(),
        Value::Global(m, n) => format!("a reference to {m}.{n}"),
        Value::Storage { .. } => "a bare storage".into(),
        Value::Tensor(_) => "a tensor".into(),
        Value::Object(o) => format!("an object of class {}", o.class),
        Value::Mark => "a pickle mark".into(),
    }
}

fn key_str(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn safetensors_tensor(
    path: &Path,
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
) -> Result<Vec<f32>, TensorIoError> {
    use safetensors::Dtype;
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        other => {
            return Err(TensorIoError::format(
                path,
                format!("{name}: dtype {other:?} is not a floating-point tensor"),
            ))
        }
    })
}

/// Maps the file at `path` read-only, the one way every reader of large
/// input files in this crate maps them. `populate` faults every page in up
/// front, for a reader about to scan the whole file (fewer page faults than
/// touching the pages one by one).
pub(crate) fn map_readonly(path: &Path, populate: bool) -> std::io::Result<memmap2::Mmap> {
    let file = File::open(path)?;
    let mut options = memmap2::MmapOptions::new();
    if populate {
        options.populate();
    }
    // SAFETY: read-only map of a file we only read; we assume it is not
    // truncated concurrently, as any memory-mapped reader does (input files
    // are not modified while a run reads them, and leverflow replaces its
    // own outputs by rename, never in place).
    unsafe { options.map(&file) }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, TensorIoError> {
    map_readonly(path, false).map_err(|e| TensorIoError::io(path, e))
}

fn load_matrix_safetensors(path: &Path) -> Result<Matrix, TensorIoError> {
    let mmap = map_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| TensorIoError::format(path, format!("invalid safetensors file: {e}")))?;
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let name = pick_name(&names).ok_or_else(|| {
        TensorIoError::format(
            path,
            format!(
                "ambiguous: {} tensors {names:?} and none named 'embeddings'",
                names.len()
            ),
        )
    })?;
    let view = st
        .tensor(&name)
        .map_err(|e| TensorIoError::format(path, format!("{name}: {e}")))?;
    let data = safetensors_tensor(path, &view, &name)?;
    to_matrix(path, &name, view.shape(), data)
}

/// Loads every floating-point tensor of a state dict: a Lightning `.ckpt`
/// (tensors under its `state_dict` entry; other entries such as `epoch` or
/// `hyper_parameters` are skipped), a bare state dict saved with
/// `torch.save(model.state_dict())`, or a `.safetensors` file.
///
/// Non-float tensors (integer buffers) are skipped; non-finite values are
/// errors naming the tensor.
pub fn load_state_dict(path: &Path) -> Result<BTreeMap<String, NamedTensor>, TensorIoError> {
    load_state_dict_filtered(path, &|_| true)
}

/// Like [`load_state_dict`], but only tensors whose name satisfies `keep`
/// are converted (a full checkpoint may hold large unrelated sub-models).
pub fn load_state_dict_filtered(
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, NamedTensor>, TensorIoError> {
    let mut out = BTreeMap::new();
    if extension(path) == "safetensors" {
        let mmap = map_file(path)?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| TensorIoError::format(path, format!("invalid safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            if !is_float_dtype(view.dtype()) || !keep(&name) {
                continue;
            }
            let data = safetensors_tensor(path, &view, &name)?;
            check_finite(path, &name, view.shape(), &data)?;
            out.insert(
                name,
                NamedTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        return Ok(out);
    }
    let ar = TorchArchive::open(path)?;
    let root_items: &[(Value, Value)] = match &ar.root {
        Value::Dict(items) => items,
        other => {
            return Err(TensorIoError::format(
                path,
                format!(
                    "expected a checkpoint or state dict (a dict); found {}",
                    describe(other)
                ),
            ))
        }
    };
    let sd = root_items
        .iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "state_dict"))
        .map(|(_, v)| v);
    let items: &[(Value, Value)] = match sd {
        Some(Value::Dict(items)) => items,
        Some(Value::Object(o)) => &o.items,
        Some(other) => {
            return Err(TensorIoError::format(
                path,
                format!("'state_dict' entry is {}, not a dict", describe(other)),
            ))
        }
        None => root_items,
    };
    for (k, v) in items {
        let (Some(name), Value::Tensor(t)) = (key_str(k), v) else {
            continue;
        };
        if matches!(t.dtype, pickle::StorageDtype::Other(..)) || !keep(&name) {
            continue;
        }
        let data = ar.tensor_f32(t, &name)?;
        check_finite(path, &name, &t.shape, &data)?;
        out.insert(
            name,
            NamedTensor {
                shape: t.shape.clone(),
                data,
            },
        );
    }
    if out.is_empty() && items.iter().all(|(_, v)| !matches!(v, Value::Tensor(_))) {
        return Err(TensorIoError::format(
            path,
            "no floating-point tensors found (expected a state dict or a checkpoint with 'state_dict')",
        ));
    }
    Ok(out)
}

fn is_float_dtype(d: safetensors::Dtype) -> bool {
    use safetensors::Dtype;
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// SHA-256 of a file's bytes as lowercase hex, streamed in 1 MiB chunks.
pub fn file_sha256(path: &Path) -> Result<String, TensorIoError> {
    let mut f = File::open(path).map_err(|e| TensorIoError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| TensorIoError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests;
