//! The `vqa` stage: the contract every VQA backend implements, the prompts it
//! answers, and the backends that need no neural network (`replay`).
//!
//! A backend receives a batch of [`VqaPrompt`]s (system prompt, k in-context
//! examples of image + `Question:<q> Short answer:<a>`, then the query image +
//! `Question:<q> Short answer:`) and returns one [`VqaAnswer`] per prompt: the
//! raw generation and, when asked, the teacher-forced probability of the
//! ground-truth answers. The answer the pipeline scores is
//! [`crate::accuracy::postprocess_generation`] of the raw generation, as in the
//! original.

use std::collections::HashMap;

/// Default system prompt of the original `qwen2.5_vl_3B` inference config.
pub use crate::qwen2_5_vl::processor::DEFAULT_SYSTEM_PROMPT;
use std::path::PathBuf;

/// Errors of a VQA backend.
#[derive(Debug, thiserror::Error)]
pub enum VqaError {
    /// The replay source has no answer for this prompt.
    #[error("{source_file}: no recorded answer for query {query_index} with examples {examples:?} (the replay file must come from a run with the same candidates)")]
    MissingReplay {
        /// Replay file.
        source_file: PathBuf,
        /// Query dataset index.
        query_index: u64,
        /// Dataset indices of the in-context examples.
        examples: Vec<u64>,
    },
    /// Reading a replay file failed.
    #[error("{path}: {message}")]
    Replay {
        /// File.
        path: PathBuf,
        /// What went wrong and where.
        message: String,
    },
    /// The model failed on a prompt.
    #[error("VQA model failed on query {query_index}: {message}")]
    Model {
        /// Query dataset index.
        query_index: u64,
        /// What went wrong.
        message: String,
    },
}

/// One in-context example of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    /// Dataset index of the example.
    pub dataset_index: u64,
    /// Image file.
    pub image: PathBuf,
    /// Question text.
    pub question: String,
    /// In-context answer (`multiple_choice_answer`).
    pub answer: String,
}

/// A prompt to answer: examples then the query.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaPrompt {
    /// Dataset index of the query.
    pub query_index: u64,
    /// System prompt.
    pub system_prompt: String,
    /// In-context examples, in pointer order.
    pub examples: Vec<PromptExample>,
    /// Query image file.
    pub query_image: PathBuf,
    /// Query question.
    pub query_question: String,
    /// Distinct normalised ground-truth answers with their weights
    /// (min(count/3, 1)), for the answer probability; empty when not asked.
    pub gt_answers: Vec<(String, f64)>,
}

impl VqaPrompt {
    /// Dataset indices of the examples, in order: with the query index, the
    /// key of this prompt within a run.
    pub fn example_indices(&self) -> Vec<u64> {
        self.examples.iter().map(|e| e.dataset_index).collect()
    }
}

/// A backend's answer to one prompt.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct VqaAnswer {
    /// The decoded generation (special tokens skipped).
    pub raw_generation: String,
    /// Weighted probability of the ground-truth answers, when asked.
    pub gt_prob: Option<f64>,
    /// The rendered prompt text, when the backend has one.
    pub prompt_text: Option<String>,
}

/// The contract between the `vqa` stage and a model.
///
/// One instance lives on each timely worker (so implementations may keep
/// caches without locks); weights should be shared between instances.
pub trait VqaModel {
    /// A stable description of the model and its generation settings
    /// (recorded in `_meta`, and part of result cache keys).
    fn identity(&self) -> serde_json::Value;

    /// Answers a batch of prompts, one answer per prompt in order. The answer
    /// to a prompt must not depend on what it was batched with.
    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError>;

    /// Counters for the run summary (prompts, tokens, image cache use, ...).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Answers recorded by an earlier run, keyed by query and example indices.
#[derive(Debug, Default, Clone)]
pub struct ReplayIndex {
    /// File the answers came from.
    pub source_file: PathBuf,
    answers: HashMap<(u64, Vec<u64>), VqaAnswer>,
}

impl ReplayIndex {
    /// An empty index for answers read from `source_file`.
    pub fn new(source_file: PathBuf) -> Self {
        Self {
            source_file,
            answers: HashMap::new(),
        }
    }

    /// Records the answer for (query, examples); the first one recorded wins.
    pub fn insert(&mut self, query_index: u64, examples: Vec<u64>, answer: VqaAnswer) {
        self.answers
            .entry((query_index, examples))
            .or_insert(answer);
    }

    /// Number of recorded answers.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// The recorded answer for a prompt.
    pub fn get(&self, query_index: u64, examples: &[u64]) -> Option<&VqaAnswer> {
        self.answers.get(&(query_index, examples.to_vec()))
    }
}

/// The `replay` backend: answers prompts with the raw generations recorded
/// in an earlier leverflow output, to re-score or re-reward without a model.
#[derive(Debug, Clone)]
pub struct ReplayModel {
    index: std::sync::Arc<ReplayIndex>,
}

impl ReplayModel {
    /// A backend answering from `index`.
    pub fn new(index: std::sync::Arc<ReplayIndex>) -> Self {
        Self { index }
    }
}

impl VqaModel for ReplayModel {
    fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": "replay",
            "replay_from": self.index.source_file.display().to_string(),
        })
    }

    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError> {
        prompts
            .iter()
            .map(|p| {
                let examples = p.example_indices();
                self.index
                    .get(p.query_index, &examples)
                    .cloned()
                    .ok_or_else(|| VqaError::MissingReplay {
                        source_file: self.index.source_file.clone(),
                        query_index: p.query_index,
                        examples,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(q: u64, ex: &[u64]) -> VqaPrompt {
        VqaPrompt {
            query_index: q,
            system_prompt: String::new(),
            examples: ex
                .iter()
                .map(|&i| PromptExample {
                    dataset_index: i,
                    image: PathBuf::from(format!("{i}.png")),
                    question: "q".into(),
                    answer: "a".into(),
                })
                .collect(),
            query_image: PathBuf::from("q.png"),
            query_question: "q".into(),
            gt_answers: Vec::new(),
        }
    }

    #[test]
    fn replay_answers_by_query_and_ordered_examples() {
        let mut index = ReplayIndex::new(PathBuf::from("old.json"));
        let ans = |s: &str| VqaAnswer {
            raw_generation: s.into(),
            ..Default::default()
        };
        index.insert(3, vec![1, 2], ans("red"));
        index.insert(3, vec![2, 1], ans("blue"));
        let mut model = ReplayModel::new(std::sync::Arc::new(index));
        let out = model
            .answer(&[prompt(3, &[2, 1]), prompt(3, &[1, 2])])
            .unwrap();
        assert_eq!(out[0].raw_generation, "blue");
        assert_eq!(out[1].raw_generation, "red");
        let err = model.answer(&[prompt(4, &[1, 2])]).unwrap_err().to_string();
        assert!(err.contains("old.json") && err.contains("query 4"), "{err}");
    }
}
