//! The official VQA accuracy and the other per-prediction metrics of the
//! original RL-data generation.
//!
//! * [`normalize_answer`] / [`Normalizer`]: the official answer normalisation
//!   (`VQAEval.processPunctuation` + `processDigitArticle`).
//! * [`GtAnswers`]: a question's ground truth prepared once; scoring a
//!   normalised prediction is a few string comparisons
//!   (`vqa_acc_score`, and `vqa_correct` = [`vqa_correct`]).
//! * [`postprocess_generation`] reproduces `postprocess_vqa_generation`.
//! * [`relevance`] reproduces `compute_relevance` (token F1 and difflib ratio).
//! * [`fallback_accuracy`], [`EvalMode`], [`EvalSplit`]: the
//!   `--no_strict_eval` string-matching fallback and the labels recorded in
//!   `vqa_eval_mode` / `eval_split_used`.
//! * [`ScoringIndex`], [`load_questions_annotations`], [`score_predictions`]:
//!   official scoring of a results file (`leverflow score`).
//!
//! Known, documented difference: the original evaluates with a cached
//! `VQA` object whose ground-truth answers it re-normalises in place at every
//! evaluation; normalisation is idempotent except for answers with more than
//! 32 removable periods, so [`GtAnswers`] normalises once (a freshly loaded
//! evaluator), while [`score_predictions`] reproduces the repeated
//! normalisation for a question listed several times in one results file.

mod fallback;
mod gt;
mod normalize;
mod postprocess;
mod relevance;
mod scoring;

#[cfg(test)]
mod fixture_tests;

pub use fallback::{fallback_accuracy, EvalMode, EvalSplit};
pub use gt::{acc_score_from_percent, vqa_accuracy, vqa_correct, GtAnswers};
pub use normalize::{
    is_py_digit, is_py_space, normalize_answer, py_round, py_strip, Normalizer, ARTICLES,
    CONTRACTIONS, MANUAL_MAP, PERIOD_STRIP_LIMIT, PUNCT,
};
pub use postprocess::postprocess_generation;
pub use relevance::{relevance, sequence_matcher_ratio, token_f1, Relevance};
pub(crate) use scoring::typed;
pub use scoring::{
    load_questions_annotations, score_predictions, score_results, AccuracyError, ScoreReport,
    ScoringIndex,
};
