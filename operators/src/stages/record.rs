//! Record assembly: a query's [`RlRecord`] from its dataset item and its
//! candidates (and, in `generate`, their answers, scores and rewards), and
//! the finished query the sink stores ([`finished`]). Also the record stage
//! of `candidates`, which writes candidates without VQA fields.

use std::sync::Arc;

use leverflow_schemas::{CandidateRecord, QueryRecord, RlRecord, SchemaError};

use super::{CandRow, Counters, Finished, Inputs, QueryCands, StageError};
use crate::accuracy::postprocess_generation;
use crate::dataflow::BatchFn;
use crate::state::{Key, QueryUpdate, StoredOutcome};

fn fail(
    stage: &'static str,
    query: u64,
) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> StageError {
    move |e| StageError::new(stage, Some(query), e)
}

/// The query part of a record: identity, question and ground truth (raw
/// and post-processed). Without a dataset (a `candidates` run on
/// checkpoint and embeddings alone) only `query_id` is known.
pub fn query_record(inputs: &Inputs, query_index: u64) -> Result<QueryRecord, StageError> {
    if !inputs.with_dataset {
        return Ok(QueryRecord::index_only(query_index));
    }
    let item = inputs
        .dataset
        .get(query_index)
        .map_err(|e| fail("record", query_index)(e.into()))?;
    Ok(QueryRecord {
        query_id: query_index,
        question_id: Some(item.question_id),
        image_id: Some(item.image_id),
        question: Some(item.question.clone()),
        gt_answers_raw: Some(item.answers.clone()),
        gt_answers_norm: Some(normalized_answers(&item.answers)),
    })
}

/// The ground-truth answers after the VQA answer post-processing (the
/// record's `gt_answers_norm`, and what relevance is measured against).
pub fn normalized_answers(answers: &[String]) -> Vec<String> {
    answers
        .iter()
        .map(|a| postprocess_generation(Some(a)))
        .collect()
}

/// A candidate's record with its pointer fields (by the run's layout) and
/// how it was generated; no VQA fields.
pub fn candidate_record(inputs: &Inputs, row: &CandRow) -> Result<CandidateRecord, SchemaError> {
    let positions: Vec<u64> = row.cand.positions.iter().map(|&p| p as u64).collect();
    let mut rec = CandidateRecord::new(
        &positions,
        &row.indices,
        inputs.layout,
        row.cand.gen_method.as_str(),
        row.cand.logprob_score,
    )?;
    rec.beam_rank = row.cand.beam_rank.map(|r| r as u32);
    rec.beam_score = row.cand.beam_score;
    rec.temperature = row.cand.temperature;
    rec.sample_logprob_tempered = row.cand.sample_logprob_tempered;
    Ok(rec)
}

/// The finished query for the sink: its record (serialised as the JSON
/// output holds it; or why it was skipped) and the new results it depends
/// on, as one encoded [`QueryUpdate`] stored under `key` (the query's input
/// key, or its [`crate::state::provisional`] key).
pub fn finished(
    base: &QueryCands,
    key: Key,
    outcome: Result<&RlRecord, String>,
    new_vqa: Vec<(Key, Vec<u8>)>,
) -> Result<Finished, StageError> {
    let q = base.query_index;
    let outcome = match outcome {
        Ok(record) => StoredOutcome::compressed(
            &serde_json::to_vec(record).map_err(|e| fail("record", q)(e.into()))?,
        ),
        Err(reason) => StoredOutcome::Skipped(reason),
    };
    let update = QueryUpdate {
        query_index: q,
        input_key: key,
        outcome,
        candidates: base.new_cands.clone(),
        vqa: new_vqa,
    };
    Ok((q, update.encode()))
}

/// Counts a finished record.
pub fn count(counters: &Counters, record: &RlRecord) {
    Counters::add(&counters.queries_done, 1);
    Counters::add(
        &counters.candidates_done,
        record.pointer_candidates.len() as u64,
    );
}

/// The record stage of `leverflow candidates`: candidates without VQA fields.
pub fn candidates_record(
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
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail("record", q.query_index)(e.into()))?;
            let record = RlRecord {
                query: query_record(&inputs, q.query_index)?,
                candidate_pool_ids: q.pool_ids.clone(),
                pointer_candidates: cands,
            };
            count(&counters, &record);
            out.push(finished(&q, q.input_key, Ok(&record), Vec::new())?);
        }
        Ok(out)
    })
}
