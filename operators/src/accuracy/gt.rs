//! Per-question ground truth prepared once, and the official accuracy of a
//! normalised prediction against it.

use super::normalize::{py_round, Normalizer};

/// One distinct normalised ground-truth answer with the accuracy a prediction
/// equal to it receives.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    answer: Box<str>,
    /// `mean_i min(1, matches_i / 3)`, unrounded (what the official overall
    /// averages).
    mean: f64,
    /// `round(100 * mean, 2)`: the official `evalQA` value.
    percent: f64,
    /// What the original RL-data generation records as `vqa_acc_score`.
    score: f64,
}

/// The normalised ground-truth answers of one question, prepared once so that
/// scoring a prediction is a handful of string comparisons.
///
/// Accuracy follows `VQAEval.evaluate`: for each ground-truth answer `g_i`, the
/// other answers matching the prediction are counted, `min(1, count / 3)` is
/// averaged over `i` (summed in answer order, like Python), and the mean is
/// rounded to `round(100 * mean, 2)`. "Other" answers are those whose answer
/// dict differs from `g_i`'s; with unique `answer_id`s that is simply `j != i`.
/// Every prediction that equals none of the answers scores 0, so the result
/// for each distinct answer is computed here once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GtAnswers {
    answers: Box<[Box<str>]>,
    /// For each answer, how many answer dicts (itself included) are equal to
    /// its own dict and therefore excluded from its "other answers".
    excluded: Box<[u32]>,
    outcomes: Box<[Outcome]>,
}

impl GtAnswers {
    /// Same as [`GtAnswers::from_raw`]: prepares raw ground-truth answers.
    pub fn new<S: AsRef<str>>(raw: &[S]) -> Self {
        Self::from_raw(raw)
    }

    /// Prepares raw ground-truth answers: each is normalised with the official
    /// normalisation; answers are told apart by position (`j != i`).
    pub fn from_raw<S: AsRef<str>>(raw: &[S]) -> Self {
        let mut norm = Normalizer::new();
        let answers: Vec<String> = raw
            .iter()
            .map(|s| norm.normalize(s.as_ref()).to_owned())
            .collect();
        Self::from_normalized(answers)
    }

    /// Prepares already-normalised answers, told apart by position.
    pub fn from_normalized(answers: Vec<String>) -> Self {
        let excluded = vec![1; answers.len()];
        Self::with_exclusions(answers, excluded)
    }

    /// Prepares normalised answers where `excluded[i]` answers (itself
    /// included) count as "the same answer dict" as answer `i` and are left
    /// out of its comparison set, reproducing the original's dict comparison
    /// `item != gtAnsDatum` for answer lists without unique `answer_id`s.
    ///
    /// `excluded` must have the same length as `answers`; a missing entry
    /// counts as 1.
    pub fn with_exclusions(answers: Vec<String>, excluded: Vec<u32>) -> Self {
        let n = answers.len();
        let excluded: Vec<u32> = (0..n)
            .map(|i| excluded.get(i).copied().unwrap_or(1).max(1))
            .collect();
        let mut outcomes: Vec<Outcome> = Vec::new();
        for (u_idx, u) in answers.iter().enumerate() {
            if answers[..u_idx].contains(u) {
                continue;
            }
            let total = answers.iter().filter(|g| *g == u).count() as u32;
            let mut sum = 0.0f64;
            for (g, &ex) in answers.iter().zip(&excluded) {
                let matches = if g == u {
                    total.saturating_sub(ex)
                } else {
                    total
                };
                let acc = f64::from(matches) / 3.0;
                sum += if acc < 1.0 { acc } else { 1.0 };
            }
            let mean = sum / n as f64;
            let percent = py_round(100.0 * mean, 2);
            outcomes.push(Outcome {
                answer: u.as_str().into(),
                mean,
                percent,
                score: acc_score_from_percent(percent),
            });
        }
        Self {
            answers: answers.into_iter().map(String::into_boxed_str).collect(),
            excluded: excluded.into_boxed_slice(),
            outcomes: outcomes.into_boxed_slice(),
        }
    }

    /// The normalised answers, in annotation order.
    pub fn answers(&self) -> impl ExactSizeIterator<Item = &str> {
        self.answers.iter().map(|s| &**s)
    }

    /// The exclusion counts given to [`GtAnswers::with_exclusions`].
    pub fn exclusions(&self) -> &[u32] {
        &self.excluded
    }

    /// Number of ground-truth answers.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether the question has no ground-truth answer (the original evaluator
    /// fails on such a question with a division by zero).
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    #[inline]
    fn outcome(&self, pred_normalized: &str) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find(|o| o.answer.len() == pred_normalized.len() && &*o.answer == pred_normalized)
    }

    /// The accuracy in `[0, 1]` of an already-normalised prediction, exactly
    /// as the original records it in `vqa_acc_score`: `round(100*acc, 2)`
    /// converted back by [`acc_score_from_percent`]. 0 for an empty answer list.
    #[inline]
    pub fn accuracy(&self, pred_normalized: &str) -> f64 {
        self.outcome(pred_normalized).map_or(0.0, |o| o.score)
    }

    /// The official `evalQA` value: `round(100 * acc, 2)`.
    #[inline]
    pub fn percent(&self, pred_normalized: &str) -> f64 {
        self.outcome(pred_normalized).map_or(0.0, |o| o.percent)
    }

    /// The unrounded mean `acc` (what the official overall averages).
    #[inline]
    pub fn mean_accuracy(&self, pred_normalized: &str) -> f64 {
        self.outcome(pred_normalized).map_or(0.0, |o| o.mean)
    }
}

/// Converts the official per-question percentage into the `[0, 1]` score the
/// original RL-data generation stores: `p / 100` when `p > 1`, otherwise `p`
/// unchanged (its `if accuracy > 1` test). With at least two answers a
/// non-zero accuracy is at least 1/6, so in practice this is `p / 100`.
#[inline]
pub fn acc_score_from_percent(percent: f64) -> f64 {
    if percent > 1.0 {
        percent / 100.0
    } else {
        percent
    }
}

/// `vqa_correct`: 1 when the accuracy score is positive, else 0.
#[inline]
pub fn vqa_correct(acc_score: f64) -> u8 {
    u8::from(acc_score > 0.0)
}

/// Convenience: the official accuracy of a raw prediction against raw
/// ground-truth answers (both normalised here).
pub fn vqa_accuracy(pred: &str, gt_raw: &[String]) -> f64 {
    let gt = GtAnswers::from_raw(gt_raw);
    let mut norm = Normalizer::new();
    gt.accuracy(norm.normalize(pred))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(v: &[&str]) -> GtAnswers {
        GtAnswers::from_raw(v)
    }

    #[test]
    fn accuracy_levels() {
        let ten =
            |k: usize| -> Vec<&str> { (0..10).map(|i| if i < k { "yes" } else { "no" }).collect() };
        let expect = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0];
        for (k, e) in expect.iter().enumerate() {
            assert_eq!(gt(&ten(k)).accuracy("yes"), *e, "k={k}");
        }
        assert_eq!(gt(&ten(1)).percent("yes"), 30.0);
        assert_eq!(gt(&ten(2)).percent("yes"), 60.0);
        assert_eq!(gt(&ten(3)).percent("yes"), 90.0);
        assert!((gt(&ten(2)).mean_accuracy("yes") - 0.6).abs() < 1e-15);
        assert_eq!(gt(&ten(3)).accuracy("maybe"), 0.0);
    }

    #[test]
    fn raw_answers_are_normalised() {
        let g = gt(&["Two", "2", "2.", "two ", "three", "3", "3", "4", "x", "y"]);
        assert_eq!(g.accuracy("2"), 1.0);
        assert_eq!(g.accuracy("3"), 0.9); // "three" counts too
        let four: Vec<String> = vec!["2".into(); 4];
        assert_eq!(vqa_accuracy("TWO!", &four), 1.0);
        // three answers: each sees two others -> 2/3 -> round(66.666.., 2) / 100
        assert_eq!(vqa_accuracy("2", &four[..3]), 66.67 / 100.0);
    }

    #[test]
    fn exclusions_follow_dict_equality() {
        // Two identical dicts: each excludes both copies.
        let g = GtAnswers::with_exclusions(vec!["a".into(), "a".into(), "b".into()], vec![2, 2, 1]);
        // i=0: others without both 'a' dicts -> 0 matches; same for i=1;
        // i=2: 2 matches -> 2/3.
        let expected = py_round(100.0 * ((2.0f64 / 3.0) / 3.0), 2) / 100.0;
        assert_eq!(g.accuracy("a"), expected);
        let plain = GtAnswers::from_normalized(vec!["a".into(), "a".into(), "b".into()]);
        assert_eq!(
            plain.accuracy("a"),
            py_round(100.0 * ((1.0 / 3.0 + 1.0 / 3.0 + 2.0 / 3.0) / 3.0), 2) / 100.0
        );
    }

    #[test]
    fn empty_and_correct() {
        let g = GtAnswers::from_raw::<&str>(&[]);
        assert!(g.is_empty());
        assert_eq!(g.accuracy(""), 0.0);
        assert_eq!(vqa_correct(0.0), 0);
        assert_eq!(vqa_correct(0.3), 1);
        assert_eq!(acc_score_from_percent(30.0), 0.3);
        assert_eq!(acc_score_from_percent(0.5), 0.5);
    }
}
