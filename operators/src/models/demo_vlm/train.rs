//! Training of the demo model with burn's autodiff.
//!
//! The model is the real one: the vision tower and decoder structs of
//! [`crate::models::qwen2_5_vl`] are burn `Module`s whose weights are `Param`s, so
//! they are trained as they are, with burn's AdamW optimizer, on an
//! `Autodiff` backend. No training-only copy of the architecture exists:
//! the initial (random) weights are written as a Hugging Face checkpoint and
//! loaded by [`Qwen25Vl::load`], the forward pass is the inference code
//! ([`VisionTower::forward`], [`TextModel::embed_inputs`],
//! [`TextModel::forward_hidden`]), and the trained weights are exported
//! under the published tensor names and re-loaded by [`Qwen25Vl::load`].
//!
//! Every example is a pipeline prompt: the system prompt, 0 to
//! `max_shots` in-context examples (image + `Question:<q> Short
//! answer:<a>`), the query image + `Question:<q> Short answer:`, rendered by
//! the checkpoint's chat template with the generation prompt, followed by the
//! answer and `<|im_end|>`. The loss is the cross-entropy of the query's
//! answer tokens and `<|im_end|>`, plus (optionally) of the in-context
//! examples' answer tokens, which are the same task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module};
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{
    check_complete, export_weights, prompt_corpus, random_weights, word_vocabulary,
    write_checkpoint_files, write_safetensors, DemoDims, DemoVocab, UNK_TOKEN,
};
use super::data::{read_wheel_split, EasyVqaQuestion};
use super::DemoVlmError;
use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
use crate::models::qwen2_5_vl::image::ProcessedImage;
use crate::models::qwen2_5_vl::model::Qwen25Vl;
use crate::models::qwen2_5_vl::processor::{
    ImageSource, Processor, PromptRequest, VqaExample, VqaQuery,
};
use crate::models::qwen2_5_vl::text::TextModel;
use crate::models::qwen2_5_vl::vision::VisionTower;

/// The trainable part of Qwen2.5-VL: vision tower and decoder.
#[derive(Module, Debug)]
pub struct DemoVlm<B: Backend> {
    /// Vision tower.
    pub vision: VisionTower<B>,
    /// Language model.
    pub text: TextModel<B>,
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The `easy_vqa-1.0` wheel.
    pub wheel: PathBuf,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// Model dimensions.
    pub dims: DemoDims,
    /// Seed of the initial weights and of the example sampling.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Prompts per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Linear warm-up steps; cosine decay to 10 % afterwards.
    pub warmup: usize,
    /// In-context examples per prompt: uniform in `0..=max_shots`.
    pub max_shots: usize,
    /// Also train on the in-context examples' answers.
    pub example_loss: bool,
    /// Curriculum: the first `short_system_steps` steps use an empty system
    /// prompt (the template's system turn stays, with no text), so that the
    /// few image tokens are a larger share of the prompt while the model
    /// learns to look at them; later steps use the pipeline's system prompt.
    pub short_system_steps: usize,
    /// Learning-rate factor of the patch embedding. Adam moves every weight
    /// by about the learning rate per step, so a layer with 1176 inputs of
    /// mostly one sign (normalised pixels) shifts all patch embeddings the
    /// same way at 18x the rate of a 64-input layer; at the full rate the
    /// image embeddings collapse to one vector and the model never learns
    /// to look at the images.
    pub patch_embed_lr_scale: f64,
    /// Curriculum: the first `open_question_steps` steps train only on the
    /// open questions (colour and shape answers, no yes/no) without
    /// in-context examples. Trained on everything from the start, the
    /// model settles on the answer prior (about 60 % here: yes/no are 74 %
    /// of the questions) and does not learn to look at the images; open
    /// questions can only be answered from the image.
    pub open_question_steps: usize,
    /// Train only on questions containing this text (diagnostics).
    pub question_filter: Option<String>,
    /// The last `val_images` train images (and their questions) are held
    /// out of training for monitoring.
    pub val_images: usize,
    /// Validation questions scored at each evaluation.
    pub val_questions: usize,
    /// Log every this many steps.
    pub log_every: usize,
    /// Validate and save the checkpoint every this many steps.
    pub eval_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            wheel: PathBuf::from("easy_vqa-1.0-py3-none-any.whl"),
            out: PathBuf::from("demo/vlm"),
            dims: DemoDims::default(),
            seed: 0,
            steps: 1600,
            batch_size: 32,
            lr: 1e-3,
            warmup: 100,
            max_shots: 2,
            example_loss: true,
            short_system_steps: 1400,
            patch_embed_lr_scale: 0.05,
            open_question_steps: 600,
            question_filter: None,
            val_images: 200,
            val_questions: 400,
            log_every: 50,
            eval_every: 500,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// Training questions used (after the validation hold-out).
    pub train_questions: usize,
    /// Training images used.
    pub train_images: usize,
    /// Steps run.
    pub steps: usize,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Mean loss of the last `log_every` steps.
    pub final_loss: f64,
    /// Teacher-forced first-answer-token accuracy on the validation
    /// questions at the end (2 in-context examples).
    pub val_accuracy: f64,
    /// Tensor parameters of the model.
    pub parameters: usize,
}

/// One tokenized training prompt with its answer appended.
struct Sample {
    ids: Vec<u32>,
    positions: [Vec<i64>; 3],
    images: Vec<Arc<ProcessedImage>>,
    /// (position whose logits predict, token id).
    targets: Vec<(usize, u32)>,
    /// Index in `targets` of the query's first answer token.
    query_target: usize,
}

/// A left-padded batch of samples.
struct Batch {
    input_ids: Vec<Vec<u32>>,
    mask: Vec<Vec<bool>>,
    positions: Vec<i64>,
    pixels: Vec<f32>,
    patch_dim: usize,
    grids: Vec<[usize; 3]>,
    target_rows: Vec<i64>,
    target_ids: Vec<i64>,
    query_targets: Vec<usize>,
}

/// Builds prompts the pipeline's way and tokenizes them with the answer.
struct SampleBuilder<'a> {
    processor: &'a Processor,
    images: &'a BTreeMap<u64, Arc<ProcessedImage>>,
    eos: u32,
    first_special: u32,
    marker: Vec<u32>,
    example_loss: bool,
}

impl SampleBuilder<'_> {
    fn image(&self, q: &EasyVqaQuestion) -> Result<ImageSource, DemoVlmError> {
        self.images
            .get(&q.image_id)
            .map(|p| ImageSource::Processed(Arc::clone(p)))
            .ok_or_else(|| DemoVlmError::Invalid(format!("image {} not loaded", q.image_id)))
    }

    fn build(
        &self,
        system_prompt: Option<String>,
        examples: &[&EasyVqaQuestion],
        query: &EasyVqaQuestion,
    ) -> Result<Sample, DemoVlmError> {
        let req = PromptRequest {
            system_prompt,
            examples: examples
                .iter()
                .map(|e| {
                    Ok(VqaExample {
                        image: self.image(e)?,
                        question: e.question.clone(),
                        answer: e.answer.clone(),
                    })
                })
                .collect::<Result<_, DemoVlmError>>()?,
            query: VqaQuery {
                image: self.image(query)?,
                question: query.question.clone(),
            },
        };
        let p = self.processor.process(&req)?;
        let mut ids = p.input_ids;
        let mut positions = p.position_ids;
        let prompt_len = ids.len();
        let mut targets = Vec::new();
        if self.example_loss {
            // Answers of the in-context examples: the word tokens after each
            // "Short answer:" (up to the next special token).
            let m = self.marker.len();
            for i in 0..prompt_len.saturating_sub(m) {
                if ids[i..i + m] == self.marker[..] {
                    let mut j = i + m;
                    while j < prompt_len && ids[j] < self.first_special {
                        targets.push((j - 1, ids[j]));
                        j += 1;
                    }
                }
            }
        }
        let query_target = targets.len();
        let mut answer = self.processor.encode(&query.answer)?;
        answer.push(self.eos);
        let next = positions
            .iter()
            .flat_map(|r| r.iter())
            .copied()
            .max()
            .map_or(0, |m| m + 1);
        for (k, &t) in answer.iter().enumerate() {
            targets.push((prompt_len - 1 + k, t));
            ids.push(t);
            for row in positions.iter_mut() {
                row.push(next + k as i64);
            }
        }
        Ok(Sample {
            ids,
            positions,
            images: p.images,
            targets,
            query_target,
        })
    }
}

fn make_batch(samples: &[Sample], pad: u32) -> Batch {
    let b = samples.len();
    let l = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b);
    let mut positions = vec![0i64; 3 * b * l];
    let mut pixels = Vec::new();
    let mut grids = Vec::new();
    let mut patch_dim = 0;
    let (mut target_rows, mut target_ids, mut query_targets) = (Vec::new(), Vec::new(), Vec::new());
    for (r, s) in samples.iter().enumerate() {
        let off = l - s.ids.len();
        let mut row = vec![pad; off];
        row.extend_from_slice(&s.ids);
        input_ids.push(row);
        let mut m = vec![false; off];
        m.resize(l, true);
        mask.push(m);
        for (k, prow) in s.positions.iter().enumerate() {
            let base = (k * b + r) * l + off;
            positions[base..base + prow.len()].copy_from_slice(prow);
        }
        for img in &s.images {
            patch_dim = img.pixel_values.len() / img.n_patches().max(1);
            pixels.extend_from_slice(&img.pixel_values);
            grids.push(img.grid_thw);
        }
        query_targets.push(target_ids.len() + s.query_target);
        for &(p, t) in &s.targets {
            target_rows.push((r * l + off + p) as i64);
            target_ids.push(i64::from(t));
        }
    }
    Batch {
        input_ids,
        mask,
        positions,
        pixels,
        patch_dim,
        grids,
        target_rows,
        target_ids,
        query_targets,
    }
}

/// Logits [targets, vocab] at the target positions of `batch`.
fn forward<B: Backend>(
    m: &DemoVlm<B>,
    batch: &Batch,
    image_token_id: u32,
    device: &B::Device,
) -> Result<Tensor<B, 2>, DemoVlmError> {
    let b = batch.input_ids.len();
    let l = batch.input_ids.first().map_or(0, Vec::len);
    let rows = batch.pixels.len() / batch.patch_dim.max(1);
    let pixels = Tensor::<B, 2>::from_data(
        TensorData::new(batch.pixels.clone(), [rows, batch.patch_dim]),
        device,
    );
    let image_embeds = m.vision.forward(pixels, &batch.grids)?;
    let embeds = m
        .text
        .embed_inputs(&batch.input_ids, image_token_id, Some(image_embeds))?;
    let positions =
        Tensor::<B, 3, Int>::from_data(TensorData::new(batch.positions.clone(), [3, b, l]), device);
    let mut cache = m.text.new_cache();
    let hidden = m
        .text
        .forward_hidden(embeds, positions, &batch.mask, &mut cache)?;
    let d = m.text.hidden_size;
    let n = batch.target_rows.len();
    let idx =
        Tensor::<B, 1, Int>::from_data(TensorData::new(batch.target_rows.clone(), [n]), device);
    Ok(m.text.logits(hidden.reshape([b * l, d]).select(0, idx)))
}

/// Mean cross-entropy of `logits` against `batch`'s targets.
fn loss<B: Backend>(logits: Tensor<B, 2>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    let n = batch.target_ids.len();
    let t =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.target_ids.clone(), [n, 1]), device);
    log_softmax(logits, 1).gather(1, t).neg().mean()
}

/// Number of queries whose first answer token is the argmax.
fn query_hits<B: Backend>(logits: Tensor<B, 2>, batch: &Batch) -> Result<usize, DemoVlmError> {
    let am: Vec<i64> = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .map_err(|e| DemoVlmError::Invalid(format!("argmax read-back: {e:?}")))?;
    Ok(batch
        .query_targets
        .iter()
        .filter(|&&i| am.get(i) == batch.target_ids.get(i))
        .count())
}

fn lr_at(step: usize, opts: &TrainOptions) -> f64 {
    if step < opts.warmup {
        return opts.lr * (step + 1) as f64 / opts.warmup as f64;
    }
    let span = opts.steps.saturating_sub(opts.warmup).max(1) as f64;
    let progress = ((step - opts.warmup) as f64 / span).min(1.0);
    opts.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Writes the checkpoint's weights from `model`, checking the tensor set.
pub fn save_weights<B: Backend>(
    model: &DemoVlm<B>,
    config: &Qwen25VlConfig,
    dir: &Path,
) -> Result<(), DemoVlmError> {
    let tensors = export_weights(&model.vision, &model.text)?;
    check_complete(config, &tensors)?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)
}

/// Trains the demo model and writes the checkpoint to `opts.out`; `log`
/// receives progress lines.
pub fn train<B: AutodiffBackend>(
    opts: &TrainOptions,
    device: &B::Device,
    log: &mut dyn FnMut(&str),
) -> Result<TrainReport, DemoVlmError> {
    let started = Instant::now();
    if opts.batch_size == 0 || opts.steps == 0 {
        return Err(DemoVlmError::Invalid(
            "steps and batch size must be positive".into(),
        ));
    }
    let split = read_wheel_split(&opts.wheel, "train")?;
    let n_images = split.images.len();
    let first_val = split
        .images
        .keys()
        .nth(n_images.saturating_sub(opts.val_images))
        .copied()
        .unwrap_or(u64::MAX);
    let (train_q, val_q): (Vec<&EasyVqaQuestion>, Vec<&EasyVqaQuestion>) =
        split.questions.iter().partition(|q| q.image_id < first_val);
    let train_q: Vec<&EasyVqaQuestion> = train_q
        .into_iter()
        .filter(|q| {
            opts.question_filter
                .as_ref()
                .is_none_or(|f| q.question.contains(f.as_str()))
        })
        .collect();
    if train_q.is_empty() {
        return Err(DemoVlmError::Invalid("no training questions".into()));
    }
    log(&format!(
        "easy-VQA train split: {} questions on {} images; training on {} questions, {} held out for validation",
        split.questions.len(),
        n_images,
        train_q.len(),
        val_q.len()
    ));

    // Vocabulary and checkpoint files, then random weights through the
    // real loader.
    let mut corpus = prompt_corpus();
    corpus.extend(
        train_q
            .iter()
            .flat_map(|q| [q.question.clone(), q.answer.clone()]),
    );
    let vocab = DemoVocab::new(&word_vocabulary(&corpus)?);
    write_checkpoint_files(&opts.out, &opts.dims, &vocab)?;
    let config = Qwen25VlConfig::from_file(&opts.out.join("config.json"))?;
    let init = random_weights(&config, opts.seed, 0.02);
    check_complete(&config, &init)?;
    write_safetensors(&opts.out.join("model.safetensors"), &init)?;
    let loaded = Qwen25Vl::<B>::load(&opts.out, device)?;
    let processor = loaded.processor;
    let image_token_id = config.image_token_id;
    let mut model = DemoVlm {
        vision: loaded.vision,
        text: loaded.text,
    };
    let parameters = model.num_params();
    log(&format!(
        "vocabulary {} tokens ({} rows), {parameters} parameters",
        vocab.words.len() + super::checkpoint::SPECIAL_TOKENS.len(),
        vocab.vocab_size
    ));

    let unk = processor
        .tokenizer()
        .token_to_id(UNK_TOKEN)
        .ok_or_else(|| DemoVlmError::Invalid("tokenizer lacks <unk>".into()))?;
    let mut images = BTreeMap::new();
    for (id, img) in &split.images {
        images.insert(*id, Arc::new(processor.process_image(img)?));
    }
    let pad = vocab.special("<|endoftext|>")?;
    let builder = SampleBuilder {
        processor: &processor,
        images: &images,
        eos: vocab.special("<|im_end|>")?,
        first_special: vocab.first_special,
        marker: processor.encode("Short answer:")?,
        example_loss: opts.example_loss,
    };

    // A fixed validation set: 2 examples from the training questions.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5eed);
    let mut val_samples = Vec::new();
    for q in val_q.iter().take(opts.val_questions) {
        let ex: Vec<&EasyVqaQuestion> = (0..2)
            .map(|_| train_q[rng.random_range(0..train_q.len())])
            .collect();
        let s = builder.build(None, &ex, q)?;
        if s.ids.contains(&unk) {
            log(&format!(
                "note: unknown word in validation question {:?}",
                q.question
            ));
        }
        val_samples.push(s);
    }

    let open_q: Vec<&EasyVqaQuestion> = train_q
        .iter()
        .copied()
        .filter(|q| q.answer != "yes" && q.answer != "no")
        .collect();
    if open_q.is_empty() && opts.open_question_steps > 0 {
        return Err(DemoVlmError::Invalid(
            "no open questions to train on".into(),
        ));
    }

    let validate = |m: &DemoVlm<B>| -> Result<f64, DemoVlmError> {
        let inner = m.valid();
        let mut hits = 0;
        for chunk in val_samples.chunks(50) {
            let batch = make_batch(chunk, pad);
            let logits = forward(&inner, &batch, image_token_id, device)?;
            hits += query_hits(logits, &batch)?;
        }
        Ok(hits as f64 / val_samples.len().max(1) as f64)
    };

    let adamw = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)));
    let mut optim = adamw.init::<B, DemoVlm<B>>();
    let mut optim_patch = adamw.init::<B, Linear<B>>();
    let (mut loss_sum, mut hit_sum, mut seen, mut final_loss) = (0.0f64, 0usize, 0usize, f64::NAN);
    let mut val_accuracy = f64::NAN;
    let (mut t_build, mut t_fwd, mut t_bwd) = (0.0f64, 0.0f64, 0.0f64);
    for step in 0..opts.steps {
        let t0 = Instant::now();
        let mut samples = Vec::with_capacity(opts.batch_size);
        for _ in 0..opts.batch_size {
            let open_phase = step < opts.open_question_steps;
            let pool = if open_phase { &open_q } else { &train_q };
            let q = pool[rng.random_range(0..pool.len())];
            let shots = if open_phase {
                0
            } else {
                rng.random_range(0..=opts.max_shots)
            };
            let ex: Vec<&EasyVqaQuestion> = (0..shots)
                .map(|_| train_q[rng.random_range(0..train_q.len())])
                .collect();
            let system = (step < opts.short_system_steps).then(String::new);
            samples.push(builder.build(system, &ex, q)?);
        }
        let batch = make_batch(&samples, pad);
        let t1 = Instant::now();
        let logits = forward(&model, &batch, image_token_id, device)?;
        hit_sum += query_hits(logits.clone().detach(), &batch)?;
        let l = loss(logits, &batch, device);
        let lv: f64 = l
            .clone()
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or(f64::NAN);
        if !lv.is_finite() {
            return Err(DemoVlmError::Invalid(format!(
                "loss is {lv} at step {step}"
            )));
        }
        let t2 = Instant::now();
        loss_sum += lv;
        seen += 1;
        let mut grads = l.backward();
        // The patch embedding's gradients first (its own optimizer and
        // rate), then all the others.
        let g_patch = GradientsParams::from_module(&mut grads, &model.vision.patch_embed);
        let g_rest = GradientsParams::from_grads(grads, &model);
        let lr = lr_at(step, opts);
        let DemoVlm { mut vision, text } = model;
        vision.patch_embed =
            optim_patch.step(lr * opts.patch_embed_lr_scale, vision.patch_embed, g_patch);
        model = optim.step(lr, DemoVlm { vision, text }, g_rest);
        t_build += (t1 - t0).as_secs_f64();
        t_fwd += (t2 - t1).as_secs_f64();
        t_bwd += t2.elapsed().as_secs_f64();
        let done = step + 1;
        if done % opts.log_every.max(1) == 0 || done == opts.steps {
            final_loss = loss_sum / seen as f64;
            log(&format!(
                "step {done}/{}: loss {final_loss:.4}, train query accuracy {:.3}, lr {:.2e}, {:.0} s (prompts {t_build:.0} s, forward {t_fwd:.0} s, backward+update {t_bwd:.0} s)",
                opts.steps,
                hit_sum as f64 / (seen * opts.batch_size) as f64,
                lr_at(step, opts),
                started.elapsed().as_secs_f64()
            ));
            loss_sum = 0.0;
            hit_sum = 0;
            seen = 0;
        }
        if done % opts.eval_every.max(1) == 0 || done == opts.steps {
            val_accuracy = validate(&model)?;
            save_weights(&model.valid(), &config, &opts.out)?;
            log(&format!(
                "step {done}: validation first-token accuracy {val_accuracy:.3} ({} questions); checkpoint saved",
                val_samples.len()
            ));
        }
    }
    Ok(TrainReport {
        train_questions: train_q.len(),
        train_images: n_images - opts.val_images.min(n_images),
        steps: opts.steps,
        seconds: started.elapsed().as_secs_f64(),
        final_loss,
        val_accuracy,
        parameters,
    })
}
