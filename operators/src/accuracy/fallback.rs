//! The string-matching fallback of the original RL-data generation, used with
//! `--no_strict_eval` when no official question/annotation file can score a
//! prediction, and the labels the original records for how a prediction was
//! scored.

use std::fmt;

/// The original's fallback score (`compute_vqa_accuracy` without files): the
/// prediction and every ground-truth answer are `lower().strip()`-ed; 1.0 if
/// the prediction equals one of them, otherwise 0.5 if it is a substring of
/// one or one is a substring of it (so an empty prediction, or an empty
/// answer, gives at least 0.5), otherwise 0.0. The matching `vqa_correct` is
/// 1 for both 1.0 and 0.5 (see [`super::vqa_correct`]).
pub fn fallback_accuracy(pred: &str, gt_raw: &[String]) -> f64 {
    let pred = super::normalize::py_strip(&pred.to_lowercase()).to_owned();
    let gts: Vec<String> = gt_raw
        .iter()
        .map(|g| super::normalize::py_strip(&g.to_lowercase()).to_owned())
        .collect();
    if gts.contains(&pred) {
        return 1.0;
    }
    if gts
        .iter()
        .any(|g| g.contains(pred.as_str()) || pred.contains(g.as_str()))
    {
        return 0.5;
    }
    0.0
}

/// How a candidate's accuracy was obtained, as the original records it in
/// `vqa_eval_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvalMode {
    /// Scored by the official evaluator (`"vqaEval"`).
    VqaEval,
    /// Scored by [`fallback_accuracy`] (`"fallback"`).
    Fallback,
    /// Evaluation raised an error; the candidate is marked `eval_failed`
    /// (`"error"`).
    Error,
}

impl EvalMode {
    /// The string the original writes.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalMode::VqaEval => "vqaEval",
            EvalMode::Fallback => "fallback",
            EvalMode::Error => "error",
        }
    }
}

impl fmt::Display for EvalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which files scored a candidate, as the original records it in
/// `eval_split_used` (absent / `null` when evaluation failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvalSplit {
    /// The training question/annotation files (tried first): `"train"`.
    Train,
    /// The validation files (tried when the training files did not score it):
    /// `"val"`.
    Val,
    /// The string-matching fallback: `"fallback"`.
    Fallback,
}

impl EvalSplit {
    /// The string the original writes.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalSplit::Train => "train",
            EvalSplit::Val => "val",
            EvalSplit::Fallback => "fallback",
        }
    }

    /// The `vqa_eval_mode` that goes with this split.
    pub fn eval_mode(self) -> EvalMode {
        match self {
            EvalSplit::Train | EvalSplit::Val => EvalMode::VqaEval,
            EvalSplit::Fallback => EvalMode::Fallback,
        }
    }
}

impl fmt::Display for EvalSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn fallback_semantics() {
        assert_eq!(fallback_accuracy(" Red ", &v(&["blue", "RED"])), 1.0);
        assert_eq!(fallback_accuracy("red circle", &v(&["blue", "red"])), 0.5);
        assert_eq!(fallback_accuracy("re", &v(&["blue", "red"])), 0.5);
        assert_eq!(fallback_accuracy("green", &v(&["blue", "red"])), 0.0);
        assert_eq!(fallback_accuracy("", &v(&["blue"])), 0.5);
        assert_eq!(fallback_accuracy("x", &v(&["blue", ""])), 0.5);
        assert_eq!(fallback_accuracy("x", &[]), 0.0);
        // no normalisation beyond lower/strip
        assert_eq!(fallback_accuracy("two", &v(&["2"])), 0.0);
    }

    #[test]
    fn labels() {
        assert_eq!(EvalMode::VqaEval.to_string(), "vqaEval");
        assert_eq!(EvalMode::Fallback.as_str(), "fallback");
        assert_eq!(EvalMode::Error.as_str(), "error");
        assert_eq!(EvalSplit::Train.to_string(), "train");
        assert_eq!(EvalSplit::Val.as_str(), "val");
        assert_eq!(EvalSplit::Fallback.eval_mode(), EvalMode::Fallback);
        assert_eq!(EvalSplit::Val.eval_mode(), EvalMode::VqaEval);
    }
}
