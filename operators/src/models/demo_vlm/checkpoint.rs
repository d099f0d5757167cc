//! The demo checkpoint directory: Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.json`, `preprocessor_config.json`,
//! `generation_config.json`) with the published Qwen2.5-VL tensor names, a
//! word-level tokenizer and small dimensions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use super::{io_err, DemoVlmError};
use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
use crate::models::qwen2_5_vl::processor::DEFAULT_SYSTEM_PROMPT;
use crate::models::qwen2_5_vl::text::TextModel;
use crate::models::qwen2_5_vl::vision::VisionTower;
use crate::models::qwen2_5_vl::weights::expected_shapes;

/// The chat template of the published Qwen2.5-VL checkpoints, verbatim.
pub const QWEN2_5_VL_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Qwen's special tokens (`special: true` in the published tokenizer), in
/// the published order; they get consecutive ids after the words.
pub const SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// The word-level tokenizer's unknown token (id 0).
pub const UNK_TOKEN: &str = "<unk>";

/// Pre-tokenization pattern of the `Whitespace` pre-tokenizer of HF
/// `tokenizers` (words, and runs of other non-space characters).
const WORD_PATTERN: &str = r"\w+|[^\w\s]+";

/// Texts the prompts are made of besides the questions and answers: the
/// system prompts and the words of the chat template and prompt format.
pub fn prompt_corpus() -> Vec<String> {
    vec![
        DEFAULT_SYSTEM_PROMPT.to_owned(),
        "You are a helpful assistant.".to_owned(),
        "system user assistant".to_owned(),
        "Question: Short answer:".to_owned(),
        "Picture 1: Video 1:".to_owned(),
    ]
}

/// The word vocabulary of `texts`: every `\w+|[^\w\s]+` piece, sorted.
pub fn word_vocabulary<S: AsRef<str>>(texts: &[S]) -> Result<Vec<String>, DemoVlmError> {
    let re = regex::Regex::new(WORD_PATTERN)
        .map_err(|e| DemoVlmError::Invalid(format!("word pattern: {e}")))?;
    let mut words = BTreeSet::new();
    for t in texts {
        for m in re.find_iter(t.as_ref()) {
            words.insert(m.as_str().to_owned());
        }
    }
    Ok(words.into_iter().collect())
}

/// Model dimensions of the demo checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoDims {
    /// Language model width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Decoder MLP width.
    pub intermediate_size: usize,
    /// Vision tower width.
    pub vision_hidden_size: usize,
    /// Vision blocks.
    pub vision_depth: usize,
    /// Vision heads.
    pub vision_num_heads: usize,
    /// Vision MLP width.
    pub vision_intermediate_size: usize,
    /// Smallest resized image area in pixels (`min_pixels`).
    pub min_pixels: usize,
    /// Largest resized image area in pixels (`max_pixels`).
    pub max_pixels: usize,
}

impl Default for DemoDims {
    /// Hidden 64, 2 decoder layers, a 2-block vision tower; a 64x64
    /// easy-VQA image becomes 56x56 = 4x4 patches = 4 image tokens.
    fn default() -> Self {
        Self {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 256,
            vision_hidden_size: 64,
            vision_depth: 2,
            vision_num_heads: 4,
            vision_intermediate_size: 128,
            min_pixels: 56 * 56,
            max_pixels: 112 * 112,
        }
    }
}

/// Token ids of the demo tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoVocab {
    /// Words in id order (id 0 = [`UNK_TOKEN`]).
    pub words: Vec<String>,
    /// Id of the first special token; the specials follow in
    /// [`SPECIAL_TOKENS`] order.
    pub first_special: u32,
    /// Rows of the embedding table (the token count rounded up to 16).
    pub vocab_size: usize,
}

impl DemoVocab {
    /// `<unk>`, then `words` (sorted, deduplicated), then the specials.
    pub fn new(words: &[String]) -> Self {
        let mut all = vec![UNK_TOKEN.to_owned()];
        let set: BTreeSet<&String> = words.iter().collect();
        all.extend(set.into_iter().filter(|w| *w != UNK_TOKEN).cloned());
        let first_special = all.len() as u32;
        let n = all.len() + SPECIAL_TOKENS.len();
        Self {
            words: all,
            first_special,
            vocab_size: n.div_ceil(16) * 16,
        }
    }

    /// Id of special token `tok` (one of [`SPECIAL_TOKENS`]).
    pub fn special(&self, tok: &str) -> Result<u32, DemoVlmError> {
        SPECIAL_TOKENS
            .iter()
            .position(|s| *s == tok)
            .map(|i| self.first_special + i as u32)
            .ok_or_else(|| DemoVlmError::Invalid(format!("`{tok}` is not a special token")))
    }

    /// `tokenizer.json`: a WordLevel model behind HF's `Whitespace`
    /// pre-tokenizer, the specials as added tokens, no decoder (tokens are
    /// joined with spaces).
    pub fn tokenizer_json(&self) -> Value {
        let mut vocab = serde_json::Map::new();
        for (i, w) in self.words.iter().enumerate() {
            vocab.insert(w.clone(), json!(i));
        }
        let mut added = Vec::new();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            let id = self.first_special as usize + i;
            vocab.insert((*s).to_owned(), json!(id));
            added.push(json!({
                "id": id, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK_TOKEN}
        })
    }

    /// `tokenizer_config.json`, as the published one but for this vocabulary.
    pub fn tokenizer_config_json(&self) -> Value {
        let mut decoder = serde_json::Map::new();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            decoder.insert(
                (self.first_special as usize + i).to_string(),
                json!({"content": s, "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true}),
            );
        }
        json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": SPECIAL_TOKENS[1..].to_vec(),
            "bos_token": null,
            "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": UNK_TOKEN
        })
    }
}

/// `mrope_section` for a head dimension, in the published 1:1.5:1.5 split
/// of the rotary frequencies (16/24/24 of 64 for head_dim 128).
fn mrope_section(head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let t = (half / 4).max(1);
    let h = (half - t) / 2;
    vec![t, h, half - t - h]
}

/// `config.json` of the demo model (untied LM head, like the 7B model).
pub fn config_json(dims: &DemoDims, vocab: &DemoVocab) -> Result<Value, DemoVlmError> {
    let d = dims;
    let head_dim = d.hidden_size / d.num_attention_heads.max(1);
    let id = |t: &str| vocab.special(t);
    let vision = json!({
            "depth": d.vision_depth,
            "hidden_act": "silu",
            "hidden_size": d.vision_hidden_size,
            "intermediate_size": d.vision_intermediate_size,
            "num_heads": d.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": d.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [d.vision_depth.saturating_sub(1)],
            "tokens_per_second": 2,
            "temporal_patch_size": 2
    });
    Ok(json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": id("<|im_end|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
        "vision_end_token_id": id("<|vision_end|>")?,
        "vision_token_id": id("<|vision_pad|>")?,
        "image_token_id": id("<|image_pad|>")?,
        "video_token_id": id("<|video_pad|>")?,
        "hidden_act": "silu",
        "hidden_size": d.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": d.num_attention_heads,
        "num_hidden_layers": d.num_hidden_layers,
        "num_key_value_heads": d.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(head_dim)},
        "vocab_size": vocab.vocab_size
    }))
}

/// `preprocessor_config.json` (the published one with this model's pixel
/// bounds).
pub fn preprocessor_json(dims: &DemoDims) -> Value {
    json!({
        "min_pixels": dims.min_pixels,
        "max_pixels": dims.max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_resize": true,
        "do_rescale": true,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": true,
        "do_convert_rgb": true,
        "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"
    })
}

/// `generation_config.json`: the published settings (EOS `<|im_end|>` and
/// `<|endoftext|>`, repetition penalty 1.05) with this vocabulary's ids.
pub fn generation_json(vocab: &DemoVocab) -> Result<Value, DemoVlmError> {
    let pad = vocab.special("<|endoftext|>")?;
    let eos = vocab.special("<|im_end|>")?;
    Ok(json!({
        "bos_token_id": pad,
        "pad_token_id": pad,
        "do_sample": true,
        "eos_token_id": [eos, pad],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.49.0"
    }))
}

fn write_json(path: &Path, v: &Value) -> Result<(), DemoVlmError> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| DemoVlmError::Invalid(format!("{}: {e}", path.display())))?;
    s.push('\n');
    std::fs::write(path, s).map_err(io_err(path))
}

/// Writes every file of the checkpoint directory except the weights.
pub fn write_checkpoint_files(
    dir: &Path,
    dims: &DemoDims,
    vocab: &DemoVocab,
) -> Result<(), DemoVlmError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_json(&dir.join("config.json"), &config_json(dims, vocab)?)?;
    write_json(
        &dir.join("generation_config.json"),
        &generation_json(vocab)?,
    )?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(dims),
    )?;
    write_json(
        &dir.join("chat_template.json"),
        &json!({ "chat_template": QWEN2_5_VL_CHAT_TEMPLATE }),
    )?;
    write_json(&dir.join("tokenizer.json"), &vocab.tokenizer_json())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &vocab.tokenizer_config_json(),
    )?;
    Ok(())
}

/// A named float32 tensor in Hugging Face layout.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    /// Published key.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Writes `tensors` as one float32 `model.safetensors` (metadata
/// `format: pt`, like `save_pretrained`).
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<(), DemoVlmError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| DemoVlmError::Invalid(format!("tensor {}: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    let meta: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| DemoVlmError::Data {
        path: path.to_path_buf(),
        message: format!("cannot write safetensors: {e}"),
    })
}

/// Random initial weights for every tensor of `config` (HF's
/// `_init_weights`: normal(0, initializer_range) for matrices, 1 for norm
/// weights, 0 for biases), drawn from ChaCha8 seeded with `seed` in the
/// order of [`expected_shapes`].
pub fn random_weights(config: &Qwen25VlConfig, seed: u64, std: f32) -> Vec<NamedTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        // Box-Muller on two uniforms in (0, 1].
        let u1: f32 = 1.0 - rng.random::<f32>();
        let u2: f32 = rng.random::<f32>();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    expected_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight")
                || name.ends_with("norm1.weight")
                || name.ends_with("norm2.weight")
                || name.ends_with("ln_q.weight");
            let values = if is_norm {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal() * std).collect()
            };
            NamedTensor {
                name,
                shape,
                values,
            }
        })
        .collect()
}

fn values<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Result<Vec<f32>, DemoVlmError> {
    t.to_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| DemoVlmError::Invalid(format!("tensor read-back: {e:?}")))
}

fn transposed<B: Backend>(p: &Param<Tensor<B, 2>>) -> Result<(Vec<usize>, Vec<f32>), DemoVlmError> {
    let t = p.val().transpose();
    let [r, c] = t.dims();
    Ok((vec![r, c], values(&t)?))
}

struct Exporter(Vec<NamedTensor>);

impl Exporter {
    fn push(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        self.0.push(NamedTensor {
            name,
            shape,
            values,
        });
    }

    /// burn stores `[in, out]`; PyTorch `[out, in]`.
    fn linear<B: Backend>(&mut self, prefix: &str, l: &Linear<B>) -> Result<(), DemoVlmError> {
        let (shape, v) = transposed(&l.weight)?;
        self.push(format!("{prefix}.weight"), shape, v);
        if let Some(b) = &l.bias {
            let t = b.val();
            self.push(format!("{prefix}.bias"), t.dims().to_vec(), values(&t)?);
        }
        Ok(())
    }

    fn norm<B: Backend>(&mut self, key: String, n: &RmsNorm<B>) -> Result<(), DemoVlmError> {
        let t = n.gamma.val();
        self.push(key, t.dims().to_vec(), values(&t)?);
        Ok(())
    }
}

/// The weights of a vision tower and decoder under the published
/// Qwen2.5-VL names (`visual.*`, `model.*`, `lm_head.weight`), in the
/// layouts [`VisionTower::load`] and [`TextModel::load`] read.
pub fn export_weights<B: Backend>(
    vision: &VisionTower<B>,
    text: &TextModel<B>,
) -> Result<Vec<NamedTensor>, DemoVlmError> {
    let mut e = Exporter(Vec::new());
    let emb = text.token_embedding();
    e.push(
        "model.embed_tokens.weight".into(),
        emb.dims().to_vec(),
        values(&emb)?,
    );
    for (i, l) in text.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        e.norm(format!("{p}.input_layernorm.weight"), &l.input_layernorm)?;
        e.linear(&format!("{p}.self_attn.q_proj"), &l.self_attn.q_proj)?;
        e.linear(&format!("{p}.self_attn.k_proj"), &l.self_attn.k_proj)?;
        e.linear(&format!("{p}.self_attn.v_proj"), &l.self_attn.v_proj)?;
        e.linear(&format!("{p}.self_attn.o_proj"), &l.self_attn.o_proj)?;
        e.norm(
            format!("{p}.post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        )?;
        e.linear(&format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj)?;
        e.linear(&format!("{p}.mlp.up_proj"), &l.mlp.up_proj)?;
        e.linear(&format!("{p}.mlp.down_proj"), &l.mlp.down_proj)?;
    }
    e.norm("model.norm.weight".into(), &text.norm)?;
    let head = text.lm_head_rows();
    e.push(
        "lm_head.weight".into(),
        head.dims().to_vec(),
        values(&head)?,
    );

    let c = &vision.config;
    let (_, v) = transposed(&vision.patch_embed.weight)?;
    e.push(
        "visual.patch_embed.proj.weight".into(),
        vec![
            c.hidden_size,
            c.in_chans,
            c.temporal_patch_size,
            c.patch_size,
            c.patch_size,
        ],
        v,
    );
    for (i, b) in vision.blocks.iter().enumerate() {
        let p = format!("visual.blocks.{i}");
        e.norm(format!("{p}.norm1.weight"), &b.norm1)?;
        e.norm(format!("{p}.norm2.weight"), &b.norm2)?;
        e.linear(&format!("{p}.attn.qkv"), &b.attn.qkv)?;
        e.linear(&format!("{p}.attn.proj"), &b.attn.proj)?;
        e.linear(&format!("{p}.mlp.gate_proj"), &b.mlp.gate)?;
        e.linear(&format!("{p}.mlp.up_proj"), &b.mlp.up)?;
        e.linear(&format!("{p}.mlp.down_proj"), &b.mlp.down)?;
    }
    e.norm("visual.merger.ln_q.weight".into(), &vision.merger.ln_q)?;
    e.linear("visual.merger.mlp.0", &vision.merger.fc1)?;
    e.linear("visual.merger.mlp.2", &vision.merger.fc2)?;
    Ok(e.0)
}

/// Checks that `tensors` are exactly the tensors `config` expects, with
/// the expected shapes.
pub fn check_complete(
    config: &Qwen25VlConfig,
    tensors: &[NamedTensor],
) -> Result<(), DemoVlmError> {
    let want: BTreeMap<String, Vec<usize>> = expected_shapes(config).into_iter().collect();
    let got: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    if want != got {
        return Err(DemoVlmError::Invalid(format!(
            "exported tensors differ from the expected ones: missing {:?}, unexpected or mis-shaped {:?}",
            want.iter().filter(|(k, v)| got.get(*k) != Some(v)).map(|(k, _)| k).collect::<Vec<_>>(),
            got.iter().filter(|(k, v)| want.get(*k) != Some(v)).map(|(k, _)| k).collect::<Vec<_>>(),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::qwen2_5_vl::model::Qwen25Vl;
    use burn::backend::NdArray;

    fn small_dims() -> DemoDims {
        DemoDims {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 32,
            vision_hidden_size: 16,
            vision_depth: 2,
            vision_num_heads: 2,
            vision_intermediate_size: 32,
            min_pixels: 56 * 56,
            max_pixels: 56 * 56,
        }
    }

    fn write_small(dir: &Path) -> (DemoVocab, Vec<NamedTensor>) {
        let mut corpus = prompt_corpus();
        corpus.push("is there a red shape?".into());
        corpus.push("yes".into());
        let vocab = DemoVocab::new(&word_vocabulary(&corpus).unwrap());
        write_checkpoint_files(dir, &small_dims(), &vocab).unwrap();
        let config = Qwen25VlConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = random_weights(&config, 7, 0.02);
        check_complete(&config, &weights).unwrap();
        write_safetensors(&dir.join("model.safetensors"), &weights).unwrap();
        (vocab, weights)
    }

    #[test]
    fn mrope_sections_sum_to_half_the_head() {
        assert_eq!(mrope_section(128), vec![16, 24, 24]);
        assert_eq!(mrope_section(16), vec![2, 3, 3]);
        assert_eq!(mrope_section(8), vec![1, 1, 2]);
    }

    #[test]
    fn checkpoint_loads_and_exports_the_same_weights() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, weights) = write_small(dir.path());
        let m = Qwen25Vl::<NdArray<f32>>::load(dir.path(), &Default::default()).unwrap();
        assert_eq!(
            m.processor.image_token_id(),
            vocab.special("<|image_pad|>").unwrap()
        );
        assert_eq!(m.config.image_token_id, m.processor.image_token_id());
        assert_eq!(
            m.processor.eos_token_id(),
            Some(vocab.special("<|im_end|>").unwrap())
        );
        let back = export_weights(&m.vision, &m.text).unwrap();
        let by_name: BTreeMap<&str, &NamedTensor> =
            back.iter().map(|t| (t.name.as_str(), t)).collect();
        assert_eq!(back.len(), weights.len());
        for w in &weights {
            let b = by_name[w.name.as_str()];
            assert_eq!(b.shape, w.shape, "{}", w.name);
            assert_eq!(b.values, w.values, "{}", w.name);
        }
    }

    #[test]
    fn tokenizer_splits_the_prompt_format_and_decodes_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, _) = write_small(dir.path());
        let m = Qwen25Vl::<NdArray<f32>>::load(dir.path(), &Default::default()).unwrap();
        let p = &m.processor;
        let ids = p
            .encode("<|im_start|>user\nQuestion:is there a red shape? Short answer:yes<|im_end|>")
            .unwrap();
        let unk = p.tokenizer().token_to_id(UNK_TOKEN).unwrap();
        assert!(!ids.contains(&unk));
        assert_eq!(ids.len(), 15);
        assert_eq!(ids[0], vocab.special("<|im_start|>").unwrap());
        let yes = p.encode("yes").unwrap();
        assert_eq!(yes.len(), 1);
        let eos = vocab.special("<|im_end|>").unwrap();
        assert_eq!(p.decode(&[yes[0], eos], true).unwrap(), "yes");
        assert_eq!(p.encode("purple").unwrap(), vec![unk]);
    }
}
