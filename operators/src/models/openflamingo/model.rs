//! The whole OpenFlamingo model: where its files are, loading them, and
//! answering a batch of prompts (images encoded once per distinct image,
//! prompts left-padded with EOS, greedy or beam search shared with
//! Qwen2.5-VL).

use super::config::{ConfigError, LmConfig, VisionConfig};
use super::image::preprocess;
use super::lm::{FlamingoCache, FlamingoLm};
use super::perceiver::Perceiver;
use super::prompt::{FlamingoTokenizer, PromptError};
use super::vision::VisionTower;
use super::weights::{
    find_file, flamingo_key, lm_key, model_files, vision_key, WeightSet, WeightsError, WTE,
};
use crate::image_decode::{self, ImageDecodeError, ImageInput, ImageLimits};
use crate::models::qwen2_5_vl::generate::{
    search, DecodeTraffic, GenerateError, GeneratedSequence, GenerationConfig, Ranking, SearchStart,
};
use crate::tensor_io::NamedTensor;
use burn::tensor::{backend::Backend, Tensor};
use std::path::{Path, PathBuf};

/// Errors of loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum FlamingoError {
    /// A configuration file is missing a field or unreadable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weight file is missing or does not fit the configuration.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The tokenizer files are unusable.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// An image could not be read.
    #[error(transparent)]
    Image(#[from] ImageDecodeError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// A file of the layout is missing.
    #[error("{}: {what} not found", path.display())]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
}

/// The files of an OpenFlamingo model.
#[derive(Debug, Clone, PartialEq)]
pub struct FlamingoFiles {
    /// The language model's directory (`config.json`, weights, tokenizer).
    pub lm_dir: PathBuf,
    /// open_clip model config (`vision_config.json` or
    /// `open_clip_config.json`).
    pub vision_config: PathBuf,
    /// open_clip weights (`visual.*` keys).
    pub vision_weights: PathBuf,
    /// OpenFlamingo's checkpoint (perceiver, cross-attention, embedding).
    pub checkpoint: PathBuf,
}

impl FlamingoFiles {
    /// The local layout of a directory: `lm/` (the language model's
    /// repository), `vision_config.json` + `vision.safetensors` (or a
    /// `vision/` open_clip repository: `open_clip_config.json` +
    /// `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), and
    /// `flamingo_checkpoint.safetensors` or `checkpoint.pt`.
    pub fn from_dir(dir: &Path) -> Result<Self, FlamingoError> {
        let lm_dir = dir.join("lm");
        if !lm_dir.join("config.json").is_file() {
            return Err(FlamingoError::Missing {
                path: lm_dir.join("config.json"),
                what: "the language model's config".into(),
            });
        }
        let (vision_config, vision_weights) = if dir.join("vision_config.json").is_file() {
            (
                dir.join("vision_config.json"),
                find_file(dir, &["vision.safetensors", "vision.pt", "vision.bin"])?,
            )
        } else {
            let v = dir.join("vision");
            (
                find_file(&v, &["open_clip_config.json"])?,
                find_file(
                    &v,
                    &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
                )?,
            )
        };
        let checkpoint = find_file(dir, &["flamingo_checkpoint.safetensors", "checkpoint.pt"])?;
        Ok(Self {
            lm_dir,
            vision_config,
            vision_weights,
            checkpoint,
        })
    }

    /// Every file that defines the model's behaviour (configs, tokenizer,
    /// weights) with a label that does not depend on where the files live
    /// (`lm/<name>`, `vision/<name>`, the checkpoint's name), for the
    /// model's identity.
    pub fn all(&self) -> Result<Vec<(String, PathBuf)>, FlamingoError> {
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut out: Vec<(String, PathBuf)> = model_files(&self.lm_dir)?
            .into_iter()
            .map(|p| (format!("lm/{}", name(&p)), p))
            .collect();
        for file in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let p = self.lm_dir.join(file);
            if p.is_file() {
                out.push((format!("lm/{file}"), p));
            }
        }
        for p in [&self.vision_config, &self.vision_weights] {
            out.push((format!("vision/{}", name(p)), p.clone()));
        }
        out.push((name(&self.checkpoint), self.checkpoint.clone()));
        Ok(out)
    }
}

/// One prompt: in-context examples (image, question, answer) and the query.
#[derive(Debug, Clone, PartialEq)]
pub struct FlamingoPrompt {
    /// Examples in order: image file, question, answer.
    pub examples: Vec<(PathBuf, String, String)>,
    /// Query image file.
    pub query_image: PathBuf,
    /// Query question.
    pub query_question: String,
}

impl FlamingoPrompt {
    /// The prompt's images in order (examples', then the query's).
    pub fn images(&self) -> Vec<&Path> {
        self.examples
            .iter()
            .map(|e| e.0.as_path())
            .chain(std::iter::once(self.query_image.as_path()))
            .collect()
    }
}

/// A batch ready for the language model.
#[derive(Debug, Clone)]
pub struct FlamingoBatch<B: Backend> {
    /// Prompt ids, left-padded with EOS.
    pub input_ids: Vec<Vec<u32>>,
    /// false on padding.
    pub valid: Vec<Vec<bool>>,
    /// Image latents per row `[rows, max images, latents, vis_dim]` (rows
    /// with fewer images padded with a zero image's latents).
    pub media: Tensor<B, 4>,
    /// Each prompt's text.
    pub texts: Vec<String>,
    /// Each prompt's ids without padding.
    pub prompt_ids: Vec<Vec<u32>>,
}

/// A loaded OpenFlamingo model.
#[derive(Debug)]
pub struct OpenFlamingo<B: Backend> {
    /// Vision tower configuration (image size, normalisation).
    pub vision_config: VisionConfig,
    /// The tokenizer with OpenFlamingo's tokens.
    pub tokenizer: FlamingoTokenizer,
    vision: VisionTower<B>,
    perceiver: Perceiver<B>,
    /// The language model with its cross-attention layers.
    pub lm: FlamingoLm<B>,
    /// Latents of an all-zero image (the padding of image slots, as the
    /// original's zero-filled `vision_x`).
    zero_latents: Tensor<B, 3>,
    device: B::Device,
}

impl<B: Backend> OpenFlamingo<B> {
    /// Loads the model of a directory ([`FlamingoFiles::from_dir`]).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, FlamingoError> {
        Self::load_files(&FlamingoFiles::from_dir(dir)?, device)
    }

    /// Loads the model from its files, as open-flamingo's factory does: the
    /// language model, its token embedding resized to the tokenizer, the
    /// vision tower, then the checkpoint over them.
    pub fn load_files(files: &FlamingoFiles, device: &B::Device) -> Result<Self, FlamingoError> {
        let tokenizer = FlamingoTokenizer::from_dir(&files.lm_dir)?;
        let lm_cfg = LmConfig::from_file(&files.lm_dir.join("config.json"))?;
        let vision_config = VisionConfig::from_file(&files.vision_config)?;
        let vocab = tokenizer.vocab_len;
        let mut w = WeightSet::default();
        // `resize_token_embeddings(len(tokenizer))`: the language model's
        // embedding keeps its first `vocab` rows.
        let resize = move |name: &str, t: NamedTensor| -> Result<NamedTensor, WeightsError> {
            match (name == WTE, t.shape.as_slice()) {
                (true, &[rows, d]) if rows > vocab => Ok(NamedTensor {
                    shape: vec![vocab, d],
                    data: t.data[..vocab * d].to_vec(),
                }),
                _ => Ok(t),
            }
        };
        for f in model_files(&files.lm_dir)? {
            w.add_file(&f, lm_key, &resize)?;
        }
        w.add_file(&files.vision_weights, vision_key, &|_, t| Ok(t))?;
        w.add_file(&files.checkpoint, flamingo_key, &|_, t| Ok(t))?;
        let vision = VisionTower::load(&vision_config, &mut w, device)?;
        let vis_dim = vision_config.width;
        let perceiver = Perceiver::load(&mut w, vis_dim, device)?;
        let lm = FlamingoLm::load(
            &lm_cfg,
            &mut w,
            vocab,
            vis_dim,
            tokenizer.image_token_id,
            device,
        )?;
        let s = vision_config.image_size;
        let zeros = vec![0f32; 3 * s * s];
        let zero_latents = perceiver.forward(vision.forward(&zeros, 1, device));
        Ok(Self {
            vision_config,
            tokenizer,
            vision,
            perceiver,
            lm,
            zero_latents,
            device: device.clone(),
        })
    }

    /// Reads and preprocesses an image file (`3 x S x S` values).
    pub fn pixels(&self, path: &Path, limits: &ImageLimits) -> Result<Vec<f32>, FlamingoError> {
        let img = image_decode::decode_rgb(ImageInput::File(path), limits)?;
        Ok(preprocess(&img, &self.vision_config))
    }

    /// Patch tokens of `n` preprocessed images `[n, tokens, width]`.
    pub fn vision_tokens(&self, pixels: &[f32], n: usize) -> Tensor<B, 3> {
        self.vision.forward(pixels, n, &self.device)
    }

    /// Perceiver latents of `n` preprocessed images `[n, latents, width]`.
    pub fn latents(&self, pixels: &[f32], n: usize) -> Tensor<B, 3> {
        self.perceiver.forward(self.vision_tokens(pixels, n))
    }

    /// Builds the batch of `prompts`: each prompt's ids, left padding with
    /// EOS, and its images' latents from `latents_of` (one `[latents,
    /// width]` tensor per image of the prompt, in order).
    pub fn batch(
        &self,
        prompts: &[FlamingoPrompt],
        latents_of: &mut dyn FnMut(&Path) -> Result<Tensor<B, 2>, FlamingoError>,
    ) -> Result<FlamingoBatch<B>, FlamingoError> {
        let mut texts = Vec::with_capacity(prompts.len());
        let mut prompt_ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (text, ids) = self.tokenizer.prompt(
                p.examples.iter().map(|(_, q, a)| (q.as_str(), a.as_str())),
                &p.query_question,
            )?;
            texts.push(text);
            prompt_ids.push(ids);
        }
        let len = prompt_ids.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.tokenizer.eos_token_id;
        let input_ids = prompt_ids
            .iter()
            .map(|ids| {
                let mut row = vec![pad; len - ids.len()];
                row.extend_from_slice(ids);
                row
            })
            .collect();
        let valid = prompt_ids
            .iter()
            .map(|ids| (0..len).map(|i| i >= len - ids.len()).collect())
            .collect();
        let slots = prompts.iter().map(|p| p.images().len()).max().unwrap_or(0);
        let [_, m, d] = self.zero_latents.dims();
        let zero = self.zero_latents.clone().reshape([m, d]);
        let mut rows = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut imgs = Vec::with_capacity(slots);
            for path in p.images() {
                imgs.push(latents_of(path)?);
            }
            while imgs.len() < slots {
                imgs.push(zero.clone());
            }
            rows.push(Tensor::stack::<3>(imgs, 0));
        }
        Ok(FlamingoBatch {
            input_ids,
            valid,
            media: Tensor::stack(rows, 0),
            texts,
            prompt_ids,
        })
    }

    /// The prefilled state of a batch and its logits (every position when
    /// `all_logits`, else the last one).
    pub fn prefill(
        &self,
        batch: &FlamingoBatch<B>,
        all_logits: bool,
    ) -> Result<(FlamingoCache<B>, Tensor<B, 3>), FlamingoError> {
        Ok(self.lm.prefill(
            &batch.input_ids,
            &batch.valid,
            batch.media.clone(),
            all_logits,
        )?)
    }

    /// Generates for every prompt of a batch (greedy or beam search, as
    /// `config` says); new ids per prompt.
    pub fn generate(
        &self,
        batch: &FlamingoBatch<B>,
        config: &GenerationConfig,
    ) -> Result<Vec<GeneratedSequence>, FlamingoError> {
        let (cache, logits) = self.prefill(batch, false)?;
        let [rows, _, vocab] = logits.dims();
        let last = logits.reshape([rows, vocab]);
        let start = SearchStart {
            cache: &cache,
            last_logits: &last,
            input_ids: &batch.input_ids,
        };
        Ok(search(
            &self.lm,
            start,
            config,
            Ranking::Auto,
            &mut DecodeTraffic::default(),
        )?)
    }

    /// Latents of each of `paths` (a batch's distinct images), computed in
    /// one vision pass.
    pub fn latents_of_files(
        &self,
        paths: &[&Path],
        limits: &ImageLimits,
    ) -> Result<Vec<Tensor<B, 2>>, FlamingoError> {
        let mut pixels = Vec::new();
        for p in paths {
            pixels.extend(self.pixels(p, limits)?);
        }
        let n = paths.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let lat = self.latents(&pixels, n);
        let [_, m, d] = lat.dims();
        Ok((0..n)
            .map(|i| lat.clone().slice([i..i + 1, 0..m, 0..d]).reshape([m, d]))
            .collect())
    }

    /// The generation settings of the original project for this model:
    /// beam search with 3 beams, 5 new tokens, length penalty 0, stopping at
    /// and padding with EOS.
    pub fn original_generation(&self) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: 5,
            min_new_tokens: 0,
            num_beams: 3,
            length_penalty: 0.0,
            repetition_penalty: 1.0,
            do_sample: false,
            eos_token_ids: vec![self.tokenizer.eos_token_id],
            pad_token_id: self.tokenizer.eos_token_id,
            early_stopping: false,
        }
    }
}

/// Reads a tensor's values back to the host (tests and diagnostics).
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}
