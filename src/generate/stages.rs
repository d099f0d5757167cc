//! The per-worker batch functions of each dataflow stage and the records
//! that flow between them. Each is a thin adapter from the pure stage logic
//! in `leverflow-operators` to [`BatchFn`].

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

use leverflow_operators::accuracy::{self, postprocess_generation, relevance, Normalizer};
use leverflow_operators::candidates::{
    dedup_candidates, generate_candidates_batch, generate_candidates_per_query_pools,
    score_sequences, Candidate, GenMethod, QueryInput,
};
use leverflow_operators::dataflow::{BatchFn, Planned};
use leverflow_operators::reward::{advantages, compute_reward, RewardInputs};
use leverflow_operators::state::{encode_value, Key, QueryUpdate, StateStore, StoredOutcome};
use leverflow_operators::tensor_io::Matrix;
use leverflow_operators::vqa::{PromptExample, VqaAnswer, VqaModel, VqaPrompt};
use leverflow_schemas::{CandidateRecord, QueryRecord, RlRecord};

use super::inputs::{Inputs, Pools};
use super::keys::{ImageStamp, RunKeys};
use crate::progress::Counters;

/// A query routed to a worker: its index and the beam data's own beams.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryWork {
    /// Dataset index of the query.
    pub query_index: u64,
    /// The beam data's ICD sequences (dataset indices, query removed).
    pub source_beams: Vec<Vec<u64>>,
    /// Key of everything the query's record depends on (set by `plan`).
    pub input_key: Key,
}

/// A candidate with its pool positions and dataset indices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandRow {
    /// The generator's output.
    pub cand: Candidate,
    /// Dataset indices of the examples, in pointer order.
    pub indices: Vec<u64>,
}

/// A query with its candidates.
#[derive(Debug, Clone)]
pub struct QueryCands {
    /// Dataset index of the query.
    pub query_index: u64,
    /// The query's own pool (per-query pools only).
    pub pool_ids: Option<Vec<u64>>,
    /// Candidates in generation order.
    pub cands: Vec<CandRow>,
    /// The query's input key.
    pub input_key: Key,
    /// A newly generated candidate set for the store (None: it came from
    /// the store).
    pub new_cands: Option<(Key, Vec<u8>)>,
}

/// A query with one answer per candidate (or the reason it was skipped).
#[derive(Debug, Clone)]
pub struct QueryAnswered {
    /// Candidates.
    pub base: QueryCands,
    /// One answer per candidate.
    pub answers: Vec<VqaAnswer>,
    /// Why the query was skipped (`--on_missing_image skip`).
    pub skipped: Option<String>,
    /// Newly computed answers for the store.
    pub new_vqa: Vec<(Key, Vec<u8>)>,
}

/// One candidate's scores.
#[derive(Debug, Clone)]
pub struct Scores {
    pred: String,
    correct: u8,
    acc: f64,
    rel: accuracy::Relevance,
    eval_mode: &'static str,
    split: Option<&'static str>,
    failed: bool,
}

/// A query with answers and scores.
#[derive(Debug, Clone)]
pub struct QueryScored {
    /// Answers.
    pub answered: QueryAnswered,
    /// One score per candidate.
    pub scores: Vec<Scores>,
}

/// A finished query: its index and its encoded [`QueryUpdate`].
pub type Finished = (u64, Vec<u8>);

/// The `plan` stage: computes each query's input key, notes it in
/// `current`, and marks queries whose stored record has the same key as
/// reusable.
pub fn plan(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    with_images: bool,
    current: Arc<std::sync::Mutex<Vec<(u64, Key)>>>,
    counters: Arc<Counters>,
) -> BatchFn<QueryWork, Planned<QueryWork>> {
    let mut stamps = std::collections::HashMap::new();
    Box::new(move |batch: Vec<QueryWork>| {
        let reader = store.reader().map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(batch.len());
        let mut seen = Vec::with_capacity(batch.len());
        for mut w in batch {
            let key = keys.input_key(&inputs, &w, with_images, &mut stamps)?;
            w.input_key = key;
            let reuse = reader
                .has_record(w.query_index, &key)
                .map_err(|e| e.to_string())?;
            if reuse {
                Counters::add(&counters.queries_reused, 1);
                Counters::add(&counters.queries_done, 1);
            }
            seen.push((w.query_index, key));
            out.push(Planned {
                query_index: w.query_index,
                input_key: key,
                reuse,
                work: w,
            });
        }
        current.lock().map_err(|e| e.to_string())?.extend(seen);
        Ok(out)
    })
}

fn query_row(inputs: &Inputs, query_index: u64) -> Result<&[f32], String> {
    let m = &inputs.query_emb;
    if (query_index as usize) < m.rows {
        Ok(m.row(query_index as usize))
    } else {
        Err(format!(
            "{}: query {query_index} is outside the query embeddings {} ({} rows)",
            inputs.beam_path.display(),
            inputs.query_emb_path.display(),
            m.rows
        ))
    }
}

/// The `candidates` stage: candidate sets from the store when their key is
/// there, generated (in one batch) otherwise.
pub fn candidates(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    include_source_beams: bool,
    counters: Arc<Counters>,
) -> BatchFn<QueryWork, QueryCands> {
    Box::new(move |batch: Vec<QueryWork>| {
        let reader = store.reader().map_err(|e| e.to_string())?;
        let mut slots: Vec<Option<QueryCands>> = Vec::with_capacity(batch.len());
        let mut misses: Vec<QueryWork> = Vec::new();
        let mut miss_keys: Vec<Key> = Vec::new();
        for w in &batch {
            let key = keys.candidates_key(&inputs, w, include_source_beams)?;
            match reader
                .candidates::<Vec<CandRow>>(w.query_index, &key)
                .map_err(|e| e.to_string())?
            {
                Some(cands) => {
                    Counters::add(&counters.candidate_sets_cached, 1);
                    slots.push(Some(QueryCands {
                        query_index: w.query_index,
                        pool_ids: pool_ids_of(&inputs, w.query_index),
                        cands,
                        input_key: w.input_key,
                        new_cands: None,
                    }));
                }
                None => {
                    slots.push(None);
                    misses.push(w.clone());
                    miss_keys.push(key);
                }
            }
        }
        let mut generated = if misses.is_empty() {
            Vec::new()
        } else {
            generate_rows(&inputs, include_source_beams, misses)?
        }
        .into_iter()
        .zip(miss_keys);
        let mut out = Vec::with_capacity(batch.len());
        for slot in slots {
            match slot {
                Some(q) => out.push(q),
                None => {
                    let (mut q, key) = generated
                        .next()
                        .ok_or("internal error: candidate generation lost a query")?;
                    q.new_cands = Some((key, encode_value(&q.cands)));
                    out.push(q);
                }
            }
        }
        Ok(out)
    })
}

fn pool_ids_of(inputs: &Inputs, query_index: u64) -> Option<Vec<u64>> {
    match &inputs.pools {
        Pools::Shared { .. } => None,
        Pools::PerQuery { pools } => pools.get(&query_index).cloned(),
    }
}

/// Generates the candidate sets of a batch of queries.
fn generate_rows(
    inputs: &Inputs,
    include_source_beams: bool,
    batch: Vec<QueryWork>,
) -> Result<Vec<QueryCands>, String> {
    let model = &*inputs.model;
    let args = &inputs.cand_args;
    let mut out = Vec::with_capacity(batch.len());
    match &inputs.pools {
        Pools::Shared {
            pool,
            indices,
            position_of,
        } => {
            let mut queries = Vec::with_capacity(batch.len());
            for w in &batch {
                // Every ICD of the beam data must be a pool member, as the
                // original's `candidate_indices.index(id)` requires.
                source_positions(w, |id| position_of.get(&id).copied())?;
                queries.push(QueryInput {
                    query_index: w.query_index,
                    embedding: query_row(inputs, w.query_index)?,
                    exclude_position: position_of.get(&w.query_index).copied(),
                });
            }
            let generated = generate_candidates_batch(model, pool, &queries, args)
                .map_err(|e| e.to_string())?;
            for ((w, q), mut cands) in batch.iter().zip(&queries).zip(generated) {
                if include_source_beams && !w.source_beams.is_empty() {
                    let seqs = source_positions(w, |id| position_of.get(&id).copied())?;
                    let lps = score_sequences(model, pool, q, &seqs).map_err(|e| e.to_string())?;
                    cands.extend(
                        seqs.into_iter()
                            .zip(lps)
                            .map(|(positions, lp)| source_candidate(positions, lp)),
                    );
                    cands = dedup_candidates(cands);
                }
                let rows = cands
                    .into_iter()
                    .map(|cand| {
                        let idx = cand.positions.iter().map(|&p| indices[p]).collect();
                        CandRow { cand, indices: idx }
                    })
                    .collect();
                out.push(QueryCands {
                    query_index: w.query_index,
                    pool_ids: None,
                    cands: rows,
                    input_key: w.input_key,
                    new_cands: None,
                });
            }
        }
        Pools::PerQuery { pools } => {
            let mut mats = Vec::with_capacity(batch.len());
            for w in &batch {
                let ids = pools.get(&w.query_index).ok_or_else(|| {
                    format!(
                        "the sampler cache has no candidate pool for query {}",
                        w.query_index
                    )
                })?;
                let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
                let m = inputs.cand_emb.select_rows(&rows).ok_or_else(|| {
                    format!(
                        "query {}: pool id outside the candidate embeddings",
                        w.query_index
                    )
                })?;
                mats.push(m);
            }
            let refs: Vec<&Matrix> = mats.iter().collect();
            let prepared = model.prepare_pools(&refs).map_err(|e| e.to_string())?;
            let mut queries = Vec::with_capacity(batch.len());
            for w in &batch {
                let ids = &pools[&w.query_index];
                queries.push(QueryInput {
                    query_index: w.query_index,
                    embedding: query_row(inputs, w.query_index)?,
                    exclude_position: ids.iter().position(|&i| i == w.query_index),
                });
            }
            let prefs: Vec<_> = prepared.iter().collect();
            let generated = generate_candidates_per_query_pools(model, &prefs, &queries, args)
                .map_err(|e| e.to_string())?;
            for (((w, q), pool), mut cands) in
                batch.iter().zip(&queries).zip(&prepared).zip(generated)
            {
                let ids = &pools[&w.query_index];
                if include_source_beams && !w.source_beams.is_empty() {
                    let seqs = source_positions(w, |id| ids.iter().position(|&i| i == id))?;
                    let lps = score_sequences(model, pool, q, &seqs).map_err(|e| e.to_string())?;
                    cands.extend(
                        seqs.into_iter()
                            .zip(lps)
                            .map(|(p, lp)| source_candidate(p, lp)),
                    );
                    cands = dedup_candidates(cands);
                }
                let rows = cands
                    .into_iter()
                    .map(|cand| {
                        let idx = cand.positions.iter().map(|&p| ids[p]).collect();
                        CandRow { cand, indices: idx }
                    })
                    .collect();
                out.push(QueryCands {
                    query_index: w.query_index,
                    pool_ids: Some(ids.clone()),
                    cands: rows,
                    input_key: w.input_key,
                    new_cands: None,
                });
            }
        }
    }
    Ok(out)
}

fn source_positions(
    w: &QueryWork,
    position: impl Fn(u64) -> Option<usize>,
) -> Result<Vec<Vec<usize>>, String> {
    w.source_beams
        .iter()
        .enumerate()
        .map(|(b, beam)| {
            beam.iter()
                .map(|&id| {
                    position(id).ok_or_else(|| {
                        format!(
                            "beam data: query {}, beam {b}: ICD index {id} is not in the candidate pool",
                            w.query_index
                        )
                    })
                })
                .collect()
        })
        .collect()
}

fn source_candidate(positions: Vec<usize>, logprob: f64) -> Candidate {
    Candidate {
        positions,
        gen_method: GenMethod::SourceBeam,
        beam_rank: None,
        beam_score: None,
        logprob_score: logprob,
        temperature: None,
        sample_logprob_tempered: None,
    }
}

/// Settings of the `vqa` stage.
#[derive(Clone)]
pub struct VqaStageConfig {
    /// Prompts per model call.
    pub batch_size: usize,
    /// System prompt.
    pub system_prompt: String,
    /// Whether to ask for the answer probability.
    pub gt_prob: bool,
    /// Skip (instead of failing on) queries with a missing image.
    pub skip_missing_images: bool,
}

/// The latest backend counters of each worker (`VqaModel::stats`), summed
/// into the run summary at the end.
pub type BackendStats = Arc<std::sync::Mutex<HashMap<usize, serde_json::Value>>>;

/// Distinct post-processed ground-truth answers with weights min(count/3, 1).
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

/// The `vqa` stage.
#[allow(clippy::too_many_arguments)]
pub fn vqa(
    inputs: Arc<Inputs>,
    keys: Arc<RunKeys>,
    store: Arc<StateStore>,
    mut model: Box<dyn VqaModel>,
    cfg: VqaStageConfig,
    counters: Arc<Counters>,
    stats: (usize, BackendStats),
) -> BatchFn<QueryCands, QueryAnswered> {
    Box::new(move |batch: Vec<QueryCands>| {
        let ds = &inputs.dataset;
        let mut prompts: Vec<VqaPrompt> = Vec::new();
        let mut slot_of: HashMap<(u64, Vec<u64>), usize> = HashMap::new();
        let mut plan: Vec<(Vec<usize>, Option<String>)> = Vec::with_capacity(batch.len());
        // A query's image is shared by all its candidates and examples
        // recur: look each file up once per batch.
        let mut stamps: HashMap<std::path::PathBuf, ImageStamp> = HashMap::new();
        for q in &batch {
            let item = ds.get(q.query_index).map_err(|e| e.to_string())?;
            let mut missing = None;
            let gt = if cfg.gt_prob {
                weighted_gt_answers(&item.answers)
            } else {
                Vec::new()
            };
            let mut slots = Vec::with_capacity(q.cands.len());
            for c in &q.cands {
                let mut examples = Vec::with_capacity(c.indices.len());
                for &i in &c.indices {
                    let ex = ds.get(i).map_err(|e| e.to_string())?;
                    examples.push(PromptExample {
                        dataset_index: i,
                        image: ex.image_path.clone(),
                        question: ex.question.clone(),
                        answer: ex.icd_answer.clone(),
                    });
                }
                for p in examples
                    .iter()
                    .map(|e| &e.image)
                    .chain(std::iter::once(&item.image_path))
                {
                    let found = stamps
                        .entry(p.clone())
                        .or_insert_with(|| super::keys::image_stamp(p))
                        .is_some();
                    if !found {
                        let msg = format!(
                            "missing image {} (query {}); pass --on_missing_image skip to skip such queries",
                            p.display(),
                            q.query_index
                        );
                        if cfg.skip_missing_images {
                            missing = Some(format!("missing image {}", p.display()));
                        } else {
                            return Err(msg);
                        }
                    }
                }
                if missing.is_some() {
                    break;
                }
                let key = (q.query_index, c.indices.clone());
                let slot = *slot_of.entry(key).or_insert_with(|| {
                    prompts.push(VqaPrompt {
                        query_index: q.query_index,
                        system_prompt: cfg.system_prompt.clone(),
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
            plan.push((slots, missing));
        }
        // Answers already in the store are served from it; only the others
        // reach the model.
        let reader = store.reader().map_err(|e| e.to_string())?;
        let prompt_keys: Vec<Key> = prompts
            .iter()
            .map(|p| keys.vqa_key(p, &mut stamps))
            .collect();
        let mut answers: Vec<Option<VqaAnswer>> = Vec::with_capacity(prompts.len());
        let mut misses: Vec<usize> = Vec::new();
        for (i, k) in prompt_keys.iter().enumerate() {
            let hit = reader
                .vqa::<VqaAnswer>(prompts[i].query_index, k)
                .map_err(|e| e.to_string())?;
            if hit.is_none() {
                misses.push(i);
            }
            answers.push(hit);
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
            .chunks(cfg.batch_size.max(1))
            .zip(misses.chunks(cfg.batch_size.max(1)))
        {
            let got = model.answer(chunk).map_err(|e| e.to_string())?;
            if got.len() != chunk.len() {
                return Err(format!(
                    "VQA backend returned {} answers for {} prompts",
                    got.len(),
                    chunk.len()
                ));
            }
            Counters::add(&counters.vqa_calls, chunk.len() as u64);
            for (&i, a) in idx.iter().zip(got) {
                answers[i] = Some(a);
                is_new[i] = true;
            }
        }
        if !misses.is_empty() {
            if let Ok(mut slot) = stats.1.lock() {
                slot.insert(stats.0, model.stats());
            }
        }
        let answers: Vec<VqaAnswer> = answers
            .into_iter()
            .map(|a| a.ok_or("internal error: a prompt has no answer"))
            .collect::<Result<_, _>>()?;
        Ok(batch
            .into_iter()
            .zip(plan)
            .map(|(base, (slots, skipped))| {
                let mut new_vqa = Vec::new();
                for &s in &slots {
                    if std::mem::take(&mut is_new[s]) {
                        new_vqa.push((prompt_keys[s], encode_value(&answers[s])));
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

/// The `accuracy` stage.
pub fn accuracy_stage(inputs: Arc<Inputs>) -> BatchFn<QueryAnswered, QueryScored> {
    let mut norm = Normalizer::new();
    Box::new(move |batch: Vec<QueryAnswered>| {
        let mut out = Vec::with_capacity(batch.len());
        for answered in batch {
            let item = inputs
                .dataset
                .get(answered.base.query_index)
                .map_err(|e| e.to_string())?;
            let gt_norm: Vec<String> = item
                .answers
                .iter()
                .map(|a| postprocess_generation(Some(a)))
                .collect();
            let mut scores = Vec::with_capacity(answered.answers.len());
            for a in &answered.answers {
                let pred = postprocess_generation(Some(&a.raw_generation));
                let mut found = None;
                for (split, index) in &inputs.scoring {
                    if let Some(acc) = index.evaluate(item.question_id, &pred, &mut norm) {
                        found = Some((*split, acc));
                        break;
                    }
                }
                let (acc, eval_mode, split, failed) = match found {
                    Some((split, acc)) => (acc, "vqaEval", Some(split), false),
                    None if inputs.strict => {
                        return Err(format!(
                            "question_id {} (query {}) is not in the annotation files; strict evaluation needs it there (pass --no_strict_eval to use the fallback match)",
                            item.question_id, answered.base.query_index
                        ))
                    }
                    None => (
                        accuracy::fallback_accuracy(&pred, &item.answers),
                        "fallback",
                        Some("fallback"),
                        false,
                    ),
                };
                let rel = relevance(&pred, &gt_norm);
                scores.push(Scores {
                    correct: accuracy::vqa_correct(acc),
                    acc,
                    pred,
                    rel,
                    eval_mode,
                    split,
                    failed,
                });
            }
            out.push(QueryScored { answered, scores });
        }
        Ok(out)
    })
}

fn query_record(inputs: &Inputs, query_index: u64) -> Result<QueryRecord, String> {
    let item = inputs.dataset.get(query_index).map_err(|e| e.to_string())?;
    Ok(QueryRecord {
        query_id: query_index,
        question_id: item.question_id,
        image_id: item.image_id,
        question: item.question.clone(),
        gt_answers_raw: item.answers.clone(),
        gt_answers_norm: item
            .answers
            .iter()
            .map(|a| postprocess_generation(Some(a)))
            .collect(),
    })
}

fn candidate_record(inputs: &Inputs, row: &CandRow) -> Result<CandidateRecord, String> {
    let positions: Vec<u64> = row.cand.positions.iter().map(|&p| p as u64).collect();
    let mut rec = CandidateRecord::new(
        &positions,
        &row.indices,
        inputs.layout,
        row.cand.gen_method.as_str(),
        row.cand.logprob_score,
    )
    .map_err(|e| e.to_string())?;
    rec.beam_rank = row.cand.beam_rank.map(|r| r as u32);
    rec.beam_score = row.cand.beam_score;
    rec.temperature = row.cand.temperature;
    rec.sample_logprob_tempered = row.cand.sample_logprob_tempered;
    Ok(rec)
}

/// The finished query for the sink: its record (serialised as the JSON
/// output holds it) and the new results it depends on.
fn finished(
    base: &QueryCands,
    outcome: Result<&RlRecord, String>,
    new_vqa: Vec<(Key, Vec<u8>)>,
) -> Result<Finished, String> {
    let q = base.query_index;
    let outcome = match outcome {
        Ok(record) => StoredOutcome::compressed(
            &serde_json::to_vec(record)
                .map_err(|e| format!("query {q}: cannot serialise the record: {e}"))?,
        ),
        Err(reason) => StoredOutcome::Skipped(reason),
    };
    let update = QueryUpdate {
        query_index: q,
        input_key: base.input_key,
        outcome,
        candidates: base.new_cands.clone(),
        vqa: new_vqa,
    };
    Ok((q, update.encode()))
}

/// The `reward` stage: rewards and within-query advantages, then the record.
pub fn reward_stage(
    inputs: Arc<Inputs>,
    save_prompts: bool,
    counters: Arc<Counters>,
) -> BatchFn<QueryScored, Finished> {
    Box::new(move |batch: Vec<QueryScored>| {
        let mut out = Vec::with_capacity(batch.len());
        for mut q in batch {
            let qi = q.answered.base.query_index;
            if let Some(reason) = q.answered.skipped.clone() {
                Counters::add(&counters.queries_done, 1);
                out.push(finished(
                    &q.answered.base,
                    Err(reason),
                    std::mem::take(&mut q.answered.new_vqa),
                )?);
                continue;
            }
            let mut cands = Vec::with_capacity(q.scores.len());
            let mut rewards = Vec::with_capacity(q.scores.len());
            for ((row, ans), s) in q
                .answered
                .base
                .cands
                .iter()
                .zip(&q.answered.answers)
                .zip(&q.scores)
            {
                let mut rec = candidate_record(&inputs, row)?;
                rec.vqa_raw_generation = Some(ans.raw_generation.clone());
                rec.vqa_pred_answer = Some(s.pred.clone());
                rec.vqa_correct = Some(s.correct);
                rec.vqa_acc_score = Some(s.acc);
                rec.vqa_gt_prob = ans.gt_prob;
                rec.vqa_rel_token_f1 = Some(s.rel.token_f1);
                rec.vqa_rel_edit_sim = Some(s.rel.edit_sim);
                rec.vqa_rel_score = Some(s.rel.score);
                rec.vqa_eval_mode = Some(s.eval_mode.to_string());
                rec.eval_split_used = s.split.map(str::to_string);
                rec.eval_failed = Some(s.failed);
                if save_prompts {
                    rec.prompt_text = ans.prompt_text.clone();
                }
                let r = compute_reward(
                    &inputs.reward,
                    &RewardInputs {
                        beam_score: row.cand.beam_score,
                        logprob_score: Some(row.cand.logprob_score),
                        vqa_correct: Some(s.correct),
                        vqa_acc_score: Some(s.acc),
                        vqa_gt_prob: ans.gt_prob,
                        vqa_rel_score: Some(s.rel.score),
                    },
                );
                rec.reward = Some(r);
                rewards.push(r);
                cands.push(rec);
            }
            for (rec, a) in cands.iter_mut().zip(advantages(&rewards)) {
                rec.advantage = Some(a);
            }
            let record = RlRecord {
                query: query_record(&inputs, qi)?,
                candidate_pool_ids: q.answered.base.pool_ids.clone(),
                pointer_candidates: cands,
            };
            Counters::add(&counters.queries_done, 1);
            Counters::add(
                &counters.candidates_done,
                record.pointer_candidates.len() as u64,
            );
            let new_vqa = std::mem::take(&mut q.answered.new_vqa);
            out.push(finished(&q.answered.base, Ok(&record), new_vqa)?);
        }
        Ok(out)
    })
}

/// The record stage of `leverflow candidates`: candidates without VQA fields.
pub fn candidates_record_stage(
    inputs: Arc<Inputs>,
    counters: Arc<Counters>,
) -> BatchFn<QueryCands, Finished> {
    Box::new(move |batch: Vec<QueryCands>| {
        let mut out = Vec::with_capacity(batch.len());
        for q in batch {
            let cands = q
                .cands
                .iter()
                .map(|row| candidate_record(&inputs, row))
                .collect::<Result<Vec<_>, _>>()?;
            let record = RlRecord {
                query: query_record(&inputs, q.query_index)?,
                candidate_pool_ids: q.pool_ids.clone(),
                pointer_candidates: cands,
            };
            Counters::add(&counters.queries_done, 1);
            Counters::add(
                &counters.candidates_done,
                record.pointer_candidates.len() as u64,
            );
            out.push(finished(&q, Ok(&record), Vec::new())?);
        }
        Ok(out)
    })
}
