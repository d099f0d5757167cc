//! The `accuracy` stage: scores each answer with the official VQA accuracy
//! (the first scoring split whose annotations hold the question: training
//! files first, then validation), or with the original's fallback match
//! when evaluation is not strict; plus the relevance scores. A candidate
//! whose prompt the backend failed on is scored 0 and marked
//! `eval_failed`.

use std::sync::Arc;

use super::{Inputs, QueryAnswered, QueryScored, StageError};
use crate::accuracy::{
    self as metric, postprocess_generation, relevance, EvalMode, EvalSplit, Normalizer, Relevance,
    ScoringIndex,
};
use crate::dataflow::BatchFn;
use crate::dataset::VqaItem;

/// One candidate's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// The post-processed answer (empty when the prompt failed).
    pub pred: String,
    /// 1 if the accuracy is > 0.
    pub correct: u8,
    /// Official VQA accuracy (or the fallback score).
    pub acc: f64,
    /// Relevance to the ground-truth answers.
    pub rel: Relevance,
    /// How the accuracy was obtained.
    pub eval_mode: EvalMode,
    /// Which files scored it (`None` when evaluation failed).
    pub split: Option<EvalSplit>,
    /// Why evaluation failed (the backend's error), if it did.
    pub failed: Option<String>,
}

/// The question is in no annotation file and evaluation is strict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("question_id {question_id} (query {query}) is not in the annotation files; strict evaluation needs it there")]
pub struct NotInAnnotations {
    /// The official question id.
    pub question_id: u64,
    /// The query.
    pub query: u64,
}

/// The split that scores `question_id` and its accuracy: the first of
/// `scoring` whose annotations hold the question.
pub fn score_official(
    scoring: &[(&'static str, Arc<ScoringIndex>)],
    question_id: u64,
    pred: &str,
    norm: &mut Normalizer,
) -> Option<(EvalSplit, f64)> {
    scoring.iter().find_map(|(name, index)| {
        let split = match *name {
            "val" => EvalSplit::Val,
            _ => EvalSplit::Train,
        };
        index
            .evaluate(question_id, pred, norm)
            .map(|acc| (split, acc))
    })
}

/// Scores one answer of the query `item` (`Err`: the backend failed on its
/// prompt, with why).
pub fn score_answer(
    inputs: &Inputs,
    item: &VqaItem,
    answer: Result<&str, &str>,
    gt_norm: &[String],
    norm: &mut Normalizer,
) -> Result<Scores, NotInAnnotations> {
    let raw = match answer {
        Ok(raw) => raw,
        Err(why) => {
            return Ok(Scores {
                pred: String::new(),
                correct: 0,
                acc: 0.0,
                rel: relevance("", gt_norm),
                eval_mode: EvalMode::Error,
                split: None,
                failed: Some(why.to_string()),
            })
        }
    };
    let pred = postprocess_generation(Some(raw));
    let (acc, eval_mode, split) =
        match score_official(&inputs.scoring, item.question_id, &pred, norm) {
            Some((split, acc)) => (acc, EvalMode::VqaEval, split),
            None if inputs.strict => {
                return Err(NotInAnnotations {
                    question_id: item.question_id,
                    query: item.index,
                })
            }
            None => (
                metric::fallback_accuracy(&pred, &item.answers),
                EvalMode::Fallback,
                EvalSplit::Fallback,
            ),
        };
    let rel = relevance(&pred, gt_norm);
    Ok(Scores {
        correct: metric::vqa_correct(acc),
        acc,
        pred,
        rel,
        eval_mode,
        split: Some(split),
        failed: None,
    })
}

/// The `accuracy` stage.
pub fn accuracy(inputs: Arc<Inputs>) -> BatchFn<QueryAnswered, QueryScored> {
    let mut norm = Normalizer::new();
    Box::new(move |batch: Vec<QueryAnswered>| {
        let mut out = Vec::with_capacity(batch.len());
        for answered in batch {
            let q = answered.base.query_index;
            let item = inputs
                .dataset
                .get(q)
                .map_err(|e| StageError::new("accuracy", Some(q), e))?;
            let gt_norm = super::record::normalized_answers(&item.answers);
            let scores = answered
                .answers
                .iter()
                .map(|a| {
                    let a = a
                        .as_ref()
                        .map(|a| a.raw_generation.as_str())
                        .map_err(String::as_str);
                    score_answer(&inputs, item, a, &gt_norm, &mut norm)
                        .map_err(|e| StageError::new("accuracy", Some(q), e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push(QueryScored { answered, scores });
        }
        Ok(out)
    })
}
