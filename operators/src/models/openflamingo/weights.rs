//! The weights of an OpenFlamingo model, gathered from its three artifacts
//! the way open-flamingo loads them: the language model's repository, the
//! open_clip vision tower's weights, then OpenFlamingo's checkpoint (the
//! perceiver, the gated cross-attention layers and the resized token
//! embedding) loaded over them (`load_state_dict(strict=False)`: a tensor
//! of the checkpoint replaces the language model's).
//!
//! Each file is a `.safetensors` file or a pickled PyTorch file (`.pt`,
//! `.bin`) read by the bounded reader of [`crate::tensor_io`]. Keys are
//! brought to one canonical spelling ([`flamingo_key`]): `transformer.*` for
//! the language model, `xattn.N.*` for the gated cross-attention in front
//! of block `N`, `perceiver.*` and `visual.*`.

use crate::tensor_io::{load_state_dict_filtered, NamedTensor, TensorIoError};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Canonical name of the token embedding (also the tied LM head).
pub const WTE: &str = "transformer.wte.weight";

/// Errors while reading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A weight file could not be read or parsed.
    #[error(transparent)]
    Read(#[from] TensorIoError),
    /// A file the model needs is absent.
    #[error("{}: none of {names} found", dir.display())]
    NoFile {
        /// Directory searched.
        dir: PathBuf,
        /// The file names tried.
        names: String,
    },
    /// A shard index is malformed.
    #[error("{}: {message}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is in none of the files.
    #[error("missing tensor `{key}` (looked in {files})")]
    Missing {
        /// Canonical key.
        key: String,
        /// The files read.
        files: String,
    },
    /// A tensor has another shape than the configuration implies.
    #[error("tensor `{key}` in {}: expected shape {expected:?}, found {found:?}", path.display())]
    Shape {
        /// File holding the tensor.
        path: PathBuf,
        /// Canonical key.
        key: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape stored.
        found: Vec<usize>,
    },
}

/// A key of the language model's own weights (`transformer.*`), kept as is.
pub fn lm_key(key: &str) -> Option<String> {
    key.starts_with("transformer.").then(|| key.to_string())
}

/// A key of open_clip's weights: the vision tower's (`visual.*`) only, not
/// the text tower's.
pub fn vision_key(key: &str) -> Option<String> {
    key.starts_with("visual.").then(|| key.to_string())
}

/// The canonical spelling of a key of OpenFlamingo's own state dict, or
/// `None` for keys the model does not use.
pub fn flamingo_key(key: &str) -> Option<String> {
    if key.starts_with("perceiver.") {
        return Some(key.to_string());
    }
    if let Some(rest) = key.strip_prefix("vision_encoder.") {
        return Some(format!("visual.{rest}"));
    }
    let rest = key.strip_prefix("lang_encoder.")?;
    if let Some(r) = rest.strip_prefix("gated_cross_attn_layers.") {
        return Some(format!("xattn.{r}"));
    }
    if let Some(r) = rest.strip_prefix("old_decoder_blocks.") {
        return Some(format!("transformer.blocks.{r}"));
    }
    let r = rest.strip_prefix("transformer.")?;
    if let Some(b) = r.strip_prefix("blocks.") {
        let (n, part) = b.split_once('.')?;
        if let Some(p) = part.strip_prefix("gated_cross_attn_layer.") {
            return Some(format!("xattn.{n}.{p}"));
        }
        if let Some(p) = part.strip_prefix("decoder_layer.") {
            return Some(format!("transformer.blocks.{n}.{p}"));
        }
        return Some(format!("transformer.blocks.{n}.{part}"));
    }
    Some(format!("transformer.{r}"))
}

/// Every tensor of a model, by canonical name, with the file it came from.
#[derive(Debug, Default)]
pub struct WeightSet {
    tensors: BTreeMap<String, (NamedTensor, PathBuf)>,
    files: Vec<PathBuf>,
}

/// The first of `names` that exists in `dir`.
pub fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf, WeightsError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| WeightsError::NoFile {
            dir: dir.to_path_buf(),
            names: names.join(", "),
        })
}

/// The weight files of a Hugging Face model directory: the shards a
/// `*.index.json` names, else the single file.
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let path = dir.join(index);
        if path.is_file() {
            return shard_files(dir, &path);
        }
    }
    Ok(vec![find_file(
        dir,
        &["model.safetensors", "pytorch_model.bin"],
    )?])
}

fn shard_files(dir: &Path, path: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let bad = |message: String| WeightsError::Index {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = root
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("missing object `weight_map`".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (key, file) in map {
        let name = file
            .as_str()
            .filter(|f| !f.is_empty() && !f.contains(['/', '\\']) && *f != "..")
            .ok_or_else(|| bad(format!("`weight_map.{key}` is not a plain file name")))?;
        if !files.iter().any(|f| f == name) {
            files.push(name.to_string());
        }
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

impl WeightSet {
    /// Reads `path` over the tensors already held (a key read again
    /// replaces the earlier tensor, as `load_state_dict` does). Only keys
    /// `name` maps to a canonical name are kept; `adjust` may reshape a
    /// tensor on the way in (the token embedding's resize).
    pub fn add_file(
        &mut self,
        path: &Path,
        name: fn(&str) -> Option<String>,
        adjust: &dyn Fn(&str, NamedTensor) -> Result<NamedTensor, WeightsError>,
    ) -> Result<(), WeightsError> {
        let read = load_state_dict_filtered(path, &|k| name(k).is_some())?;
        for (key, t) in read {
            if let Some(name) = name(&key) {
                let t = adjust(&name, t)?;
                self.tensors.insert(name, (t, path.to_path_buf()));
            }
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Whether a canonical key is held.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Canonical keys held, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Stored shape of a tensor.
    pub fn shape(&self, key: &str) -> Result<Vec<usize>, WeightsError> {
        self.tensors
            .get(key)
            .map(|(t, _)| t.shape.clone())
            .ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> WeightsError {
        WeightsError::Missing {
            key: key.to_string(),
            files: self
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Takes a tensor out after checking its shape is `shape`.
    pub fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let (t, path) = self.tensors.remove(key).ok_or_else(|| self.missing(key))?;
        if t.shape != shape {
            return Err(WeightsError::Shape {
                path,
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
        Ok(t.data)
    }

    /// Takes a tensor out as a burn tensor of shape `shape`.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, WeightsError> {
        let data = self.take(key, &shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), device))
    }

    /// Takes a PyTorch linear weight `{prefix}.weight` `[d_out, d_in]` (and
    /// `{prefix}.bias` when `bias`) out as a [`Linear`].
    pub fn linear<B: Backend>(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>, WeightsError> {
        let w: Tensor<B, 2> = self.tensor(&format!("{prefix}.weight"), [d_out, d_in], device)?;
        let b = match bias {
            true => Some(self.tensor(&format!("{prefix}.bias"), [d_out], device)?),
            false => None,
        };
        Ok(Linear {
            weight: w.transpose(),
            bias: b,
        })
    }

    /// Takes a LayerNorm `{prefix}.weight` (and `{prefix}.bias` when
    /// `bias`) out.
    pub fn layer_norm<B: Backend>(
        &mut self,
        prefix: &str,
        d: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<LayerNorm<B>, WeightsError> {
        let weight = self.tensor(&format!("{prefix}.weight"), [d], device)?;
        let bias = match bias {
            true => Some(self.tensor(&format!("{prefix}.bias"), [d], device)?),
            false => None,
        };
        Ok(LayerNorm { weight, bias })
    }
}

/// A linear layer: `x @ weight (+ bias)`, the weight stored `[d_in, d_out]`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]`.
    pub weight: Tensor<B, 2>,
    /// `[d_out]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    /// Applies the layer to the last axis of `x` `[.., n, d_in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let d_out = self.weight.dims()[1];
        let mut y = x.reshape([rows, d_in]).matmul(self.weight.clone());
        if let Some(b) = &self.bias {
            y = y.add(b.clone().unsqueeze::<2>());
        }
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

/// PyTorch's LayerNorm over the last axis (biased variance), with or
/// without a bias.
#[derive(Debug, Clone)]
pub struct LayerNorm<B: Backend> {
    /// `[d]`.
    pub weight: Tensor<B, 1>,
    /// `[d]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> LayerNorm<B> {
    /// Normalises the last axis of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let x = x.reshape([rows, d]);
        let mean = x.clone().mean_dim(1);
        let centred = x.sub(mean);
        let var = centred.clone().powi_scalar(2).mean_dim(1);
        let mut y = centred
            .div(var.add_scalar(super::config::LN_EPS).sqrt())
            .mul(self.weight.clone().unsqueeze::<2>());
        if let Some(b) = &self.bias {
            y = y.add(b.clone().unsqueeze::<2>());
        }
        y.reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_artifact_get_one_spelling() {
        let c = |k: &str| flamingo_key(k);
        assert_eq!(
            c("lang_encoder.transformer.blocks.3.gated_cross_attn_layer.attn.to_q.weight").unwrap(),
            "xattn.3.attn.to_q.weight"
        );
        assert_eq!(
            c("lang_encoder.gated_cross_attn_layers.3.ff_gate").unwrap(),
            "xattn.3.ff_gate"
        );
        assert_eq!(
            c("lang_encoder.transformer.blocks.1.decoder_layer.attn.Wqkv.weight").unwrap(),
            "transformer.blocks.1.attn.Wqkv.weight"
        );
        assert_eq!(
            c("lang_encoder.old_decoder_blocks.1.ln_1.weight").unwrap(),
            "transformer.blocks.1.ln_1.weight"
        );
        assert_eq!(c("lang_encoder.transformer.wte.weight").unwrap(), WTE);
        assert_eq!(
            c("vision_encoder.conv1.weight").unwrap(),
            "visual.conv1.weight"
        );
        assert_eq!(c("perceiver.latents").unwrap(), "perceiver.latents");
        assert!(c("logit_scale").is_none());
        assert_eq!(vision_key("visual.proj").unwrap(), "visual.proj");
        // open_clip's text tower shares the `transformer.` prefix with MPT.
        assert!(vision_key("transformer.resblocks.0.attn.in_proj_weight").is_none());
        assert!(lm_key("visual.proj").is_none());
        assert_eq!(lm_key(WTE).unwrap(), WTE);
    }

    #[test]
    fn a_missing_or_misshapen_tensor_is_an_error_naming_it() {
        let mut w = WeightSet::default();
        let e = w
            .take("perceiver.latents", &[64, 1024])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing tensor `perceiver.latents`"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let data = vec![0u8; 4 * 6];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data)
            .unwrap();
        safetensors::serialize_to_file(vec![("perceiver.latents", view)], None, &path).unwrap();
        w.add_file(&path, flamingo_key, &|_, t| Ok(t)).unwrap();
        let e = w
            .take("perceiver.latents", &[3, 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected shape [3, 2], found [2, 3]") && e.contains("w.safetensors"),
            "{e}"
        );
    }
}
