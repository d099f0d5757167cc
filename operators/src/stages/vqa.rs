//! The `vqa` stage: builds each candidate's prompt (the examples its
//! pointer names, then the query), answers it from the state store when the
//! same prompt was answered before, else with the backend (in batches of
//! `batch_size` prompts), and applies the missing-image and failed-prompt
//! policies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Answer, Counters, Inputs, QueryAnswered, QueryCands, StageError, StageSettings};
use crate::accuracy::postprocess_generation;
use crate::config::{MissingImagePolicy, VqaErrorPolicy};
use crate::dataflow::BatchFn;
use crate::models::contract::{PromptExample, VqaAnswer, VqaModel, VqaPrompt};
use crate::state::{encode_value, ImageStamps, Key, RunKeys, StateStore};

/// An image of a prompt does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing image {} (query {query})", .path.display())]
pub struct MissingImage {
    /// The image file.
    pub path: PathBuf,
    /// The query whose prompt needs it.
    pub query: u64,
}

/// The latest backend counters of each worker ([`VqaModel::stats`]), summed
/// into the run summary at the end.
pub type BackendStats = Arc<Mutex<HashMap<usize, serde_json::Value>>>;

/// Distinct post-processed ground-truth answers with weights min(count/3, 1),
/// in order of first appearance.
pub fn weighted_gt_answers(raw: &[String]) -> Vec<(String, f64)> {
    let mut order: Vec<String> = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for a in raw {
        let norm = postprocess_generation(Some(a));
        let c = counts.entry(norm.clone()).or_insert(0);
        if *c == 0 {
            order.push(norm);
        }
        *c += 1;
    }
    order
        .into_iter()
        .map(|a| {
            let w = (counts[&a] as f64 / 3.0).min(1.0);
            (a, w)
        })
        .collect()
}

/// The prompts of a batch of queries: the distinct prompts, and per query
/// the prompt of each candidate (or why the query is skipped).
pub struct PromptPlan {
    /// Distinct (query, examples) prompts.
    pub prompts: Vec<VqaPrompt>,
    /// Per query: the prompt slot of each candidate, and the skip reason.
    pub queries: Vec<(Vec<usize>, Option<String>)>,
}

/// Builds the prompts of `batch`, applying the missing-image policy: with
/// `error` a missing image fails the batch ([`MissingImage`]); with `skip`
/// the query gets no prompts and a reason.
pub fn plan_prompts(
    inputs: &Inputs,
    settings: &StageSettings,
    batch: &[QueryCands],
    stamps: &mut ImageStamps,
) -> Result<PromptPlan, StageError> {
    let ds = &inputs.dataset;
    let mut prompts: Vec<VqaPrompt> = Vec::new();
    let mut slot_of: HashMap<(u64, Vec<u64>), usize> = HashMap::new();
    let mut queries = Vec::with_capacity(batch.len());
    for q in batch {
        let fail = |e: crate::dataset::DatasetError| StageError::new("vqa", Some(q.query_index), e);
        let item = ds.get(q.query_index).map_err(fail)?;
        let gt = if settings.gt_prob {
            weighted_gt_answers(&item.answers)
        } else {
            Vec::new()
        };
        let mut missing = None;
        let mut slots = Vec::with_capacity(q.cands.len());
        for c in &q.cands {
            let mut examples = Vec::with_capacity(c.indices.len());
            for &i in &c.indices {
                let ex = ds.get(i).map_err(fail)?;
                examples.push(PromptExample {
                    dataset_index: i,
                    image: ex.image_path.clone(),
                    question: ex.question.clone(),
                    answer: ex.icd_answer.clone(),
                });
            }
            let absent: Vec<&PathBuf> = examples
                .iter()
                .map(|e| &e.image)
                .chain(std::iter::once(&item.image_path))
                .filter(|p| stamps.of(p).is_none())
                .collect();
            match (absent.first(), absent.last(), settings.missing_images) {
                (Some(first), _, MissingImagePolicy::Error) => {
                    let e = MissingImage {
                        path: first.to_path_buf(),
                        query: q.query_index,
                    };
                    return Err(StageError::new("vqa", Some(q.query_index), e));
                }
                // The reason names the candidate's last missing image.
                (_, Some(last), MissingImagePolicy::Skip) => {
                    missing = Some(format!("missing image {}", last.display()));
                    break;
                }
                _ => {}
            }
            let slot = *slot_of
                .entry((q.query_index, c.indices.clone()))
                .or_insert_with(|| {
                    prompts.push(VqaPrompt {
                        query_index: q.query_index,
                        system_prompt: settings.system_prompt.clone(),
                        examples,
                        query_image: item.image_path.clone(),
                        query_question: item.question.clone(),
                        gt_answers: gt.clone(),
                    });
                    prompts.len() - 1
                });
            slots.push(slot);
        }
        if missing.is_some() {
            slots.clear();
        }
        queries.push((slots, missing));
    }
    Ok(PromptPlan { prompts, queries })
}

/// The `vqa` stage.
pub fn vqa(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    mut model: Box<dyn VqaModel>,
    settings: StageSettings,
    counters: Arc<Counters>,
    stats: (usize, BackendStats),
) -> BatchFn<QueryCands, QueryAnswered> {
    Box::new(move |batch: Vec<QueryCands>| {
        // A query's image is shared by all its candidates and examples
        // recur: each file is looked up once per batch.
        let mut stamps = ImageStamps::default();
        let PromptPlan { prompts, queries } =
            plan_prompts(&inputs, &settings, &batch, &mut stamps)?;
        // Answers already in the store are served from it; only the others
        // reach the model.
        let reader = store
            .reader()
            .map_err(|e| StageError::new("vqa", None, e))?;
        let prompt_keys: Vec<Key> = prompts
            .iter()
            .map(|p| keys.vqa_answer(p, &mut stamps))
            .collect();
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(prompts.len());
        let mut misses: Vec<usize> = Vec::new();
        for (p, k) in prompts.iter().zip(&prompt_keys) {
            let hit = reader
                .vqa::<VqaAnswer>(p.query_index, k)
                .map_err(|e| StageError::new("vqa", Some(p.query_index), e))?;
            if hit.is_none() {
                misses.push(answers.len());
            }
            answers.push(hit.map(Ok));
        }
        drop(reader);
        Counters::add(&counters.vqa_cached, (prompts.len() - misses.len()) as u64);
        let mut is_new = vec![false; prompts.len()];
        // The prompts the model must answer, moved out (not cloned).
        let asked: Vec<VqaPrompt> = prompts
            .into_iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_none())
            .map(|(p, _)| p)
            .collect();
        for (chunk, idx) in asked
            .chunks(settings.batch_size)
            .zip(misses.chunks(settings.batch_size))
        {
            Counters::add(&counters.vqa_calls, chunk.len() as u64);
            let got: Vec<Answer> = match model.answer(chunk) {
                Ok(got) if got.len() == chunk.len() => got.into_iter().map(Ok).collect(),
                Ok(got) => {
                    let message = format!(
                        "the VQA backend returned {} answers for {} prompts",
                        got.len(),
                        chunk.len()
                    );
                    return Err(StageError::new("vqa", None, message));
                }
                Err(e) => match settings.vqa_errors {
                    VqaErrorPolicy::Error => {
                        return Err(StageError::new(
                            "vqa",
                            chunk.first().map(|p| p.query_index),
                            e,
                        ))
                    }
                    // The batch failed: each prompt is asked alone (an
                    // answer does not depend on its batch), so only the
                    // prompts that fail on their own are recorded as failed.
                    VqaErrorPolicy::Record => chunk
                        .iter()
                        .map(|p| match model.answer(std::slice::from_ref(p)) {
                            Ok(mut one) if one.len() == 1 => Ok(one.remove(0)),
                            Ok(_) => Err("the VQA backend returned no answer".to_string()),
                            Err(e) => {
                                Counters::add(&counters.vqa_failed, 1);
                                Err(e.to_string())
                            }
                        })
                        .collect(),
                },
            };
            for (&i, a) in idx.iter().zip(got) {
                is_new[i] = a.is_ok();
                answers[i] = Some(a);
            }
        }
        if !misses.is_empty() {
            if let Ok(mut slot) = stats.1.lock() {
                slot.insert(stats.0, model.stats());
            }
        }
        let answers: Vec<Answer> = answers
            .into_iter()
            .map(|a| {
                a.ok_or_else(|| {
                    StageError::new("vqa", None, "internal error: a prompt has no answer")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(batch
            .into_iter()
            .zip(queries)
            .map(|(base, (slots, skipped))| {
                let mut new_vqa = Vec::new();
                for &s in &slots {
                    if std::mem::take(&mut is_new[s]) {
                        if let Ok(a) = &answers[s] {
                            new_vqa.push((prompt_keys[s], encode_value(a)));
                        }
                    }
                }
                QueryAnswered {
                    answers: slots.iter().map(|&s| answers[s].clone()).collect(),
                    base,
                    skipped,
                    new_vqa,
                }
            })
            .collect())
    })
}
