//! OpenFlamingo behind the VQA contract: a batch of prompts is answered in
//! one left-padded generation, each distinct image of the batch encoded
//! once (vision tower and perceiver in one pass).

use super::model::{FlamingoError, FlamingoPrompt, OpenFlamingo};
use crate::image_decode::ImageLimits;
use crate::models::contract::{VqaAnswer, VqaError, VqaModel, VqaPrompt};
use crate::models::qwen2_5_vl::generate::{GenerationConfig, GenerationOverrides};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model's answer to one prompt, with its ids (`leverflow vqa`).
#[derive(Debug, Clone, PartialEq)]
pub struct FlamingoAnswer {
    /// The prompt text.
    pub prompt_text: String,
    /// Prompt ids (no padding).
    pub input_ids: Vec<u32>,
    /// Generated ids (EOS included when generated).
    pub generated_ids: Vec<u32>,
    /// Decoded generation, special tokens skipped.
    pub raw_generation: String,
}

/// Counters of one worker's answerer.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FlamingoStats {
    /// Prompts answered.
    pub prompts: u64,
    /// Images run through the vision tower and the perceiver.
    pub images_encoded: u64,
}

/// The generation settings of a run: what the caller sets, else the
/// original project's (`beam 3, 5 new tokens, length penalty 0`), always
/// stopping at and padding with the tokenizer's EOS (`<|endoftext|>`).
pub fn generation_config(
    over: &GenerationOverrides,
    eos: u32,
) -> Result<GenerationConfig, FlamingoError> {
    let cfg = GenerationConfig {
        max_new_tokens: over.max_new_tokens.unwrap_or(5),
        min_new_tokens: over.min_new_tokens.unwrap_or(0),
        num_beams: over.num_beams.unwrap_or(3),
        length_penalty: over.length_penalty.unwrap_or(0.0),
        repetition_penalty: over.repetition_penalty.unwrap_or(1.0),
        do_sample: over.do_sample.unwrap_or(false),
        eos_token_ids: vec![eos],
        pad_token_id: eos,
        early_stopping: over.early_stopping.unwrap_or(false),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The prompt of the contract as the model's (the system prompt is not
/// used: the original's instruction for this model is empty).
pub fn prompt_of(p: &VqaPrompt) -> FlamingoPrompt {
    FlamingoPrompt {
        examples: p
            .examples
            .iter()
            .map(|e| (e.image.clone(), e.question.clone(), e.answer.clone()))
            .collect(),
        query_image: p.query_image.clone(),
        query_question: p.query_question.clone(),
    }
}

/// One worker's answerer: shares the weights.
pub struct FlamingoVqa<B: Backend> {
    model: Arc<OpenFlamingo<B>>,
    generation: GenerationConfig,
    limits: ImageLimits,
    stats: FlamingoStats,
}

impl<B: Backend> FlamingoVqa<B> {
    /// An answerer with generation settings `generation`, decoding images
    /// within `limits`.
    pub fn new(
        model: Arc<OpenFlamingo<B>>,
        generation: GenerationConfig,
        limits: ImageLimits,
    ) -> Self {
        Self {
            model,
            generation,
            limits,
            stats: FlamingoStats::default(),
        }
    }

    /// The answerer's counters so far.
    pub fn flamingo_stats(&self) -> &FlamingoStats {
        &self.stats
    }

    /// Answers `prompts` as one batch, with their ids.
    pub fn answer_prompts(
        &mut self,
        prompts: &[FlamingoPrompt],
    ) -> Result<Vec<FlamingoAnswer>, FlamingoError> {
        let m = &*self.model;
        let mut distinct: Vec<&Path> = Vec::new();
        for p in prompts {
            for img in p.images() {
                if !distinct.contains(&img) {
                    distinct.push(img);
                }
            }
        }
        let latents = m.latents_of_files(&distinct, &self.limits)?;
        self.stats.images_encoded += distinct.len() as u64;
        let by_path: HashMap<PathBuf, Tensor<B, 2>> = distinct
            .iter()
            .map(|p| p.to_path_buf())
            .zip(latents)
            .collect();
        let batch = m.batch(prompts, &mut |p: &Path| {
            by_path
                .get(p)
                .cloned()
                .ok_or_else(|| FlamingoError::Missing {
                    path: p.to_path_buf(),
                    what: "the image's latents (internal error)".into(),
                })
        })?;
        let out = m.generate(&batch, &self.generation)?;
        self.stats.prompts += prompts.len() as u64;
        batch
            .texts
            .into_iter()
            .zip(batch.prompt_ids)
            .zip(out)
            .map(|((prompt_text, input_ids), g)| {
                Ok(FlamingoAnswer {
                    raw_generation: m.tokenizer.decode(&g.ids)?,
                    prompt_text,
                    input_ids,
                    generated_ids: g.ids,
                })
            })
            .collect()
    }
}

impl<B: Backend> VqaModel for FlamingoVqa<B> {
    fn identity(&self) -> serde_json::Value {
        let g = &self.generation;
        serde_json::json!({
            "backend": "openflamingo",
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
        })
    }

    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError> {
        let query_index = prompts.first().map_or(0, |p| p.query_index);
        if prompts.iter().any(|p| !p.gt_answers.is_empty()) {
            return Err(VqaError::Model {
                query_index,
                message:
                    "the ground-truth probability (--gt_prob) is not implemented for OpenFlamingo"
                        .into(),
            });
        }
        let ours: Vec<FlamingoPrompt> = prompts.iter().map(prompt_of).collect();
        let answers = self.answer_prompts(&ours).map_err(|e| VqaError::Model {
            query_index,
            message: e.to_string(),
        })?;
        Ok(answers
            .into_iter()
            .map(|a| VqaAnswer {
                raw_generation: a.raw_generation,
                gt_prob: None,
                prompt_text: Some(a.prompt_text),
            })
            .collect())
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(&self.stats).unwrap_or(serde_json::Value::Null)
    }
}
