//! Held-out evaluation of a checkpoint on VQA-format files through the
//! pipeline's answerer: [`QwenVqa`] (batched prompts, beam search with the
//! `leverflow generate` defaults), the original post-processing and the
//! official VQA accuracy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use serde::Deserialize;

use super::{io_err, DemoVlmError};
use crate::accuracy::{postprocess_generation, vqa_accuracy};
use crate::models::contract::{PromptExample, VqaModel, VqaPrompt, DEFAULT_SYSTEM_PROMPT};
use crate::models::qwen2_5_vl::generate::{GenerationConfig, GenerationOverrides};
use crate::models::qwen2_5_vl::model::{Qwen25Vl, QwenVqa};

#[derive(Deserialize)]
struct QuestionsFile {
    questions: Vec<QuestionEntry>,
}

#[derive(Deserialize)]
struct QuestionEntry {
    image_id: u64,
    question: String,
    question_id: u64,
}

#[derive(Deserialize)]
struct AnnotationsFile {
    annotations: Vec<AnnotationEntry>,
}

#[derive(Deserialize)]
struct AnnotationEntry {
    question_id: u64,
    multiple_choice_answer: String,
    answers: Vec<AnswerEntry>,
}

#[derive(Deserialize)]
struct AnswerEntry {
    answer: String,
}

/// A question with its ground truth, from VQA-format files.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaItem {
    /// Question id.
    pub question_id: u64,
    /// Image file.
    pub image: PathBuf,
    /// Question text.
    pub question: String,
    /// `multiple_choice_answer` (used as in-context answer).
    pub answer: String,
    /// The raw ground-truth answers (10 for VQA).
    pub answers: Vec<String>,
}

fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DemoVlmError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| DemoVlmError::Data {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads VQA question and annotation files; images are
/// `images_dir/COCO_train2014_{image_id:012}.png`. Items keep the question
/// file's order.
pub fn read_vqa_items(
    questions: &Path,
    annotations: &Path,
    images_dir: &Path,
) -> Result<Vec<VqaItem>, DemoVlmError> {
    let q: QuestionsFile = read(questions)?;
    let a: AnnotationsFile = read(annotations)?;
    let by_id: HashMap<u64, AnnotationEntry> = a
        .annotations
        .into_iter()
        .map(|x| (x.question_id, x))
        .collect();
    q.questions
        .into_iter()
        .map(|e| {
            let ann = by_id
                .get(&e.question_id)
                .ok_or_else(|| DemoVlmError::Data {
                    path: annotations.to_path_buf(),
                    message: format!("no annotation for question {}", e.question_id),
                })?;
            Ok(VqaItem {
                question_id: e.question_id,
                image: images_dir.join(format!("COCO_train2014_{:012}.png", e.image_id)),
                question: e.question,
                answer: ann.multiple_choice_answer.clone(),
                answers: ann.answers.iter().map(|x| x.answer.clone()).collect(),
            })
        })
        .collect()
}

/// The generation settings `leverflow generate` uses by default (3 beams,
/// 5 new tokens, length penalty 0, no sampling; EOS, pad and repetition
/// penalty from the checkpoint's `generation_config.json`).
pub fn pipeline_generation<B: Backend>(
    model: &Qwen25Vl<B>,
) -> Result<GenerationConfig, DemoVlmError> {
    let over = GenerationOverrides {
        max_new_tokens: Some(5),
        min_new_tokens: Some(0),
        num_beams: Some(3),
        length_penalty: Some(0.0),
        repetition_penalty: None,
        do_sample: Some(false),
        ..Default::default()
    };
    GenerationConfig::resolve(&over, &model.generation_defaults)
        .map_err(|e| DemoVlmError::Invalid(e.to_string()))
}

/// The in-context examples of held-out query `i`: pool items
/// `(7 i + 151 k) mod n` for k = 0..shots (fixed, spread over the pool).
pub fn example_indices(i: usize, shots: usize, pool: usize) -> Vec<usize> {
    if pool == 0 {
        return Vec::new();
    }
    (0..shots).map(|k| (7 * i + 151 * k) % pool).collect()
}

/// One answered held-out question.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Question id.
    pub question_id: u64,
    /// Question text.
    pub question: String,
    /// Post-processed generation.
    pub prediction: String,
    /// Official VQA accuracy of the prediction.
    pub accuracy: f64,
}

/// Result of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// In-context examples per prompt.
    pub shots: usize,
    /// Mean official VQA accuracy.
    pub accuracy: f64,
    /// Every answer.
    pub predictions: Vec<Prediction>,
}

/// Answers `queries` with `shots` in-context examples from `pool` (chosen
/// by [`example_indices`]) through [`QwenVqa`] with
/// [`pipeline_generation`], in batches of `batch_size`, and scores the
/// post-processed generations with the official VQA accuracy.
pub fn evaluate<B: Backend>(
    model: Arc<Qwen25Vl<B>>,
    pool: &[VqaItem],
    queries: &[VqaItem],
    shots: usize,
    batch_size: usize,
) -> Result<EvalReport, DemoVlmError> {
    let generation = pipeline_generation(&model)?;
    let mut vqa = QwenVqa::new(model, generation, 64);
    let prompts: Vec<VqaPrompt> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| VqaPrompt {
            query_index: i as u64,
            system_prompt: DEFAULT_SYSTEM_PROMPT.to_owned(),
            examples: example_indices(i, shots, pool.len())
                .into_iter()
                .map(|j| PromptExample {
                    dataset_index: j as u64,
                    image: pool[j].image.clone(),
                    question: pool[j].question.clone(),
                    answer: pool[j].answer.clone(),
                })
                .collect(),
            query_image: q.image.clone(),
            query_question: q.question.clone(),
            gt_answers: Vec::new(),
        })
        .collect();
    let mut predictions = Vec::with_capacity(queries.len());
    for (chunk, qs) in prompts
        .chunks(batch_size.max(1))
        .zip(queries.chunks(batch_size.max(1)))
    {
        let answers = vqa.answer(chunk)?;
        for (a, q) in answers.into_iter().zip(qs) {
            let prediction = postprocess_generation(Some(&a.raw_generation));
            let accuracy = vqa_accuracy(&prediction, &q.answers);
            predictions.push(Prediction {
                question_id: q.question_id,
                question: q.question.clone(),
                prediction,
                accuracy,
            });
        }
    }
    let accuracy =
        predictions.iter().map(|p| p.accuracy).sum::<f64>() / predictions.len().max(1) as f64;
    Ok(EvalReport {
        shots,
        accuracy,
        predictions,
    })
}

/// [`evaluate`] on the demo data folder: the held-out questions
/// (`heldout_questions.json` / `heldout_annotations.json`) with examples
/// from the train questions (`questions.json` / `annotations.json`).
pub fn evaluate_demo_data<B: Backend>(
    model: Arc<Qwen25Vl<B>>,
    data_dir: &Path,
    shots: usize,
) -> Result<EvalReport, DemoVlmError> {
    let images = data_dir.join("images");
    let pool = read_vqa_items(
        &data_dir.join("questions.json"),
        &data_dir.join("annotations.json"),
        &images,
    )?;
    let heldout = read_vqa_items(
        &data_dir.join("heldout_questions.json"),
        &data_dir.join("heldout_annotations.json"),
        &images,
    )?;
    evaluate(model, &pool, &heldout, shots, 25)
}
