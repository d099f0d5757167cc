//! The VQA contract: what the pipeline asks of a vision-language model and
//! what it gets back, independent of any model, stage or store.
//!
//! A backend receives a batch of [`VqaPrompt`]s (system prompt, k in-context
//! examples of image + `Question:<q> Short answer:<a>`, then the query image +
//! `Question:<q> Short answer:`) and returns one [`VqaAnswer`] per prompt: the
//! raw generation and, when asked, the teacher-forced probability of the
//! ground-truth answers. [`VqaPrompt::messages`] builds the chat messages the
//! original project sends, so every model renders the same conversation.

use std::path::{Path, PathBuf};

/// Default system prompt of the original `qwen2.5_vl_3B` inference config.
pub const DEFAULT_SYSTEM_PROMPT: &str = "In the upcoming task, you will see four sets of dialogues, each containing two roles: user and assistant. The user is the questioner, who provides an image and asks a question based on it; the assistant is the responder, who answers according to the image and question provided by the user. Afterward, you will receive an image and a question from the user. Please act as the assistant and answer based on the four previous dialogue sets and your own knowledge. Strictly follow the answering format: if the examples use only one or two keywords, your reply must also use only one or two keywords; if the examples contain no more than three tokens, your reply must not exceed three tokens either.";

/// A boxed error of a backend, kept whole so callers can inspect it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a VQA backend.
#[derive(Debug, thiserror::Error)]
pub enum VqaError {
    /// The model failed on a prompt.
    #[error("VQA model failed on query {query_index}: {message}")]
    Model {
        /// Query dataset index.
        query_index: u64,
        /// What went wrong.
        message: String,
    },
    /// The backend failed (its own typed error).
    #[error(transparent)]
    Backend(BoxError),
}

impl VqaError {
    /// Wraps a backend's own error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        VqaError::Backend(Box::new(e))
    }
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

    /// The prompt's images in conversation order: the examples', then the
    /// query's. [`ChatContent::Image`] indexes this list.
    pub fn images(&self) -> Vec<&Path> {
        self.examples
            .iter()
            .map(|e| e.image.as_path())
            .chain(std::iter::once(self.query_image.as_path()))
            .collect()
    }

    /// The chat messages of this prompt ([`chat_messages`]).
    pub fn messages(&self) -> Vec<ChatMessage> {
        chat_messages(
            &self.system_prompt,
            self.examples
                .iter()
                .map(|e| (e.question.as_str(), e.answer.as_str())),
            &self.query_question,
        )
    }
}

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The system prompt.
    System,
    /// The user's turn (images and questions).
    User,
}

impl Role {
    /// The role's name in chat APIs and templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
        }
    }
}

/// One item of a message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatContent {
    /// The `i`-th image of the prompt (see [`VqaPrompt::images`]).
    Image(usize),
    /// Text.
    Text(String),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who says it.
    pub role: Role,
    /// What is said, in order.
    pub content: Vec<ChatContent>,
}

/// The chat messages of a VQA prompt, exactly as the original project builds
/// them: a system message, then one user message alternating images and
/// `Question:<q> Short answer:<a>` texts, ending with the query's image and
/// `Question:<q> Short answer:`. Images are numbered in that order.
pub fn chat_messages<'a>(
    system_prompt: &str,
    examples: impl IntoIterator<Item = (&'a str, &'a str)>,
    query_question: &str,
) -> Vec<ChatMessage> {
    let mut content = Vec::new();
    let mut image = 0;
    for (question, answer) in examples {
        content.push(ChatContent::Image(image));
        image += 1;
        content.push(ChatContent::Text(format!(
            "Question:{question} Short answer:{answer}"
        )));
    }
    content.push(ChatContent::Image(image));
    content.push(ChatContent::Text(format!(
        "Question:{query_question} Short answer:"
    )));
    vec![
        ChatMessage {
            role: Role::System,
            content: vec![ChatContent::Text(system_prompt.to_string())],
        },
        ChatMessage {
            role: Role::User,
            content,
        },
    ]
}

/// How `vqa_gt_prob` scores a ground-truth answer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum GtProbMode {
    /// The geometric mean of the answer tokens' probabilities after the
    /// prompt (teacher forcing, reusing the prompt's prefill): the
    /// probability of the answer only.
    #[default]
    Answer,
    /// As the original project computes it: the prompt is rebuilt with the
    /// answer inside the user turn and run whole, and `exp(-mean CE)` is
    /// taken from position `mask_length - 1` on, where `mask_length` is the
    /// token count of a plain-text rendering of the prompt (no chat
    /// template, no image expansion). That count is far below the prompt's
    /// real length, so the scored span also covers most of the system
    /// prompt, the images and the examples, not just the answer.
    Original,
}

impl GtProbMode {
    /// Whether this is the default (`answer`): such a run records no
    /// `gt_prob_mode` in `_meta.args`, as before the setting existed.
    pub fn is_answer(&self) -> bool {
        *self == GtProbMode::Answer
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

    /// The asynchronous side of a model that answers elsewhere (a server):
    /// `None` (the default) for a model that computes on the caller's
    /// thread through [`VqaModel::answer`].
    fn remote(&mut self) -> Option<&mut dyn RemoteVqa> {
        None
    }
}

/// One prompt's answer or why it failed.
pub type PromptResult = Result<VqaAnswer, VqaError>;

/// Receives the answers of a submitted batch (from any thread).
pub type Delivery = Box<dyn FnOnce(Vec<PromptResult>) + Send>;

/// Requests of a remote model now in flight and answers received, shared
/// with the progress display.
#[derive(Debug, Default)]
pub struct RemoteGauge {
    /// Requests sent and not yet answered.
    pub in_flight: std::sync::atomic::AtomicU64,
    /// Answers received.
    pub answered: std::sync::atomic::AtomicU64,
}

/// A model whose prompts are answered elsewhere (a server): prompts are
/// submitted and their answers delivered later, so the caller's thread is
/// never blocked while they are computed.
pub trait RemoteVqa {
    /// Starts answering `prompts`, each on its own (one prompt's failure
    /// fails only it); `done` is called once, from some thread, with one
    /// result per prompt in order.
    fn submit(&mut self, prompts: Vec<VqaPrompt>, done: Delivery);

    /// The requests in flight and answers received so far.
    fn gauge(&self) -> std::sync::Arc<RemoteGauge>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_alternate_images_and_texts_and_number_the_images() {
        let m = chat_messages("sys", [("q1", "a1"), ("q2", "a2")], "q");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[0].content, vec![ChatContent::Text("sys".into())]);
        assert_eq!(
            m[1].content,
            vec![
                ChatContent::Image(0),
                ChatContent::Text("Question:q1 Short answer:a1".into()),
                ChatContent::Image(1),
                ChatContent::Text("Question:q2 Short answer:a2".into()),
                ChatContent::Image(2),
                ChatContent::Text("Question:q Short answer:".into()),
            ]
        );
    }
}
