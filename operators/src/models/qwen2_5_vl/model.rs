//! The whole Qwen2.5-VL model behind the `vqa` contract: a checkpoint
//! directory loaded once ([`Qwen25Vl`]), and per-worker answerers
//! ([`QwenVqa`]) that batch prompts, cache vision embeddings per image and
//! decode with HF's greedy / beam-search semantics.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::{ConfigError, GenerationDefaults, Qwen25VlConfig};
use super::generate::{
    answer_probabilities, generate_counted, original_cond_prob, prefill, AnswerScoring,
    DecodeTraffic, GenerateError, GenerationConfig, PromptBatch, Ranking,
};
use super::image::ProcessedImage;
use super::processor::{ImageSource, Processor, ProcessorError, PromptRequest};
use super::text::{TextError, TextModel};
use super::vision::{VisionError, VisionTower, VisionTowerConfig};
use super::weights::{WeightStore, WeightsError};
use crate::models::contract::{GtProbMode, VqaAnswer, VqaError, VqaModel, VqaPrompt};

/// Errors while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `--vqa_model` is not a local directory.
    #[error("{0}: not a local directory; pass the directory of a downloaded Qwen2.5-VL checkpoint (config.json, model*.safetensors, tokenizer.json, ...), e.g. one fetched with `huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir DIR` on a machine with network access")]
    NotADirectory(String),
    /// A configuration file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weights are missing or mis-shaped.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Tokenizer, template or image processing failed.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// The vision tower failed.
    #[error(transparent)]
    Vision(#[from] VisionError),
    /// The language model failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
}

/// A loaded checkpoint: configuration, processor, vision tower and decoder.
pub struct Qwen25Vl<B: Backend> {
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// Model configuration.
    pub config: Qwen25VlConfig,
    /// Tokenizer, chat template and image preprocessing.
    pub processor: Processor,
    /// Vision tower.
    pub vision: VisionTower<B>,
    /// Language model.
    pub text: TextModel<B>,
    /// `generation_config.json` defaults.
    pub generation_defaults: GenerationDefaults,
    /// Device the weights live on.
    pub device: B::Device,
}

impl<B: Backend> Qwen25Vl<B> {
    /// Loads a Hugging Face snapshot directory; every missing or mis-shaped
    /// tensor is reported at once.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotADirectory(dir.display().to_string()));
        }
        let config = Qwen25VlConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir, config.text.tie_word_embeddings)?;
        store.check_all(&config)?;
        let processor = Processor::from_dir(dir)?;
        let vision = VisionTower::load(
            &store,
            &VisionTowerConfig::from_config(&config.vision),
            device,
        )?;
        let text = TextModel::load(&config.text, &store, device)?;
        let gen_path = dir.join("generation_config.json");
        let generation_defaults = if gen_path.exists() {
            GenerationDefaults::from_file(&gen_path)?
        } else {
            GenerationDefaults::default()
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            processor,
            vision,
            text,
            generation_defaults,
            device: device.clone(),
        })
    }
}

/// Per-image vision embeddings kept across batches, bounded in bytes
/// (least recently used first out).
pub struct VisionCache<B: Backend> {
    capacity_bytes: usize,
    used_bytes: usize,
    entries: HashMap<PathBuf, (Arc<ProcessedImage>, Tensor<B, 2>, usize)>,
    order: VecDeque<PathBuf>,
    /// Images encoded by the vision tower.
    pub encoded: u64,
    /// Images served from the cache.
    pub hits: u64,
}

impl<B: Backend> VisionCache<B> {
    /// An empty cache of `capacity_mb` MiB.
    pub fn new(capacity_mb: usize) -> Self {
        Self {
            capacity_bytes: capacity_mb.saturating_mul(1 << 20),
            used_bytes: 0,
            entries: HashMap::new(),
            order: VecDeque::new(),
            encoded: 0,
            hits: 0,
        }
    }

    fn get(&mut self, path: &Path) -> Option<EncodedImage<B>> {
        let hit = self
            .entries
            .get(path)
            .map(|(p, t, _)| (Arc::clone(p), t.clone()));
        if hit.is_some() {
            self.hits += 1;
            if let Some(i) = self.order.iter().position(|p| p == path) {
                if let Some(k) = self.order.remove(i) {
                    self.order.push_back(k);
                }
            }
        }
        hit
    }

    fn insert(&mut self, path: PathBuf, grid: Arc<ProcessedImage>, embeds: Tensor<B, 2>) {
        let [n, d] = embeds.dims();
        let bytes = n * d * 4;
        while self.used_bytes + bytes > self.capacity_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, _, b)) = self.entries.remove(&old) {
                self.used_bytes -= b;
            }
        }
        if bytes <= self.capacity_bytes {
            self.used_bytes += bytes;
            self.order.push_back(path.clone());
            self.entries.insert(path, (grid, embeds, bytes));
        }
    }
}

/// An image's grid (pixels dropped) and its merged vision embeddings.
type EncodedImage<B> = (Arc<ProcessedImage>, Tensor<B, 2>);

/// Counters of an answerer, for the run summary.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct QwenStats {
    /// Prompts answered.
    pub prompts: u64,
    /// Prompt tokens prefilled (padding excluded).
    pub tokens_prefilled: u64,
    /// Images encoded by the vision tower.
    pub images_encoded: u64,
    /// Images served from the vision cache.
    pub images_cached: u64,
    /// Seconds spent answering.
    pub seconds: f64,
    /// Decoding steps run (one per generated position of a batch).
    pub decode_steps: u64,
    /// Reads of device memory by the decoding loop (0 on the CPU backend,
    /// which ranks in the tensors' own memory).
    pub decode_device_reads: u64,
    /// Bytes those reads carried.
    pub decode_device_read_bytes: u64,
}

impl QwenStats {
    fn add_traffic(&mut self, t: &DecodeTraffic) {
        self.decode_steps += t.steps;
        self.decode_device_reads += t.reads;
        self.decode_device_read_bytes += t.bytes;
    }
}

/// One worker's answerer: shares the weights, owns its caches.
pub struct QwenVqa<B: Backend> {
    model: Arc<Qwen25Vl<B>>,
    generation: GenerationConfig,
    ranking: Ranking,
    gt_prob_mode: GtProbMode,
    cache: VisionCache<B>,
    stats: QwenStats,
}

impl<B: Backend> QwenVqa<B> {
    /// An answerer with generation settings `generation` and a vision cache
    /// of `vision_cache_mb` MiB.
    pub fn new(
        model: Arc<Qwen25Vl<B>>,
        generation: GenerationConfig,
        vision_cache_mb: usize,
    ) -> Self {
        Self {
            model,
            generation,
            ranking: Ranking::Auto,
            gt_prob_mode: GtProbMode::Answer,
            cache: VisionCache::new(vision_cache_mb),
            stats: QwenStats::default(),
        }
    }

    /// The same answerer ranking decoding candidates where `ranking` says
    /// (`bench vqa` compares host and device ranking).
    pub fn with_ranking(mut self, ranking: Ranking) -> Self {
        self.ranking = ranking;
        self
    }

    /// The same answerer scoring ground-truth answers as `mode` says.
    pub fn with_gt_prob_mode(mut self, mode: GtProbMode) -> Self {
        self.gt_prob_mode = mode;
        self
    }

    /// The counters so far.
    pub fn qwen_stats(&self) -> QwenStats {
        let mut s = self.stats.clone();
        s.images_encoded = self.cache.encoded;
        s.images_cached = self.cache.hits;
        s
    }

    /// Vision embeddings of the images at `paths` (in order), encoding the
    /// ones not cached in one batched vision forward.
    fn image_embeds(&mut self, paths: &[&Path]) -> Result<Vec<EncodedImage<B>>, ModelError> {
        let m = &*self.model;
        let mut found: HashMap<&Path, EncodedImage<B>> = HashMap::new();
        let mut missing: Vec<(&Path, Arc<ProcessedImage>)> = Vec::new();
        for &p in paths {
            if found.contains_key(p) || missing.iter().any(|(q, _)| *q == p) {
                continue;
            }
            match self.cache.get(p) {
                Some(hit) => {
                    found.insert(p, hit);
                }
                None => {
                    let img = m
                        .processor
                        .load_image(&ImageSource::Path(p.to_path_buf()))?;
                    missing.push((p, img));
                }
            }
        }
        if !missing.is_empty() {
            let dim = missing[0].1.pixel_values.len() / missing[0].1.n_patches().max(1);
            let mut flat = Vec::new();
            let mut grids = Vec::with_capacity(missing.len());
            for (_, img) in &missing {
                flat.extend_from_slice(&img.pixel_values);
                grids.push(img.grid_thw);
            }
            let rows = flat.len() / dim.max(1);
            let pixels = Tensor::<B, 2>::from_data(TensorData::new(flat, [rows, dim]), &m.device);
            let per_image = m.vision.encode_images(pixels, &grids)?;
            for ((p, img), emb) in missing.into_iter().zip(per_image) {
                self.cache.encoded += 1;
                // Keep only the grid: the pixels are not needed once encoded.
                let grid_only = Arc::new(ProcessedImage {
                    pixel_values: Vec::new(),
                    grid_thw: img.grid_thw,
                });
                self.cache
                    .insert(p.to_path_buf(), Arc::clone(&grid_only), emb.clone());
                found.insert(p, (grid_only, emb));
            }
        }
        paths
            .iter()
            .map(|p| {
                found.get(p).cloned().ok_or_else(|| {
                    ModelError::Processor(ProcessorError::Invalid {
                        path: p.to_path_buf(),
                        message: "internal error: image embedding missing".into(),
                    })
                })
            })
            .collect()
    }

    /// Answers prompt requests as one batch: raw generations (special tokens
    /// skipped), generated ids, rendered prompts and input ids.
    pub fn answer_requests(
        &mut self,
        requests: &[PromptRequest],
        gt_answers: Option<&[Vec<(String, f64)>]>,
    ) -> Result<Vec<RequestAnswer>, ModelError> {
        let started = std::time::Instant::now();
        let m = Arc::clone(&self.model);
        let mut prompts = Vec::with_capacity(requests.len());
        let mut embeds_per_prompt = Vec::with_capacity(requests.len());
        for req in requests {
            let paths: Vec<&Path> = req
                .images()
                .map(|s| match s {
                    ImageSource::Path(p) => Ok(p.as_path()),
                    _ => Err(ModelError::Processor(ProcessorError::Invalid {
                        path: PathBuf::from("<request>"),
                        message: "images must be given as file paths".into(),
                    })),
                })
                .collect::<Result<_, _>>()?;
            let imgs = self.image_embeds(&paths)?;
            let rendered = m.processor.render_prompt(req)?;
            let grids: Vec<Arc<ProcessedImage>> = imgs.iter().map(|(g, _)| Arc::clone(g)).collect();
            prompts.push(m.processor.encode_rendered(rendered, grids)?);
            embeds_per_prompt.push(imgs.into_iter().map(|(_, t)| t).collect::<Vec<_>>());
        }
        let refs: Vec<_> = prompts.iter().collect();
        let padded = m.processor.pad_batch(&refs)?;
        let (b, l) = (padded.batch_size, padded.seq_len);
        let input_ids: Vec<Vec<u32>> = padded
            .input_ids
            .chunks(l.max(1))
            .map(<[u32]>::to_vec)
            .collect();
        let attention_mask: Vec<Vec<bool>> = padded
            .attention_mask
            .chunks(l.max(1))
            .map(|r| r.iter().map(|&x| x != 0).collect())
            .collect();
        let image_rows: Vec<Tensor<B, 2>> = embeds_per_prompt.iter().flatten().cloned().collect();
        let image_embeds = if image_rows.is_empty() {
            None
        } else {
            Some(Tensor::cat(image_rows, 0))
        };
        let embeds = m
            .text
            .embed_inputs(&input_ids, m.config.image_token_id, image_embeds)?;
        let position_ids = Tensor::<B, 3, Int>::from_data(
            TensorData::new(padded.position_ids.clone(), [3, b, l]),
            &m.device,
        );
        self.stats.tokens_prefilled +=
            attention_mask.iter().flatten().filter(|&&x| x).count() as u64;
        let pre = prefill(
            &m.text,
            PromptBatch {
                embeds,
                position_ids,
                attention_mask,
                input_ids,
            },
        )?;
        let mut traffic = DecodeTraffic::default();
        let generated =
            generate_counted(&m.text, &pre, &self.generation, self.ranking, &mut traffic)?;
        self.stats.add_traffic(&traffic);
        let mut out = Vec::with_capacity(requests.len());
        for (row, (g, p)) in generated.into_iter().zip(&prompts).enumerate() {
            let raw = m.processor.decode(&g.ids, true)?;
            let gt_prob = match gt_answers.and_then(|all| all.get(row)) {
                Some(answers) if !answers.is_empty() => Some(match self.gt_prob_mode {
                    GtProbMode::Answer => self.answer_only_gt_prob(&pre, row, answers)?,
                    GtProbMode::Original => {
                        self.original_gt_prob(&requests[row], p, &embeds_per_prompt[row], answers)?
                    }
                }),
                Some(_) => Some(0.0),
                None => None,
            };
            out.push(RequestAnswer {
                prompt_text: p.prompt_text.clone(),
                input_ids: p.input_ids.clone(),
                generated_ids: g.ids,
                raw_generation: raw,
                gt_prob,
            });
        }
        self.stats.prompts += requests.len() as u64;
        self.stats.seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }
}

impl<B: Backend> QwenVqa<B> {
    /// `sum_a w(a) p(a)` with `p(a)` the geometric mean of the answer
    /// tokens' probabilities after prompt `row` of `pre` (`answer` mode).
    fn answer_only_gt_prob(
        &self,
        pre: &super::generate::Prefilled<B>,
        row: usize,
        answers: &[(String, f64)],
    ) -> Result<f64, ModelError> {
        let m = &*self.model;
        let mut ids = Vec::with_capacity(answers.len());
        let mut weights = Vec::with_capacity(answers.len());
        for (a, w) in answers {
            // Dataset text: never control tokens.
            let t = m.processor.encode_text(a)?;
            if !t.is_empty() {
                ids.push(t);
                weights.push(*w);
            }
        }
        let probs = answer_probabilities(&m.text, pre, row, &ids, AnswerScoring::GeometricMean)?;
        Ok(probs.iter().zip(&weights).map(|(p, w)| p * w).sum())
    }

    /// `sum_a w(a) p(a)` with `p(a)` the original project's `get_cond_prob`
    /// (`original` mode): the prompt of `req` is rendered again with `a`
    /// after the query's `Short answer:` (no generation prompt), run in one
    /// forward with the prompt's image embeddings `images`, and scored from
    /// [`original_prompt::mask_length`](super::original_prompt::mask_length)
    /// on.
    fn original_gt_prob(
        &self,
        req: &PromptRequest,
        prompt: &super::processor::ProcessedPrompt,
        images: &[Tensor<B, 2>],
        answers: &[(String, f64)],
    ) -> Result<f64, ModelError> {
        let m = &*self.model;
        let mask_length = super::original_prompt::mask_length(req, |t| m.processor.encode(t))?;
        let mut total = 0.0;
        for (answer, weight) in answers {
            let rendered = m.processor.render_with_answer(req, answer)?;
            let full = m
                .processor
                .encode_rendered(rendered, prompt.images.clone())?;
            let l = full.input_ids.len();
            let image_embeds = (!images.is_empty()).then(|| Tensor::cat(images.to_vec(), 0));
            let embeds = m.text.embed_inputs(
                std::slice::from_ref(&full.input_ids),
                m.config.image_token_id,
                image_embeds,
            )?;
            let positions: Vec<i64> = full.position_ids.iter().flatten().copied().collect();
            let position_ids =
                Tensor::<B, 3, Int>::from_data(TensorData::new(positions, [3, 1, l]), &m.device);
            let p = original_cond_prob(
                &m.text,
                PromptBatch {
                    embeds,
                    position_ids,
                    attention_mask: vec![vec![true; l]],
                    input_ids: vec![full.input_ids],
                },
                mask_length,
                // The original ignores the tokenizer's pad id.
                m.processor
                    .pad_token_id()
                    .unwrap_or(self.generation.pad_token_id),
            )?;
            total += p * weight;
        }
        Ok(total)
    }
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestAnswer {
    /// Rendered prompt (before image-token expansion).
    pub prompt_text: String,
    /// Prompt token ids.
    pub input_ids: Vec<u32>,
    /// Generated ids (EOS included when generated).
    pub generated_ids: Vec<u32>,
    /// Decoded generation, special tokens skipped.
    pub raw_generation: String,
    /// Weighted ground-truth probability, when asked.
    pub gt_prob: Option<f64>,
}

/// Builds the processor request of a pipeline prompt.
pub fn request_of(prompt: &VqaPrompt) -> PromptRequest {
    PromptRequest::from_paths(
        Some(prompt.system_prompt.clone()),
        prompt
            .examples
            .iter()
            .map(|e| (e.image.clone(), e.question.clone(), e.answer.clone())),
        (prompt.query_image.clone(), prompt.query_question.clone()),
    )
}

impl<B: Backend> VqaModel for QwenVqa<B> {
    fn identity(&self) -> serde_json::Value {
        let g = &self.generation;
        let mut id = serde_json::json!({
            "backend": "qwen2_5_vl",
            "dir": self.model.dir.display().to_string(),
            "generation": {
                "max_new_tokens": g.max_new_tokens,
                "min_new_tokens": g.min_new_tokens,
                "num_beams": g.num_beams,
                "length_penalty": g.length_penalty,
                "repetition_penalty": g.repetition_penalty,
                "do_sample": g.do_sample,
                "eos_token_ids": g.eos_token_ids,
                "pad_token_id": g.pad_token_id,
            },
        });
        // Answers scored the original's way differ in `gt_prob`: stored
        // answers of the default mode must not be reused for them. The
        // default adds nothing, so earlier identities stay valid.
        if let (GtProbMode::Original, serde_json::Value::Object(o)) = (self.gt_prob_mode, &mut id) {
            o.insert("gt_prob_mode".into(), "original".into());
        }
        id
    }

    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError> {
        let requests: Vec<PromptRequest> = prompts.iter().map(request_of).collect();
        let want_gt = prompts.iter().any(|p| !p.gt_answers.is_empty());
        let gts: Vec<Vec<(String, f64)>> = prompts.iter().map(|p| p.gt_answers.clone()).collect();
        let answers = self
            .answer_requests(&requests, want_gt.then_some(gts.as_slice()))
            .map_err(|e| VqaError::Model {
                query_index: prompts.first().map_or(0, |p| p.query_index),
                message: e.to_string(),
            })?;
        Ok(answers
            .into_iter()
            .map(|a| VqaAnswer {
                raw_generation: a.raw_generation,
                gt_prob: a.gt_prob,
                prompt_text: Some(a.prompt_text),
            })
            .collect())
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(self.qwen_stats()).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::qwen2_5_vl::generate::GenerationOverrides;
    use burn::backend::NdArray;
    use serde_json::Value;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny")
    }

    /// Row `r` of a fixture case as a request (its image files, questions
    /// and example answers).
    pub(crate) fn case_request(case: &Value, r: usize) -> PromptRequest {
        let msgs = &case["messages"][r];
        let system = msgs[0]["content"].as_str().map(str::to_string);
        let mut pairs = Vec::new();
        let mut image = PathBuf::new();
        for item in msgs[1]["content"].as_array().unwrap() {
            if item["type"] == "image" {
                image = fixture_dir().join(item["image"].as_str().unwrap());
            } else {
                let text = item["text"].as_str().unwrap();
                let (q, a) = text["Question:".len()..]
                    .split_once(" Short answer:")
                    .unwrap();
                pairs.push((image.clone(), q.to_string(), a.to_string()));
            }
        }
        let (qi, qq, _) = pairs.pop().unwrap();
        PromptRequest::from_paths(system, pairs, (qi, qq))
    }

    /// `--gt_prob_mode original` reproduces the original's `get_cond_prob`
    /// as HF computes it (tools/gt_prob_original_refs.py), answer by answer
    /// and weighted; the default mode scores the answer only and differs.
    #[test]
    fn original_gt_prob_matches_hf_reference() {
        let refs: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir().join("gt_prob_original.json")).unwrap(),
        )
        .unwrap();
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap(),
        )
        .unwrap();
        let model =
            Arc::new(Qwen25Vl::<NdArray<f32>>::load(&fixture_dir(), &Default::default()).unwrap());
        let generation = GenerationConfig::resolve(
            &GenerationOverrides {
                max_new_tokens: Some(1),
                do_sample: Some(false),
                repetition_penalty: Some(1.0),
                ..Default::default()
            },
            &model.generation_defaults,
        )
        .unwrap();
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-12,
                "{what}: {got:e} vs HF {want:e}"
            );
        };
        for r in refs["cases"].as_array().unwrap() {
            let name = r["name"].as_str().unwrap();
            let case = cases["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap();
            let req = case_request(case, 0);
            let mask = original_prompt_mask(&model, &req);
            assert_eq!(mask, r["mask_length"].as_u64().unwrap() as usize, "{name}");
            let answers: Vec<(String, f64)> = r["answers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    (
                        a["answer"].as_str().unwrap().to_string(),
                        a["weight"].as_f64().unwrap(),
                    )
                })
                .collect();
            let mut vqa = QwenVqa::new(Arc::clone(&model), generation.clone(), 16)
                .with_gt_prob_mode(GtProbMode::Original);
            for (a, ra) in answers.iter().zip(r["answers"].as_array().unwrap()) {
                let one = [(a.0.clone(), 1.0)];
                let got = vqa
                    .answer_requests(std::slice::from_ref(&req), Some(&[one.to_vec()]))
                    .unwrap()[0]
                    .gt_prob
                    .unwrap();
                close(
                    got,
                    ra["cond_prob"].as_f64().unwrap(),
                    &format!("{name} {}", a.0),
                );
            }
            let all = vqa
                .answer_requests(
                    std::slice::from_ref(&req),
                    Some(std::slice::from_ref(&answers)),
                )
                .unwrap()[0]
                .gt_prob
                .unwrap();
            close(all, r["gt_prob"].as_f64().unwrap(), name);
            let mut answer_only = QwenVqa::new(Arc::clone(&model), generation.clone(), 16);
            let other = answer_only
                .answer_requests(std::slice::from_ref(&req), Some(&[answers]))
                .unwrap()[0]
                .gt_prob
                .unwrap();
            assert!(
                (other - all).abs() > 1e-3 * all.abs(),
                "{name}: {other} vs {all}"
            );
        }
    }

    fn original_prompt_mask(model: &Qwen25Vl<NdArray<f32>>, req: &PromptRequest) -> usize {
        crate::models::qwen2_5_vl::original_prompt::mask_length(req, |t| model.processor.encode(t))
            .unwrap()
    }

    #[test]
    fn identity_names_the_original_mode_only() {
        let model =
            Arc::new(Qwen25Vl::<NdArray<f32>>::load(&fixture_dir(), &Default::default()).unwrap());
        let generation = GenerationConfig::resolve(
            &GenerationOverrides {
                do_sample: Some(false),
                ..Default::default()
            },
            &model.generation_defaults,
        )
        .unwrap();
        let plain = QwenVqa::new(Arc::clone(&model), generation.clone(), 0).identity();
        assert!(plain.get("gt_prob_mode").is_none(), "{plain}");
        let orig = QwenVqa::new(model, generation, 0)
            .with_gt_prob_mode(GtProbMode::Original)
            .identity();
        assert_eq!(orig["gt_prob_mode"], "original");
    }
}
