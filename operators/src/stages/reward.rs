//! The `reward` stage: each candidate's reward from its scores (the
//! original's reward modes, [`crate::reward::compute_reward`]), the
//! within-query advantages, and the finished record.

use std::sync::Arc;

use leverflow_schemas::{CandidateRecord, RlRecord};

use super::accuracy::Scores;
use super::record::{candidate_record, count, finished, query_record};
use super::{Answer, CandRow, Counters, Finished, Inputs, QueryScored, StageError};
use crate::dataflow::BatchFn;
use crate::reward::{advantages, compute_reward, RewardConfig, RewardInputs};

/// A candidate's record with its answer and scores (no reward yet).
pub fn scored_candidate(
    inputs: &Inputs,
    row: &CandRow,
    answer: &Answer,
    s: &Scores,
    save_prompts: bool,
) -> Result<CandidateRecord, leverflow_schemas::SchemaError> {
    let mut rec = candidate_record(inputs, row)?;
    let ok = answer.as_ref().ok();
    rec.vqa_raw_generation = ok.map(|a| a.raw_generation.clone());
    rec.vqa_pred_answer = Some(s.pred.clone());
    rec.vqa_correct = Some(s.correct);
    rec.vqa_acc_score = Some(s.acc);
    rec.vqa_gt_prob = ok.and_then(|a| a.gt_prob);
    rec.vqa_rel_token_f1 = Some(s.rel.token_f1);
    rec.vqa_rel_edit_sim = Some(s.rel.edit_sim);
    rec.vqa_rel_score = Some(s.rel.score);
    rec.vqa_eval_mode = Some(s.eval_mode.as_str().to_string());
    rec.eval_split_used = s.split.map(|x| x.as_str().to_string());
    rec.eval_failed = Some(s.failed.is_some());
    if save_prompts {
        rec.prompt_text = ok.and_then(|a| a.prompt_text.clone());
    }
    Ok(rec)
}

/// The reward of a scored candidate.
pub fn reward_of(cfg: &RewardConfig, row: &CandRow, rec: &CandidateRecord) -> f64 {
    compute_reward(
        cfg,
        &RewardInputs {
            beam_score: row.cand.beam_score,
            logprob_score: Some(row.cand.logprob_score),
            vqa_correct: rec.vqa_correct,
            vqa_acc_score: rec.vqa_acc_score,
            vqa_gt_prob: rec.vqa_gt_prob,
            vqa_rel_score: rec.vqa_rel_score,
        },
    )
}

/// The `reward` stage: rewards and within-query advantages, then the record.
pub fn reward(
    inputs: Arc<Inputs>,
    save_prompts: bool,
    counters: Arc<Counters>,
) -> BatchFn<QueryScored, Finished> {
    Box::new(move |batch: Vec<QueryScored>| {
        let mut out = Vec::with_capacity(batch.len());
        for mut q in batch {
            let qi = q.answered.base.query_index;
            let new_vqa = std::mem::take(&mut q.answered.new_vqa);
            if let Some(reason) = q.answered.skipped.clone() {
                Counters::add(&counters.queries_done, 1);
                let key = q.answered.base.input_key;
                out.push(finished(&q.answered.base, key, Err(reason), new_vqa)?);
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
                let mut rec = scored_candidate(&inputs, row, ans, s, save_prompts)
                    .map_err(|e| StageError::new("reward", Some(qi), e))?;
                let r = reward_of(&inputs.reward, row, &rec);
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
            count(&counters, &record);
            // A record with unanswered candidates is provisional: stored
            // (and written) now, computed again by the next run.
            let key = match q.answered.answers.iter().any(Result::is_err) {
                true => crate::state::provisional(&q.answered.base.input_key),
                false => q.answered.base.input_key,
            };
            out.push(finished(&q.answered.base, key, Ok(&record), new_vqa)?);
        }
        Ok(out)
    })
}
