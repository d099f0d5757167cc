//! OpenFlamingo configuration: the MosaicGPT language model's `config.json`
//! and the open_clip vision tower's model config, plus the constants
//! open-flamingo's factory fixes in code (perceiver and cross-attention
//! sizes, which no file records).
//!
//! Every field the model needs is read from the files; a missing one is an
//! error naming the file and the field, never a silent default. The only
//! defaults are open_clip's own dataclass defaults for fields its published
//! model configs leave out (`head_width`, the OpenAI mean/std).

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Heads of the perceiver's and the gated cross-attention's attention
/// (open-flamingo 2.0.1 builds both with `heads=8`, in code).
pub const XATTN_HEADS: usize = 8;
/// Per-head width of the perceiver and the gated cross-attention
/// (`dim_head=64`, in code).
pub const XATTN_DIM_HEAD: usize = 64;
/// Width multiplier of the perceiver's and the cross-attention's
/// feed-forward (`ff_mult=4`, in code).
pub const XATTN_FF_MULT: usize = 4;
/// open_clip's `CLIPVisionCfg.head_width` default (ViT-L-14's config does
/// not set it).
pub const OPEN_CLIP_HEAD_WIDTH: usize = 64;
/// open_clip's `OPENAI_DATASET_MEAN`, the normalisation of the `openai`
/// weights.
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// open_clip's `OPENAI_DATASET_STD`.
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// LayerNorm epsilon of every part (PyTorch's default, used by MosaicGPT,
/// open_clip and open-flamingo alike).
pub const LN_EPS: f32 = 1e-5;

/// Errors while reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not JSON, misses a field or has an unsupported value.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// File that failed.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
}

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    })
}

/// Reads the fields of one JSON object, naming the file and the field in
/// every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Value,
    prefix: &'a str,
}

impl Fields<'_> {
    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Result<&Value, ConfigError> {
        self.obj
            .get(key)
            .ok_or_else(|| self.invalid(format!("missing field `{}{key}`", self.prefix)))
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .filter(|&x| x > 0)
            .ok_or_else(|| {
                self.invalid(format!(
                    "`{}{key}` must be a positive integer, found {v}",
                    self.prefix
                ))
            })
    }

    fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        let v = self.get(key)?;
        v.as_bool().ok_or_else(|| {
            self.invalid(format!(
                "`{}{key}` must be true or false, found {v}",
                self.prefix
            ))
        })
    }

    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        let v = self.get(key)?;
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
            self.invalid(format!(
                "`{}{key}` must be a number, found {v}",
                self.prefix
            ))
        })
    }

    /// A field that must be present and may be `null`.
    fn nullable_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key)? {
            Value::Null => Ok(None),
            v => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    self.invalid(format!(
                        "`{}{key}` must be a number or null, found {v}",
                        self.prefix
                    ))
                }),
        }
    }

    /// A field that must hold `expected` (a flag this implementation
    /// supports only one way).
    fn require_bool(&self, key: &str, expected: bool) -> Result<(), ConfigError> {
        if self.bool(key)? != expected {
            return Err(self.invalid(format!(
                "`{}{key}` = {} is not supported (OpenFlamingo's MPT-1b uses {expected})",
                self.prefix, !expected
            )));
        }
        Ok(())
    }
}

/// The MosaicGPT (MPT-1b) language model's hyper-parameters (`config.json`
/// of the language-model repository).
#[derive(Debug, Clone, PartialEq)]
pub struct LmConfig {
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Blocks.
    pub n_layers: usize,
    /// MLP width = `mlp_ratio * d_model`.
    pub mlp_ratio: usize,
    /// Longest sequence (the ALiBi table's length).
    pub max_seq_len: usize,
    /// Rows of the stored token embedding (resized to the tokenizer later).
    pub vocab_size: usize,
    /// `alibi_bias_max` of the ALiBi slopes.
    pub alibi_bias_max: f64,
    /// LayerNorm on queries and keys over the full width.
    pub attn_qk_ln: bool,
    /// Clamp of the fused qkv projection (`attn_clip_qkv`), if any.
    pub attn_clip_qkv: Option<f64>,
    /// Attention scale (`softmax_scale`); `None` = 1/sqrt(head_dim).
    pub softmax_scale: Option<f64>,
    /// Factor on the logits (`logit_scale`), if any.
    pub logit_scale: Option<f64>,
}

impl LmConfig {
    /// Reads the language model's `config.json`. The flags this
    /// implementation supports one way only (`alibi: true`, `no_bias:
    /// true`, `prefix_lm: false`, `attn_uses_sequence_id: false`) must be
    /// present with that value.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let root = read_json(path)?;
        let f = Fields {
            path,
            obj: &root,
            prefix: "",
        };
        f.require_bool("alibi", true)?;
        f.require_bool("no_bias", true)?;
        f.require_bool("prefix_lm", false)?;
        f.require_bool("attn_uses_sequence_id", false)?;
        let cfg = Self {
            d_model: f.usize("d_model")?,
            n_heads: f.usize("n_heads")?,
            n_layers: f.usize("n_layers")?,
            mlp_ratio: f.usize("mlp_ratio")?,
            max_seq_len: f.usize("max_seq_len")?,
            vocab_size: f.usize("vocab_size")?,
            alibi_bias_max: f.f64("alibi_bias_max")?,
            attn_qk_ln: f.bool("attn_qk_ln")?,
            attn_clip_qkv: f.nullable_f64("attn_clip_qkv")?,
            softmax_scale: f.nullable_f64("softmax_scale")?,
            logit_scale: f.nullable_f64("logit_scale")?,
        };
        if !cfg.d_model.is_multiple_of(cfg.n_heads) {
            return Err(f.invalid(format!(
                "`d_model` {} is not a multiple of `n_heads` {}",
                cfg.d_model, cfg.n_heads
            )));
        }
        Ok(cfg)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// ALiBi slope of each head, as MosaicGPT v0.0.4 computes them in f32:
    /// `1 / 2^((h + 1) * alibi_bias_max / n_heads)`.
    pub fn alibi_slopes(&self) -> Vec<f32> {
        let step = (self.alibi_bias_max / self.n_heads as f64) as f32;
        (1..=self.n_heads)
            .map(|h| 1.0f32 / 2f32.powf(h as f32 * step))
            .collect()
    }
}

/// The open_clip vision tower's hyper-parameters (`vision_config.json`, or
/// the `model_cfg` of an open_clip `open_clip_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Input side in pixels (the resize and crop target).
    pub image_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width.
    pub width: usize,
    /// Per-head width (open_clip default 64).
    pub head_width: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// QuickGELU (`x * sigmoid(1.702 x)`) instead of GELU.
    pub quick_gelu: bool,
    /// Normalisation mean per channel.
    pub mean: [f32; 3],
    /// Normalisation std per channel.
    pub std: [f32; 3],
}

impl VisionConfig {
    /// Reads `vision_config.json` (open_clip model config at top level) or
    /// an open_clip `open_clip_config.json` (`model_cfg` and
    /// `preprocess_cfg`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let root = read_json(path)?;
        let (model, prefix) = match root.get("model_cfg") {
            Some(m) => (m, "model_cfg."),
            None => (&root, ""),
        };
        let top = Fields {
            path,
            obj: model,
            prefix,
        };
        let vision_prefix = format!("{prefix}vision_cfg.");
        let vision = Fields {
            path,
            obj: top.get("vision_cfg")?,
            prefix: &vision_prefix,
        };
        let width = vision.usize("width")?;
        let head_width = match vision.obj.get("head_width") {
            None => OPEN_CLIP_HEAD_WIDTH,
            Some(_) => vision.usize("head_width")?,
        };
        if !width.is_multiple_of(head_width) {
            return Err(vision.invalid(format!(
                "`{vision_prefix}width` {width} is not a multiple of `head_width` {head_width}"
            )));
        }
        let (mean, std) = match root.get("preprocess_cfg") {
            Some(p) => {
                let pre = Fields {
                    path,
                    obj: p,
                    prefix: "preprocess_cfg.",
                };
                (triple(&pre, "mean")?, triple(&pre, "std")?)
            }
            None => (OPENAI_MEAN, OPENAI_STD),
        };
        let image_size = vision.usize("image_size")?;
        let patch_size = vision.usize("patch_size")?;
        if !image_size.is_multiple_of(patch_size) {
            return Err(vision.invalid(format!(
                "`{vision_prefix}image_size` {image_size} is not a multiple of `patch_size` {patch_size}"
            )));
        }
        Ok(Self {
            image_size,
            layers: vision.usize("layers")?,
            width,
            head_width,
            patch_size,
            quick_gelu: top.bool("quick_gelu")?,
            mean,
            std,
        })
    }

    /// Heads of the vision attention.
    pub fn heads(&self) -> usize {
        self.width / self.head_width
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image (CLS dropped).
    pub fn tokens_per_image(&self) -> usize {
        self.grid() * self.grid()
    }
}

fn triple(f: &Fields<'_>, key: &str) -> Result<[f32; 3], ConfigError> {
    let v = f.get(key)?;
    let xs: Option<Vec<f32>> = v.as_array().map(|a| {
        a.iter()
            .filter_map(Value::as_f64)
            .map(|x| x as f32)
            .collect()
    });
    match xs {
        Some(xs) if xs.len() == 3 => Ok([xs[0], xs[1], xs[2]]),
        _ => Err(f.invalid(format!("`{}{key}` must be 3 numbers, found {v}", f.prefix))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        p
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/openflamingo_tiny")
            .join(name)
    }

    #[test]
    fn fixture_configs_read() {
        let lm = LmConfig::from_file(&fixture("lm/config.json")).unwrap();
        assert_eq!((lm.d_model, lm.n_heads, lm.n_layers), (64, 4, 2));
        assert_eq!(lm.softmax_scale, None);
        assert_eq!(lm.alibi_slopes(), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        let v = VisionConfig::from_file(&fixture("vision_config.json")).unwrap();
        assert_eq!(
            (v.heads(), v.tokens_per_image(), v.quick_gelu),
            (2, 16, true)
        );
        assert_eq!(v.mean, OPENAI_MEAN);
    }

    #[test]
    fn a_missing_field_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut lm: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("lm/config.json")).unwrap())
                .unwrap();
        for field in ["n_heads", "softmax_scale", "alibi"] {
            let mut c = lm.clone();
            c.as_object_mut().unwrap().remove(field);
            let p = write(dir.path(), "config.json", &c);
            let e = LmConfig::from_file(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("missing field `{field}`")), "{e}");
            assert!(e.contains("config.json"), "{e}");
        }
        lm["alibi"] = Value::Bool(false);
        let p = write(dir.path(), "config.json", &lm);
        let e = LmConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("`alibi` = false is not supported"), "{e}");
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("vision_config.json")).unwrap())
                .unwrap();
        v["vision_cfg"]
            .as_object_mut()
            .unwrap()
            .remove("patch_size");
        let p = write(dir.path(), "vision_config.json", &v);
        let e = VisionConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("missing field `vision_cfg.patch_size`"), "{e}");
    }
}
