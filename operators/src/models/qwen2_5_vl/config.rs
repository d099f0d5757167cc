//! Qwen2.5-VL configuration files of a Hugging Face checkpoint directory:
//! `config.json` (flat published layout or nested `text_config`),
//! `preprocessor_config.json` and `generation_config.json`.
//!
//! These structs are the contract shared by the processor, the vision tower,
//! the language model and generation, so each part reads its numbers from one
//! place.

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Errors while reading a checkpoint's configuration files.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid JSON or misses a required key.
    #[error("{path}: {message}")]
    Invalid {
        /// File that failed.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Language-model hyper-parameters (the Qwen2 decoder).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// M-RoPE split of the head_dim/2 rotary frequencies over (t, h, w).
    pub mrope_section: Vec<usize>,
    /// Vocabulary size of the embedding / LM head.
    pub vocab_size: usize,
    /// Whether the LM head shares the token embedding.
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Vision-tower hyper-parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Number of vision blocks.
    pub depth: usize,
    /// Vision width.
    pub hidden_size: usize,
    /// Vision MLP inner width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Input channels (3).
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// Width of the merged output (= text hidden size).
    pub out_hidden_size: usize,
    /// Spatial patch size (14).
    pub patch_size: usize,
    /// Merge factor (2: 2x2 patches become one token).
    pub spatial_merge_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Window size in pixels for windowed attention.
    pub window_size: usize,
    /// Blocks that use full (per-image) attention.
    pub fullatt_block_indexes: Vec<usize>,
    /// Temporal positions per second (videos only).
    #[serde(default = "default_tokens_per_second")]
    pub tokens_per_second: f64,
}

fn default_in_chans() -> usize {
    3
}
fn default_tokens_per_second() -> f64 {
    2.0
}

impl VisionConfig {
    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// The whole model configuration (`config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen25VlConfig {
    /// Language model.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>` id.
    pub image_token_id: u32,
    /// `<|video_pad|>` id.
    pub video_token_id: u32,
    /// `<|vision_start|>` id.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>` id.
    pub vision_end_token_id: u32,
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

fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn get_f64_or(obj: &Value, key: &str, default: f64) -> f64 {
    obj.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// A token id of a configuration file: absent gives `default`; present, it
/// must be an integer that fits in `u32` (never narrowed with `as`).
fn token_id(path: &Path, v: Option<&Value>, field: &str) -> Result<Option<u32>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!(
                        "`{field}` must be a token id (an integer from 0 to {}), found {x}",
                        u32::MAX
                    ),
                )
            }),
    }
}

/// A token id that must be present: an integer that fits in `u32`.
fn required_token_id(path: &Path, x: &Value, field: &str) -> Result<u32, ConfigError> {
    x.as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| {
            invalid(
                path,
                format!(
                    "`{field}` must be a token id (an integer from 0 to {}), found {x}",
                    u32::MAX
                ),
            )
        })
}

/// Largest `max_pixels` accepted in `preprocessor_config.json` (2^28, a
/// 16384 × 16384 canvas; the published checkpoints use 12,845,056).
pub const MAX_PIXELS_BOUND: usize = 1 << 28;

impl Qwen25VlConfig {
    /// Reads `config.json`, accepting both the flat layout of the published
    /// 3B/7B checkpoints and the nested `text_config` layout of newer
    /// transformers.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let root = read_json(path)?;
        Self::from_value(path, &root)
    }

    /// Parses an already-read `config.json` value; `path` is used in errors.
    pub fn from_value(path: &Path, root: &Value) -> Result<Self, ConfigError> {
        let text_obj = root.get("text_config").unwrap_or(root);
        // Keys may live in `text_config` or at the top level: look in both.
        let lookup = |key: &str| text_obj.get(key).or_else(|| root.get(key));
        let usize_key = |key: &str| -> Result<usize, ConfigError> {
            lookup(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| invalid(path, format!("missing or non-integer key `{key}`")))
        };
        let rope = lookup("rope_scaling").or_else(|| lookup("rope_parameters"));
        let mrope_section = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(path, "missing `rope_scaling.mrope_section`"))?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(path, "`mrope_section` must be a list of integers"))?;
        let rope_theta = lookup("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(1_000_000.0);
        let tie = root
            .get("tie_word_embeddings")
            .or_else(|| text_obj.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let text = TextConfig {
            hidden_size: usize_key("hidden_size")?,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads: usize_key("num_attention_heads")?,
            num_key_value_heads: usize_key("num_key_value_heads")?,
            rms_norm_eps: lookup("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            mrope_section,
            vocab_size: usize_key("vocab_size")?,
            tie_word_embeddings: tie,
        };
        if text.num_attention_heads == 0
            || !text.hidden_size.is_multiple_of(text.num_attention_heads)
            || text.num_key_value_heads == 0
            || !text
                .num_attention_heads
                .is_multiple_of(text.num_key_value_heads)
        {
            return Err(invalid(path, "inconsistent attention head counts"));
        }
        let mrope_sum = text
            .mrope_section
            .iter()
            .try_fold(0usize, |acc, &x| acc.checked_add(x))
            .and_then(|s| s.checked_mul(2));
        if mrope_sum != Some(text.head_dim()) {
            return Err(invalid(
                path,
                format!(
                    "mrope_section {:?} must sum to head_dim/2 = {}",
                    text.mrope_section,
                    text.head_dim() / 2
                ),
            ));
        }
        let vision_value = root
            .get("vision_config")
            .ok_or_else(|| invalid(path, "missing `vision_config`"))?;
        let mut vision: VisionConfig = serde_json::from_value(vision_value.clone())
            .map_err(|e| invalid(path, format!("`vision_config`: {e}")))?;
        if vision.num_heads == 0 || !vision.hidden_size.is_multiple_of(vision.num_heads) {
            return Err(invalid(path, "`vision_config`: inconsistent num_heads"));
        }
        for (field, x) in [
            ("patch_size", vision.patch_size),
            ("spatial_merge_size", vision.spatial_merge_size),
            ("temporal_patch_size", vision.temporal_patch_size),
            ("window_size", vision.window_size),
            ("in_chans", vision.in_chans),
        ] {
            if !(1..=1 << 16).contains(&x) {
                return Err(invalid(
                    path,
                    format!(
                        "`vision_config.{field}` must be an integer from 1 to 65536, found {x}"
                    ),
                ));
            }
        }
        vision.tokens_per_second = get_f64_or(vision_value, "tokens_per_second", 2.0);
        let id = |key: &str, default: u32| -> Result<u32, ConfigError> {
            Ok(token_id(path, lookup(key), key)?.unwrap_or(default))
        };
        Ok(Self {
            text,
            vision,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
        })
    }
}

/// Image preprocessing settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    /// Lower bound on resized pixel count.
    pub min_pixels: usize,
    /// Upper bound on resized pixel count.
    pub max_pixels: usize,
    /// Patch side (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Merge factor (2).
    pub merge_size: usize,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    pub image_std: [f32; 3],
    /// Rescale factor applied to u8 values (1/255).
    pub rescale_factor: f64,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl PreprocessorConfig {
    /// Reads `preprocessor_config.json`; absent keys keep the Qwen2-VL
    /// defaults. Present keys must be usable: the pixel bounds positive,
    /// `min_pixels <= max_pixels <= MAX_PIXELS_BOUND`, the patch, temporal
    /// patch and merge sizes positive and small; each error names the field.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        Self::from_value(path, &v)
    }

    /// Parses an already-read `preprocessor_config.json` value; `path` is
    /// used in errors.
    pub fn from_value(path: &Path, v: &Value) -> Result<Self, ConfigError> {
        let d = Self::default();
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], ConfigError> {
            match v.get(key) {
                None => Ok(default),
                Some(arr) => {
                    let xs: Vec<f32> = arr
                        .as_array()
                        .ok_or_else(|| invalid(path, format!("`{key}` must be a list")))?
                        .iter()
                        .map(|x| x.as_f64().map(|f| f as f32))
                        .collect::<Option<_>>()
                        .ok_or_else(|| invalid(path, format!("`{key}` must hold numbers")))?;
                    xs.try_into()
                        .map_err(|_| invalid(path, format!("`{key}` must have 3 entries")))
                }
            }
        };
        // Newer processors nest the pixel bounds under `size`.
        let size = v.get("size");
        // A present integer in 1..=bound (absent: the default).
        let bounded = |x: Option<(&Value, String)>, default: usize, bound: usize| {
            let Some((x, field)) = x else {
                return Ok(default);
            };
            if x.is_null() {
                return Ok(default);
            }
            x.as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| (1..=bound).contains(&i))
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!("`{field}` must be an integer from 1 to {bound}, found {x}"),
                    )
                })
        };
        let field = |key: &str, nested: &str| {
            v.get(key).map(|x| (x, key.to_string())).or_else(|| {
                size.and_then(|s| s.get(nested))
                    .map(|x| (x, format!("size.{nested}")))
            })
        };
        let min_pixels = bounded(
            field("min_pixels", "shortest_edge"),
            d.min_pixels,
            MAX_PIXELS_BOUND,
        )?;
        let max_pixels = bounded(
            field("max_pixels", "longest_edge"),
            d.max_pixels,
            MAX_PIXELS_BOUND,
        )?;
        if min_pixels > max_pixels {
            return Err(invalid(
                path,
                format!("`min_pixels` ({min_pixels}) is larger than `max_pixels` ({max_pixels})"),
            ));
        }
        // Patch sizes: positive and small (the published values are 14, 2
        // and 2); they multiply into every image's patch count.
        let get = |key: &str, default: usize| {
            bounded(v.get(key).map(|x| (x, key.to_string())), default, 1024)
        };
        Ok(Self {
            min_pixels,
            max_pixels,
            patch_size: get("patch_size", d.patch_size)?,
            temporal_patch_size: get("temporal_patch_size", d.temporal_patch_size)?,
            merge_size: get("merge_size", d.merge_size)?,
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
            rescale_factor: get_f64_or(v, "rescale_factor", d.rescale_factor),
        })
    }
}

/// Generation defaults of the checkpoint (`generation_config.json`): like HF,
/// settings a caller does not pass come from here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationDefaults {
    /// End-of-sequence ids (HF accepts an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Repetition penalty (1.0 = off).
    pub repetition_penalty: Option<f64>,
    /// Whether the checkpoint samples by default.
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p.
    pub top_p: Option<f64>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let v = read_json(path)?;
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(xs)) => xs
                .iter()
                .enumerate()
                .map(|(i, x)| required_token_id(path, x, &format!("eos_token_id[{i}]")))
                .collect::<Result<_, _>>()?,
            Some(x) => vec![required_token_id(path, x, "eos_token_id")?],
        };
        Ok(Self {
            eos_token_ids,
            // Lenient as before for a non-integer (ignored), but an integer
            // that does not fit a token id is an error, never narrowed.
            pad_token_id: match v.get("pad_token_id") {
                Some(x) if x.is_u64() => token_id(path, Some(x), "pad_token_id")?,
                _ => None,
            },
            repetition_penalty: v.get("repetition_penalty").and_then(Value::as_f64),
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: v.get("temperature").and_then(Value::as_f64),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            top_p: v.get("top_p").and_then(Value::as_f64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/qwen2_5_vl_tiny")
            .join(name)
    }

    #[test]
    fn reads_flat_config() {
        let c = Qwen25VlConfig::from_file(&fixture("config.json")).expect("config");
        assert_eq!(c.text.hidden_size, 32);
        assert_eq!(c.text.head_dim(), 8);
        assert_eq!(c.text.mrope_section, vec![1, 1, 2]);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.vision.fullatt_block_indexes, vec![1, 3]);
        assert_eq!(c.image_token_id, 151655);
    }

    #[test]
    fn reads_nested_config() {
        let flat: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap())
                .unwrap();
        let mut text = serde_json::Map::new();
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "vocab_size",
        ] {
            text.insert(key.into(), flat[key].clone());
        }
        let nested = serde_json::json!({
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": flat["vision_config"].clone(),
            "image_token_id": 151655,
            "tie_word_embeddings": true,
        });
        let a = Qwen25VlConfig::from_file(&fixture("config.json")).unwrap();
        let b = Qwen25VlConfig::from_value(Path::new("nested.json"), &nested).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn missing_key_is_named() {
        let v = serde_json::json!({"vision_config": {}});
        let err = Qwen25VlConfig::from_value(Path::new("x/config.json"), &v).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x/config.json"), "{msg}");
        assert!(
            msg.contains("mrope_section") || msg.contains("hidden_size"),
            "{msg}"
        );
    }

    fn fixture_value() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap()
    }

    #[test]
    fn token_ids_are_not_narrowed() {
        // 2^32 + 151655 was narrowed to 151655 by `as u32`.
        let mut v = fixture_value();
        v["image_token_id"] = serde_json::json!(4_295_119_951u64);
        let e = Qwen25VlConfig::from_value(Path::new("m/config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("`image_token_id`"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("generation_config.json");
        for (body, field) in [
            (
                r#"{"eos_token_id": [151645, 4294967296]}"#,
                "eos_token_id[1]",
            ),
            (r#"{"eos_token_id": 4294967296}"#, "eos_token_id"),
            (r#"{"pad_token_id": 4294967296}"#, "pad_token_id"),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = GenerationDefaults::from_file(&p).unwrap_err().to_string();
            assert!(
                e.contains("generation_config.json") && e.contains(field),
                "{e}"
            );
        }
    }

    #[test]
    fn mrope_section_sum_is_checked() {
        // Wrapped to 4 (* 2 = head_dim 8) in the optimised build.
        let mut v = fixture_value();
        v["rope_scaling"]["mrope_section"] = serde_json::json!([
            9_223_372_036_854_775_808u64,
            9_223_372_036_854_775_808u64,
            4
        ]);
        let e = Qwen25VlConfig::from_value(Path::new("m/config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("mrope_section"),
            "{e}"
        );
        let mut v = fixture_value();
        v["vision_config"]["spatial_merge_size"] = serde_json::json!(0);
        let e = Qwen25VlConfig::from_value(Path::new("m/config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_config.spatial_merge_size"), "{e}");
    }

    #[test]
    fn pixel_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("preprocessor_config.json");
        for (body, field) in [
            (
                r#"{"min_pixels": 1000, "max_pixels": 10}"#,
                "`min_pixels` (1000)",
            ),
            (r#"{"min_pixels": 0}"#, "`min_pixels`"),
            (r#"{"max_pixels": 18446744073709551615}"#, "`max_pixels`"),
            (r#"{"size": {"shortest_edge": 0}}"#, "`size.shortest_edge`"),
            (r#"{"merge_size": 0}"#, "`merge_size`"),
            (r#"{"patch_size": 0}"#, "`patch_size`"),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = PreprocessorConfig::from_file(&p).unwrap_err().to_string();
            assert!(
                e.contains("preprocessor_config.json") && e.contains(field),
                "{body}: {e}"
            );
        }
        std::fs::write(&p, r#"{"min_pixels": 3136, "max_pixels": 12845056}"#).unwrap();
        let c = PreprocessorConfig::from_file(&p).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12845056));
    }

    #[test]
    fn reads_generation_and_preprocessor() {
        let g = GenerationDefaults::from_file(&fixture("generation_config.json")).unwrap();
        assert_eq!(g.eos_token_ids, vec![151645, 151643]);
        assert_eq!(g.repetition_penalty, Some(1.05));
        let p = PreprocessorConfig::from_file(&fixture("preprocessor_config.json")).unwrap();
        assert_eq!(p.min_pixels, 3136);
        assert_eq!(p.max_pixels, 200704);
    }
}
