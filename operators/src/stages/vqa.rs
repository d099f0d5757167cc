//! The `vqa` stage: builds each candidate's prompt (the examples its
//! pointer names, then the query), answers it from the state store when the
//! same prompt was answered before, else with the backend (in batches of
//! `batch_size` prompts), and applies the missing-image and failed-prompt
//! policies.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::{Answer, Counters, Inputs, QueryAnswered, QueryCands, StageError, StageSettings};
use crate::accuracy::postprocess_generation;
use crate::config::{MissingImagePolicy, VqaErrorPolicy};
use crate::dataflow::{BatchResult, PendingStage, Waker};
use crate::models::contract::{PromptExample, PromptResult, VqaAnswer, VqaModel, VqaPrompt};
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

/// The `vqa` stage of one worker (see [`VqaStage`]).
pub fn vqa(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    mut model: Box<dyn VqaModel>,
    settings: StageSettings,
    counters: Arc<Counters>,
    stats: (usize, BackendStats),
) -> Box<dyn PendingStage<QueryCands, QueryAnswered>> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(remote) = model.remote() {
        counters.vqa_remote.get_or_init(|| remote.gauge());
    }
    Box::new(VqaStage {
        inputs,
        keys,
        store,
        model,
        settings,
        counters,
        stats,
        waiting: HashMap::new(),
        done: Vec::new(),
        tx,
        rx,
    })
}

/// The `vqa` stage: answers from the store, else from the model. A local
/// model answers on the worker's thread; a remote one (a server) gets the
/// prompts submitted and delivers the answers later, while the worker runs
/// its other stages.
pub struct VqaStage {
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    model: Box<dyn VqaModel>,
    settings: StageSettings,
    counters: Arc<Counters>,
    stats: (usize, BackendStats),
    /// Batches whose prompts are with a remote model.
    waiting: HashMap<u64, Waiting>,
    /// Batches finished and not yet collected.
    done: Vec<BatchResult<QueryAnswered>>,
    tx: Sender<(u64, Vec<PromptResult>)>,
    rx: Receiver<(u64, Vec<PromptResult>)>,
}

/// A batch between its store lookups and its answers.
struct Waiting {
    batch: Vec<QueryCands>,
    queries: Vec<(Vec<usize>, Option<String>)>,
    prompt_keys: Vec<Key>,
    /// Per prompt slot: the answer, once known.
    answers: Vec<Option<Answer>>,
    /// The slots the model is asked for, in order.
    misses: Vec<usize>,
    /// Which slots were answered by the model in this run (to be stored).
    is_new: Vec<bool>,
}

impl PendingStage<QueryCands, QueryAnswered> for VqaStage {
    fn start(&mut self, id: u64, batch: Vec<QueryCands>, wake: Waker) -> Result<(), StageError> {
        let (mut w, asked) = self.lookup(batch)?;
        if asked.is_empty() {
            self.done.push((id, assemble(w)));
            return Ok(());
        }
        Counters::add(&self.counters.vqa_calls, asked.len() as u64);
        if let Some(remote) = self.model.remote() {
            let tx = self.tx.clone();
            remote.submit(
                asked,
                Box::new(move |results| {
                    // A closed channel means the run has stopped.
                    let _ = tx.send((id, results));
                    wake();
                }),
            );
            self.waiting.insert(id, w);
            return Ok(());
        }
        self.answer_here(&mut w, &asked)?;
        self.note_stats();
        self.done.push((id, assemble(w)));
        Ok(())
    }

    fn finished(&mut self) -> Vec<BatchResult<QueryAnswered>> {
        while let Ok((id, results)) = self.rx.try_recv() {
            let Some(mut w) = self.waiting.remove(&id) else {
                continue;
            };
            // A server's answers are stored as they arrive, so a run that
            // stops later (the server died) never asks for them again.
            let out = self
                .store_answers(&w, &results)
                .and_then(|()| self.take_remote(&mut w, results))
                .and_then(|()| assemble(w));
            self.done.push((id, out));
            self.note_stats();
        }
        std::mem::take(&mut self.done)
    }
}

impl VqaStage {
    /// Plans the prompts of `batch` and serves those in the store: the
    /// batch's state and the prompts the model must answer.
    fn lookup(&self, batch: Vec<QueryCands>) -> Result<(Waiting, Vec<VqaPrompt>), StageError> {
        // A query's image is shared by all its candidates and examples
        // recur: each file is looked up once per batch.
        let mut stamps = ImageStamps::default();
        let PromptPlan { prompts, queries } =
            plan_prompts(&self.inputs, &self.settings, &batch, &mut stamps)?;
        let reader = self
            .store
            .reader()
            .map_err(|e| StageError::new("vqa", None, e))?;
        let prompt_keys: Vec<Key> = prompts
            .iter()
            .map(|p| self.keys.vqa_answer(p, &mut stamps))
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
        Counters::add(
            &self.counters.vqa_cached,
            (prompts.len() - misses.len()) as u64,
        );
        // The prompts the model must answer, moved out (not cloned).
        let asked: Vec<VqaPrompt> = prompts
            .into_iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_none())
            .map(|(p, _)| p)
            .collect();
        let is_new = vec![false; answers.len()];
        let w = Waiting {
            batch,
            queries,
            prompt_keys,
            answers,
            misses,
            is_new,
        };
        Ok((w, asked))
    }

    /// Answers `asked` with the local model, in batches of `batch_size`,
    /// applying the failed-prompt policy.
    fn answer_here(&mut self, w: &mut Waiting, asked: &[VqaPrompt]) -> Result<(), StageError> {
        let size = self.settings.batch_size;
        for (chunk, idx) in asked.chunks(size).zip(w.misses.chunks(size)) {
            let got: Vec<Answer> = match self.model.answer(chunk) {
                Ok(got) if got.len() == chunk.len() => got.into_iter().map(Ok).collect(),
                Ok(got) => {
                    let message = format!(
                        "the VQA backend returned {} answers for {} prompts",
                        got.len(),
                        chunk.len()
                    );
                    return Err(StageError::new("vqa", None, message));
                }
                Err(e) => match self.settings.vqa_errors {
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
                        .map(|p| match self.model.answer(std::slice::from_ref(p)) {
                            Ok(mut one) if one.len() == 1 => Ok(one.remove(0)),
                            Ok(_) => Err("the VQA backend returned no answer".to_string()),
                            Err(e) => {
                                Counters::add(&self.counters.vqa_failed, 1);
                                Err(e.to_string())
                            }
                        })
                        .collect(),
                },
            };
            for (&i, a) in idx.iter().zip(got) {
                w.is_new[i] = a.is_ok();
                w.answers[i] = Some(a);
            }
        }
        Ok(())
    }

    /// Takes a remote model's answers to a batch's asked prompts, applying
    /// the failed-prompt policy.
    fn take_remote(&self, w: &mut Waiting, results: Vec<PromptResult>) -> Result<(), StageError> {
        if results.len() != w.misses.len() {
            let message = format!(
                "the VQA backend returned {} answers for {} prompts",
                results.len(),
                w.misses.len()
            );
            return Err(StageError::new("vqa", None, message));
        }
        for (&i, r) in w.misses.iter().zip(results) {
            let a = match r {
                Ok(a) => Ok(a),
                Err(e) => match self.settings.vqa_errors {
                    VqaErrorPolicy::Error => {
                        return Err(StageError::new("vqa", Some(prompt_query(w, i)), e));
                    }
                    VqaErrorPolicy::Record => {
                        Counters::add(&self.counters.vqa_failed, 1);
                        Err(e.to_string())
                    }
                },
            };
            w.is_new[i] = a.is_ok();
            w.answers[i] = Some(a);
        }
        Ok(())
    }

    /// Stores the answers a remote model delivered for a batch's asked
    /// prompts (its failures are not stored: a rerun asks again).
    fn store_answers(&self, w: &Waiting, results: &[PromptResult]) -> Result<(), StageError> {
        let answers: Vec<(u64, Key, Vec<u8>)> = w
            .misses
            .iter()
            .zip(results)
            .filter_map(|(&slot, r)| {
                let a = r.as_ref().ok()?;
                Some((prompt_query(w, slot), w.prompt_keys[slot], encode_value(a)))
            })
            .collect();
        self.store
            .put_vqa(&answers)
            .map_err(|e| StageError::new("vqa", None, e))
    }

    /// Publishes the model's counters for the run summary.
    fn note_stats(&mut self) {
        if let Ok(mut slot) = self.stats.1.lock() {
            slot.insert(self.stats.0, self.model.stats());
        }
    }
}

/// The query of prompt slot `slot` of a batch.
fn prompt_query(w: &Waiting, slot: usize) -> u64 {
    w.batch
        .iter()
        .zip(&w.queries)
        .find(|(_, (slots, _))| slots.contains(&slot))
        .map_or(0, |(q, _)| q.query_index)
}

/// The answered queries of a batch whose every prompt has its answer.
fn assemble(w: Waiting) -> Result<Vec<QueryAnswered>, StageError> {
    let Waiting {
        batch,
        queries,
        prompt_keys,
        answers,
        mut is_new,
        ..
    } = w;
    let answers: Vec<Answer> = answers
        .into_iter()
        .map(|a| {
            a.ok_or_else(|| StageError::new("vqa", None, "internal error: a prompt has no answer"))
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
}
