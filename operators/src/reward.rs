//! Rewards and group-relative advantages of the RL data.
//!
//! [`compute_reward`] reproduces `compute_reward_for_candidate` of the
//! original project (`lever_lm/utils/reward_utils.py`, latest version, which
//! adds `hard_plus_gtprob_plus_rel`), and [`advantages`] the within-group
//! z-score of its pointer-selector trainer (`std` clamped at 0.1, advantages
//! clipped to ±5).

use std::fmt;
use std::str::FromStr;

/// How a candidate's scores are combined into a reward (`reward_mode` of the
/// original). With `hard = vqa_correct` (0 when absent), `soft =
/// vqa_acc_score`, `gtprob = vqa_gt_prob`, `rel = vqa_rel_score` (each 0 when
/// absent) and weights `hw`, `sw`, `rw`:
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[cfg_attr(feature = "clap", value(rename_all = "snake_case"))]
pub enum RewardMode {
    /// `hw*hard + sw*soft` (the default).
    #[default]
    HardPlusSoft,
    /// `sw*soft + 2*hw*hard`.
    HardPlusSoftV2,
    /// `2*hw + sw*soft` when `hard == 1`, else `sw*soft`.
    Separated,
    /// `hw*hard`.
    HardOnly,
    /// `sw*soft`.
    SoftOnly,
    /// `hw*hard + sw*gtprob`.
    Hard01PlusGtprob,
    /// `2*hw + sw*gtprob` when `hard == 1`, else `sw*gtprob`.
    Hard01PlusGtprobSeparated,
    /// `hw*hard + sw*gtprob + rw*(1 - hard)*rel`: relevance only shapes the
    /// wrong answers.
    HardPlusGtprobPlusRel,
    /// `alpha*quality + beta*correctness` (see [`RewardConfig`]).
    Legacy,
}

impl RewardMode {
    /// Every mode, in the original's order.
    pub const ALL: [RewardMode; 9] = [
        RewardMode::HardPlusSoft,
        RewardMode::HardPlusSoftV2,
        RewardMode::Separated,
        RewardMode::HardOnly,
        RewardMode::SoftOnly,
        RewardMode::Hard01PlusGtprob,
        RewardMode::Hard01PlusGtprobSeparated,
        RewardMode::HardPlusGtprobPlusRel,
        RewardMode::Legacy,
    ];

    /// The original's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            RewardMode::HardPlusSoft => "hard_plus_soft",
            RewardMode::HardPlusSoftV2 => "hard_plus_soft_v2",
            RewardMode::Separated => "separated",
            RewardMode::HardOnly => "hard_only",
            RewardMode::SoftOnly => "soft_only",
            RewardMode::Hard01PlusGtprob => "hard01_plus_gtprob",
            RewardMode::Hard01PlusGtprobSeparated => "hard01_plus_gtprob_separated",
            RewardMode::HardPlusGtprobPlusRel => "hard_plus_gtprob_plus_rel",
            RewardMode::Legacy => "legacy",
        }
    }
}

impl fmt::Display for RewardMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown reward mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reward mode `{given}`; valid modes: {}", valid_modes())]
pub struct UnknownRewardMode {
    /// The name that was given.
    pub given: String,
}

fn valid_modes() -> String {
    RewardMode::ALL
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for RewardMode {
    type Err = UnknownRewardMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RewardMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownRewardMode {
                given: s.to_owned(),
            })
    }
}

/// Correctness scale of the legacy mode.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CorrectnessMode {
    /// Correctness in {0, 1} (`"01"`, the default).
    #[default]
    #[serde(rename = "01")]
    #[cfg_attr(feature = "clap", value(name = "01"))]
    ZeroOne,
    /// Correctness in {-1, +1}: `2*c - 1` (`"pm1"`; the original uses this
    /// for any value other than `"01"`).
    #[serde(rename = "pm1")]
    #[cfg_attr(feature = "clap", value(name = "pm1"))]
    PlusMinusOne,
}

impl CorrectnessMode {
    /// The original's name.
    pub fn as_str(self) -> &'static str {
        match self {
            CorrectnessMode::ZeroOne => "01",
            CorrectnessMode::PlusMinusOne => "pm1",
        }
    }
}

impl fmt::Display for CorrectnessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown correctness mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown correctness mode `{given}`; valid modes: 01, pm1")]
pub struct UnknownCorrectnessMode {
    /// The name that was given.
    pub given: String,
}

impl FromStr for CorrectnessMode {
    type Err = UnknownCorrectnessMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "01" => Ok(CorrectnessMode::ZeroOne),
            "pm1" => Ok(CorrectnessMode::PlusMinusOne),
            _ => Err(UnknownCorrectnessMode {
                given: s.to_owned(),
            }),
        }
    }
}

/// Parameters of [`compute_reward`], with the original's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardConfig {
    /// How scores are combined (default `hard_plus_soft`).
    pub mode: RewardMode,
    /// Weight of the hard correctness (default 1.0).
    pub hard_weight: f64,
    /// Weight of the soft score (`vqa_acc_score` or `vqa_gt_prob`; default 1.0).
    pub soft_weight: f64,
    /// Weight of the relevance in `hard_plus_gtprob_plus_rel` (default 0.1,
    /// the original's default).
    pub rel_weight: f64,
    /// Legacy: weight of the quality term (default 0.0).
    pub alpha: f64,
    /// Legacy: weight of the correctness term (default 0.0).
    pub beta: f64,
    /// Legacy: correctness scale (default `"01"`).
    pub correctness_mode: CorrectnessMode,
    /// Legacy: quality is `-logprob_score` when set and available, else
    /// `beam_score` (default false).
    pub use_logprob: bool,
    /// The reward is clipped to `[clip.0, clip.1]` (default (-5, 5)).
    pub clip: (f64, f64),
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            mode: RewardMode::HardPlusSoft,
            hard_weight: 1.0,
            soft_weight: 1.0,
            rel_weight: 0.1,
            alpha: 0.0,
            beta: 0.0,
            correctness_mode: CorrectnessMode::ZeroOne,
            use_logprob: false,
            clip: (-5.0, 5.0),
        }
    }
}

/// A candidate's scores, as recorded in the RL data (each may be absent).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardInputs {
    /// Beam-search score of the pointer sequence.
    pub beam_score: Option<f64>,
    /// Log-probability of the pointer sequence.
    pub logprob_score: Option<f64>,
    /// 1 when the VQA answer scored above 0.
    pub vqa_correct: Option<u8>,
    /// Official VQA accuracy in `[0, 1]`.
    pub vqa_acc_score: Option<f64>,
    /// Expected accuracy probability of the GT answers.
    pub vqa_gt_prob: Option<f64>,
    /// Relevance of the answer to the GT answers.
    pub vqa_rel_score: Option<f64>,
}

/// `max(lo, min(hi, x))` with Python's `min`/`max` semantics (the first
/// argument wins unless the second compares strictly better, so NaN becomes
/// `hi`).
fn py_clip(x: f64, (lo, hi): (f64, f64)) -> f64 {
    let m = if x < hi { x } else { hi };
    if m > lo {
        m
    } else {
        lo
    }
}

/// The reward of one candidate (`compute_reward_for_candidate`), clipped to
/// `cfg.clip`.
pub fn compute_reward(cfg: &RewardConfig, x: &RewardInputs) -> f64 {
    let hard = x.vqa_correct.map_or(0.0, f64::from);
    let soft = x.vqa_acc_score.unwrap_or(0.0);
    let gtprob = x.vqa_gt_prob.unwrap_or(0.0);
    let rel = x.vqa_rel_score.unwrap_or(0.0);
    let (hw, sw, rw) = (cfg.hard_weight, cfg.soft_weight, cfg.rel_weight);
    let reward = match cfg.mode {
        RewardMode::HardPlusSoft => hw * hard + sw * soft,
        RewardMode::HardPlusSoftV2 => sw * soft + 2.0 * hw * hard,
        RewardMode::HardOnly => hw * hard,
        RewardMode::SoftOnly => sw * soft,
        RewardMode::Separated => {
            if hard == 1.0 {
                2.0 * hw + sw * soft
            } else {
                sw * soft
            }
        }
        RewardMode::Hard01PlusGtprob => hw * hard + sw * gtprob,
        RewardMode::Hard01PlusGtprobSeparated => {
            if hard == 1.0 {
                2.0 * hw + sw * gtprob
            } else {
                sw * gtprob
            }
        }
        RewardMode::HardPlusGtprobPlusRel => hw * hard + sw * gtprob + rw * (1.0 - hard) * rel,
        RewardMode::Legacy => {
            let c = match (x.vqa_correct, x.vqa_acc_score) {
                (Some(c), _) => Some(f64::from(c)),
                (None, Some(a)) => Some(a),
                (None, None) => None,
            };
            let correctness = match (cfg.correctness_mode, c) {
                (_, None) => 0.0,
                (CorrectnessMode::ZeroOne, Some(c)) => c,
                (CorrectnessMode::PlusMinusOne, Some(c)) => 2.0 * c - 1.0,
            };
            let quality = match (cfg.use_logprob, x.logprob_score, x.beam_score) {
                (true, Some(lp), _) => -lp,
                (_, _, Some(b)) => b,
                _ => 0.0,
            };
            cfg.alpha * quality + cfg.beta * correctness
        }
    };
    py_clip(reward, cfg.clip)
}

/// Lower bound of the group standard deviation in [`advantages`].
pub const ADVANTAGE_MIN_STD: f64 = 0.1;
/// Advantages are clipped to `[-ADVANTAGE_CLIP, ADVANTAGE_CLIP]`.
pub const ADVANTAGE_CLIP: f64 = 5.0;

/// Group-relative advantages of one query's candidates: `(r - mean) / std`
/// with the unbiased standard deviation (n − 1, like `torch.std`) floored at
/// [`ADVANTAGE_MIN_STD`], clipped to ±[`ADVANTAGE_CLIP`].
///
/// Computed in f64 with left-to-right sums. For a single candidate torch's
/// std is NaN (and so is the advantage); here the std is then taken as the
/// floor, so a lone candidate gets advantage 0. An empty group gives an empty
/// vector; all-equal rewards give zeros.
pub fn advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len();
    if n == 0 {
        return Vec::new();
    }
    let mean = rewards.iter().fold(0.0, |s, r| s + r) / n as f64;
    let std = if n > 1 {
        let ss = rewards.iter().fold(0.0, |s, r| s + (r - mean) * (r - mean));
        (ss / (n - 1) as f64).sqrt()
    } else {
        f64::NAN
    };
    let std = if std >= ADVANTAGE_MIN_STD {
        std
    } else {
        ADVANTAGE_MIN_STD
    };
    rewards
        .iter()
        .map(|r| ((r - mean) / std).clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: RewardMode) -> RewardConfig {
        RewardConfig {
            mode,
            ..RewardConfig::default()
        }
    }

    fn inputs(
        correct: Option<u8>,
        acc: Option<f64>,
        gtprob: Option<f64>,
        rel: Option<f64>,
    ) -> RewardInputs {
        RewardInputs {
            vqa_correct: correct,
            vqa_acc_score: acc,
            vqa_gt_prob: gtprob,
            vqa_rel_score: rel,
            ..RewardInputs::default()
        }
    }

    #[test]
    fn names_round_trip() {
        for m in RewardMode::ALL {
            assert_eq!(m.as_str().parse::<RewardMode>().unwrap(), m);
            assert_eq!(m.to_string(), m.as_str());
        }
        assert_eq!(RewardMode::default(), RewardMode::HardPlusSoft);
        assert_eq!(
            "hard01_plus_gtprob_separated"
                .parse::<RewardMode>()
                .unwrap(),
            RewardMode::Hard01PlusGtprobSeparated
        );
        let err = "hybrid".parse::<RewardMode>().unwrap_err().to_string();
        assert!(err.contains("`hybrid`"), "{err}");
        for m in RewardMode::ALL {
            assert!(err.contains(m.as_str()), "{err}");
        }
        assert_eq!(
            "pm1".parse::<CorrectnessMode>().unwrap(),
            CorrectnessMode::PlusMinusOne
        );
        assert!("x"
            .parse::<CorrectnessMode>()
            .unwrap_err()
            .to_string()
            .contains("01, pm1"));
    }

    #[test]
    fn defaults() {
        let c = RewardConfig::default();
        assert_eq!(
            (c.hard_weight, c.soft_weight, c.rel_weight, c.alpha, c.beta),
            (1.0, 1.0, 0.1, 0.0, 0.0)
        );
        assert_eq!(c.clip, (-5.0, 5.0));
        assert_eq!(c.correctness_mode, CorrectnessMode::ZeroOne);
        assert!(!c.use_logprob);
    }

    #[test]
    fn every_mode_hand_computed() {
        let pos = inputs(Some(1), Some(0.6), Some(0.25), Some(0.8));
        let neg = inputs(Some(0), Some(0.3), Some(0.5), Some(0.8));
        let none = RewardInputs::default();
        let w = |mode| RewardConfig {
            mode,
            hard_weight: 2.0,
            soft_weight: 0.5,
            rel_weight: 0.25,
            ..RewardConfig::default()
        };
        use RewardMode::*;
        let table: [(RewardMode, f64, f64); 8] = [
            (HardPlusSoft, 2.0 + 0.3, 0.15),
            (HardPlusSoftV2, 0.3 + 4.0, 0.15),
            (Separated, 4.0 + 0.3, 0.15),
            (HardOnly, 2.0, 0.0),
            (SoftOnly, 0.3, 0.15),
            (Hard01PlusGtprob, 2.0 + 0.125, 0.25),
            (Hard01PlusGtprobSeparated, 4.0 + 0.125, 0.25),
            (HardPlusGtprobPlusRel, 2.0 + 0.125, 0.25 + 0.25 * 0.8),
        ];
        for (mode, p, n) in table {
            assert_eq!(compute_reward(&w(mode), &pos), p, "{mode} positive");
            assert_eq!(compute_reward(&w(mode), &neg), n, "{mode} negative");
            assert_eq!(compute_reward(&w(mode), &none), 0.0, "{mode} empty");
        }
        // default weights
        assert_eq!(compute_reward(&cfg(HardPlusSoft), &pos), 1.6);
        assert_eq!(compute_reward(&cfg(Separated), &pos), 2.6);
        assert_eq!(
            compute_reward(&cfg(HardPlusGtprobPlusRel), &neg),
            0.5 + 0.1 * 0.8
        );
        // separated only treats hard == 1 as positive
        let two = inputs(Some(2), Some(0.5), Some(0.5), None);
        assert_eq!(compute_reward(&cfg(Separated), &two), 0.5);
        assert_eq!(compute_reward(&cfg(Hard01PlusGtprobSeparated), &two), 0.5);
        assert_eq!(compute_reward(&cfg(HardPlusSoft), &two), 2.5);
    }

    #[test]
    fn legacy_mode() {
        let base = RewardConfig {
            mode: RewardMode::Legacy,
            alpha: 0.5,
            beta: 2.0,
            ..RewardConfig::default()
        };
        let x = RewardInputs {
            beam_score: Some(1.5),
            logprob_score: Some(-3.0),
            vqa_correct: Some(1),
            vqa_acc_score: Some(0.3),
            ..RewardInputs::default()
        };
        // quality = beam_score, correctness = vqa_correct
        assert_eq!(compute_reward(&base, &x), 0.75 + 2.0);
        // use_logprob: quality = -logprob
        let lp = RewardConfig {
            use_logprob: true,
            ..base
        };
        assert_eq!(compute_reward(&lp, &x), 1.5 + 2.0);
        // use_logprob without logprob falls back to beam_score
        let no_lp = RewardInputs {
            logprob_score: None,
            ..x
        };
        assert_eq!(compute_reward(&lp, &no_lp), 0.75 + 2.0);
        // correctness from vqa_acc_score when vqa_correct is absent
        let acc_only = RewardInputs {
            vqa_correct: None,
            ..x
        };
        assert_eq!(compute_reward(&base, &acc_only), 0.75 + 0.6);
        // pm1
        let pm1 = RewardConfig {
            correctness_mode: CorrectnessMode::PlusMinusOne,
            ..base
        };
        assert_eq!(compute_reward(&pm1, &x), 0.75 + 2.0);
        let wrong = RewardInputs {
            vqa_correct: Some(0),
            ..x
        };
        assert_eq!(compute_reward(&pm1, &wrong), 0.75 - 2.0);
        assert_eq!(
            compute_reward(&pm1, &acc_only),
            0.75 + 2.0 * (2.0 * 0.3 - 1.0)
        );
        // nothing available
        assert_eq!(compute_reward(&pm1, &RewardInputs::default()), 0.0);
        // defaults alpha = beta = 0
        assert_eq!(compute_reward(&cfg(RewardMode::Legacy), &x), 0.0);
    }

    #[test]
    fn clipping() {
        let big = RewardConfig {
            hard_weight: 10.0,
            ..cfg(RewardMode::HardOnly)
        };
        let x = inputs(Some(1), None, None, None);
        assert_eq!(compute_reward(&big, &x), 5.0);
        let neg = RewardConfig {
            mode: RewardMode::Legacy,
            alpha: 1.0,
            ..RewardConfig::default()
        };
        let low = RewardInputs {
            beam_score: Some(-42.0),
            ..RewardInputs::default()
        };
        assert_eq!(compute_reward(&neg, &low), -5.0);
        let tight = RewardConfig {
            clip: (0.2, 0.4),
            ..cfg(RewardMode::SoftOnly)
        };
        assert_eq!(
            compute_reward(&tight, &inputs(None, Some(0.3), None, None)),
            0.3
        );
        assert_eq!(
            compute_reward(&tight, &inputs(None, Some(0.0), None, None)),
            0.2
        );
        // NaN: Python's max(lo, min(hi, nan)) is hi
        assert_eq!(
            compute_reward(&tight, &inputs(None, Some(f64::NAN), None, None)),
            0.4
        );
    }

    #[test]
    fn advantages_cases() {
        assert!(advantages(&[]).is_empty());
        assert_eq!(advantages(&[3.0]), vec![0.0]);
        assert_eq!(advantages(&[1.0, 1.0, 1.0]), vec![0.0, 0.0, 0.0]);
        // [0, 1, 2]: mean 1, unbiased std 1
        assert_eq!(advantages(&[0.0, 1.0, 2.0]), vec![-1.0, 0.0, 1.0]);
        // [0, 2]: mean 1, std sqrt(2)
        let a = advantages(&[0.0, 2.0]);
        assert_eq!(a, vec![-1.0 / 2f64.sqrt(), 1.0 / 2f64.sqrt()]);
        // small spread: std floored at 0.1
        let a = advantages(&[0.0, 0.01]);
        assert!(
            (a[0] + 0.05).abs() < 1e-15 && (a[1] - 0.05).abs() < 1e-15,
            "{a:?}"
        );
        // clipping to ±5: one outlier among many equal values
        let mut r = vec![0.0; 40];
        r[0] = 1.0;
        let a = advantages(&r);
        // mean 1/40, std = sqrt((39/1600 + (39/40)^2)/39) ~ 0.158 -> (1-1/40)/0.158 ~ 6.17
        assert_eq!(a[0], 5.0);
        assert!(a[1] < 0.0 && a[1] > -1.0);
    }
}
