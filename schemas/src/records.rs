//! The RL record types: one [`RlRecord`] per query, serialised as the value
//! under `"<query_idx>"` in the output JSON (the original project's format).
//!
//! Field order in serialisation is declaration order (serde derives), so the
//! same inputs always give byte-identical outputs.  `Option` fields are
//! skipped when `None`: the original reader tells the pointer layouts apart by
//! which keys *exist*, so an explicit `null` would change the meaning.

use serde::{Deserialize, Deserializer, Serialize};

use crate::SchemaError;

/// The query a record is about: identity, question and ground-truth answers.
///
/// Every field but `query_id` comes from the training split's files; a
/// `leverflow candidates` run without them (a policy inspected from its
/// checkpoint and embeddings alone) writes `query_id` only, and those
/// fields are omitted (never `null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// Dataset index of the query (row of the query embeddings); equal to the
    /// record's `"<query_idx>"` key.
    pub query_id: u64,
    /// The VQA question id (the official annotations' `question_id`).
    #[serde(
        default,
        deserialize_with = "opt_u64_or_numeric_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub question_id: Option<u64>,
    /// The COCO image id of the query image.
    #[serde(
        default,
        deserialize_with = "opt_u64_or_numeric_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub image_id: Option<u64>,
    /// The question text, as in the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// Ground-truth answers as annotated (usually 10), in annotation order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt_answers_raw: Option<Vec<String>>,
    /// `gt_answers_raw` after the VQA answer post-processing / normalisation,
    /// same order and length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt_answers_norm: Option<Vec<String>>,
}

impl QueryRecord {
    /// A query known by its index only (no training split).
    pub fn index_only(query_id: u64) -> Self {
        Self {
            query_id,
            question_id: None,
            image_id: None,
            question: None,
            gt_answers_raw: None,
            gt_answers_norm: None,
        }
    }

    /// Whether the record carries the dataset's fields (question, answers).
    pub fn has_dataset_fields(&self) -> bool {
        self.question_id.is_some()
    }
}

/// One candidate demonstration sequence for a query, with how it was made and
/// (optionally) how the VQA model did with it.
///
/// Pointer fields depend on the [`PointerLayout`]; fill them with
/// [`CandidateRecord::new`] / [`CandidateRecord::set_pointers`] rather than by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// Shared pool: dataset indices of the demonstrations, in prompt order.
    /// Per-query pool: positions of the demonstrations in the query's pool
    /// (`candidate_pool_ids`).
    pub pointer: Vec<u64>,
    /// Shared pool only, and only when pool positions equal dataset indices:
    /// the positions (the original reader takes this field, when present, as
    /// dataset indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer_pos: Option<Vec<u64>>,
    /// Per-query pool only: dataset indices of the demonstrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer_global: Option<Vec<u64>>,
    /// How the sequence was produced: `beam`, `retrieval`, `sample`, `random`
    /// or `source_beam`.
    pub gen_method: String,
    /// 0-based rank among the beams (beam candidates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beam_rank: Option<u32>,
    /// Beam score (beam candidates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beam_score: Option<f64>,
    /// Log-probability of the sequence under the pointer selector (temperature 1).
    #[serde(deserialize_with = "f64_or_null")]
    pub logprob_score: f64,
    /// Sampling temperature (sampled candidates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Log-probability under the tempered distribution it was sampled from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_logprob_tempered: Option<f64>,
    /// The VQA model's generation before post-processing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_raw_generation: Option<String>,
    /// The post-processed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_pred_answer: Option<String>,
    /// 1 if the VQA accuracy is > 0, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_correct: Option<u8>,
    /// Official VQA accuracy of the answer, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_acc_score: Option<f64>,
    /// Expected VQA accuracy under the model's answer distribution (teacher forcing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_gt_prob: Option<f64>,
    /// Best token-level F1 between the answer and the normalised GT answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_rel_token_f1: Option<f64>,
    /// Best character edit similarity between the answer and the normalised GT answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_rel_edit_sim: Option<f64>,
    /// Combined relevance score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_rel_score: Option<f64>,
    /// How accuracy was computed: `vqaEval`, `fallback` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vqa_eval_mode: Option<String>,
    /// Annotation split used for the accuracy (`train`, `val`, `fallback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_split_used: Option<String>,
    /// True when evaluating this candidate failed (readers skip it): with
    /// `on_vqa_error = record`, the VQA backend failed on its prompt (e.g.
    /// an inference server that stayed unreachable through the retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_failed: Option<bool>,
    /// Scalar reward of the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Group-normalised advantage of the candidate within its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantage: Option<f64>,
    /// The full VQA prompt text (only with `--save_prompts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
}

/// Everything written for one query: the value under `"<query_idx>"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlRecord {
    /// The query.
    pub query: QueryRecord,
    /// Per-query pool only: dataset indices of the query's candidate pool, in
    /// pool order (`pointer` values are positions in this list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_pool_ids: Option<Vec<u64>>,
    /// The candidates, in generation order.
    pub pointer_candidates: Vec<CandidateRecord>,
}

/// How candidate pools relate to dataset indices, which decides the pointer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PointerLayout {
    /// One pool for every query: the whole candidate matrix.  `pointer` holds
    /// dataset indices; `pointer_pos` holds positions, written only when
    /// `positions_are_indices` (no `--candidate_indices`), because the original
    /// reader takes `pointer_pos` for dataset indices.
    SharedPool {
        /// True when position p in the pool is dataset index p.
        positions_are_indices: bool,
    },
    /// One pool per query (`--sampler_cache`): `pointer` holds positions in
    /// the pool, `pointer_global` the dataset indices, and the query record
    /// carries `candidate_pool_ids`.
    PerQueryPool,
}

impl PointerLayout {
    /// The layout's name in `_meta.pointer_layout` (spelled as Rust writes
    /// the value, which is what earlier outputs hold).
    pub fn name(self) -> &'static str {
        match self {
            PointerLayout::SharedPool {
                positions_are_indices: true,
            } => "SharedPool { positions_are_indices: true }",
            PointerLayout::SharedPool {
                positions_are_indices: false,
            } => "SharedPool { positions_are_indices: false }",
            PointerLayout::PerQueryPool => "PerQueryPool",
        }
    }
}

/// The three pointer fields of a [`CandidateRecord`], filled for a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerFields {
    /// Value of `pointer`.
    pub pointer: Vec<u64>,
    /// Value of `pointer_pos` (`None` = key absent).
    pub pointer_pos: Option<Vec<u64>>,
    /// Value of `pointer_global` (`None` = key absent).
    pub pointer_global: Option<Vec<u64>>,
}

impl PointerFields {
    /// Fills the pointer fields from the demonstrations' pool `positions` and
    /// `dataset_indices` (same length, prompt order) for `layout`.
    ///
    /// Errors when the lengths differ, or when the layout says positions are
    /// dataset indices and they are not.
    pub fn new(
        positions: &[u64],
        dataset_indices: &[u64],
        layout: PointerLayout,
    ) -> Result<Self, SchemaError> {
        if positions.len() != dataset_indices.len() {
            return Err(SchemaError::PointerLength {
                positions: positions.len(),
                dataset_indices: dataset_indices.len(),
            });
        }
        Ok(match layout {
            PointerLayout::SharedPool {
                positions_are_indices: true,
            } => {
                if positions != dataset_indices {
                    return Err(SchemaError::PositionsNotIndices {
                        positions: positions.to_vec(),
                        dataset_indices: dataset_indices.to_vec(),
                    });
                }
                PointerFields {
                    pointer: dataset_indices.to_vec(),
                    pointer_pos: Some(positions.to_vec()),
                    pointer_global: None,
                }
            }
            PointerLayout::SharedPool {
                positions_are_indices: false,
            } => PointerFields {
                pointer: dataset_indices.to_vec(),
                pointer_pos: None,
                pointer_global: None,
            },
            PointerLayout::PerQueryPool => PointerFields {
                pointer: positions.to_vec(),
                pointer_pos: None,
                pointer_global: Some(dataset_indices.to_vec()),
            },
        })
    }
}

impl CandidateRecord {
    /// A candidate with its pointer fields filled for `layout` (see
    /// [`PointerFields::new`]) and every optional field `None`.
    pub fn new(
        positions: &[u64],
        dataset_indices: &[u64],
        layout: PointerLayout,
        gen_method: impl Into<String>,
        logprob_score: f64,
    ) -> Result<Self, SchemaError> {
        let p = PointerFields::new(positions, dataset_indices, layout)?;
        Ok(CandidateRecord {
            pointer: p.pointer,
            pointer_pos: p.pointer_pos,
            pointer_global: p.pointer_global,
            gen_method: gen_method.into(),
            beam_rank: None,
            beam_score: None,
            logprob_score,
            temperature: None,
            sample_logprob_tempered: None,
            vqa_raw_generation: None,
            vqa_pred_answer: None,
            vqa_correct: None,
            vqa_acc_score: None,
            vqa_gt_prob: None,
            vqa_rel_token_f1: None,
            vqa_rel_edit_sim: None,
            vqa_rel_score: None,
            vqa_eval_mode: None,
            eval_split_used: None,
            eval_failed: None,
            reward: None,
            advantage: None,
            prompt_text: None,
        })
    }

    /// Replaces the pointer fields with those for `layout` (see [`PointerFields::new`]).
    pub fn set_pointers(
        &mut self,
        positions: &[u64],
        dataset_indices: &[u64],
        layout: PointerLayout,
    ) -> Result<(), SchemaError> {
        let p = PointerFields::new(positions, dataset_indices, layout)?;
        self.pointer = p.pointer;
        self.pointer_pos = p.pointer_pos;
        self.pointer_global = p.pointer_global;
        Ok(())
    }

    /// Dataset indices of the demonstrations: `pointer_global` when present
    /// (per-query pool), else `pointer` (shared pool).
    pub fn dataset_indices(&self) -> &[u64] {
        match &self.pointer_global {
            Some(g) => g,
            None => &self.pointer,
        }
    }

    /// Pool positions of the demonstrations when the record itself holds them:
    /// `pointer` for a per-query pool, `pointer_pos` for a shared pool whose
    /// positions are dataset indices; `None` for a shared pool written without
    /// `pointer_pos` (positions then need the pool's index list).
    pub fn positions(&self) -> Option<&[u64]> {
        if self.pointer_global.is_some() {
            Some(&self.pointer)
        } else {
            self.pointer_pos.as_deref()
        }
    }

    /// True when any VQA / reward field is set.
    pub fn has_vqa_fields(&self) -> bool {
        self.vqa_raw_generation.is_some()
            || self.vqa_pred_answer.is_some()
            || self.vqa_correct.is_some()
            || self.vqa_acc_score.is_some()
            || self.vqa_gt_prob.is_some()
            || self.vqa_rel_token_f1.is_some()
            || self.vqa_rel_edit_sim.is_some()
            || self.vqa_rel_score.is_some()
            || self.vqa_eval_mode.is_some()
            || self.eval_split_used.is_some()
            || self.eval_failed.is_some()
            || self.reward.is_some()
            || self.advantage.is_some()
    }
}

/// serde_json writes non-finite floats as `null`; read them back as NaN so a
/// required float field never fails to load.
fn f64_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Accepts an unsigned integer or a string of decimal digits (files written
/// by the original project may store ids as strings).
fn opt_u64_or_numeric_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64_or_numeric_string(d).map(Some)
}

fn u64_or_numeric_string<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Num(u64),
        Str(String),
    }
    match Id::deserialize(d)? {
        Id::Num(n) => Ok(n),
        Id::Str(s) => s.trim().parse::<u64>().map_err(|_| {
            serde::de::Error::custom(format!("expected an unsigned integer id, got string {s:?}"))
        }),
    }
}
