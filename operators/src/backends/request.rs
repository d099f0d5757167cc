//! The request file of `leverflow vqa`: one prompt (or a list) of examples
//! (image, question, answer) and a query (image, question), with optional
//! generation settings, read into the contract's [`VqaPrompt`].
//!
//! ```json
//! {"examples": [{"image": "a.jpg", "question": "what color?", "answer": "red"}],
//!  "query": {"image": "b.jpg", "question": "what shape?"},
//!  "gen": {"num_beams": 3, "max_new_tokens": 5}}
//! ```
//!
//! Relative image paths are relative to the request file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::models::contract::{PromptExample, VqaPrompt, DEFAULT_SYSTEM_PROMPT};
use crate::models::qwen2_5_vl::generate::GenerationOverrides;

/// Errors reading a request file.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{}: invalid JSON at line {line} column {column}: {message}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde's message.
        message: String,
    },
    /// A request does not have the expected fields.
    #[error("{}: request {index}: {message}", .path.display())]
    Request {
        /// The file.
        path: PathBuf,
        /// 0-based position in the list.
        index: usize,
        /// serde's message.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
struct RawRequest {
    #[serde(default)]
    examples: Vec<RawExample>,
    query: RawQuery,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    gen: RequestGen,
}

#[derive(Debug, Deserialize)]
struct RawExample {
    image: PathBuf,
    question: String,
    answer: String,
}

#[derive(Debug, Deserialize)]
struct RawQuery {
    image: PathBuf,
    question: String,
}

/// Generation settings of a request (unset: `leverflow vqa`'s defaults,
/// the pipeline's: 5 new tokens, 3 beams, no length penalty, greedy).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestGen {
    /// Beams.
    pub num_beams: Option<usize>,
    /// Maximum new tokens.
    pub max_new_tokens: Option<usize>,
    /// Minimum new tokens.
    pub min_new_tokens: Option<usize>,
    /// Length penalty.
    pub length_penalty: Option<f64>,
    /// Repetition penalty (default: the checkpoint's).
    pub repetition_penalty: Option<f64>,
    /// Sampling (only `false` is supported by the decoders).
    pub do_sample: Option<bool>,
}

impl RequestGen {
    /// The generation overrides of these settings.
    pub fn overrides(&self) -> GenerationOverrides {
        GenerationOverrides {
            max_new_tokens: self.max_new_tokens.or(Some(5)),
            min_new_tokens: self.min_new_tokens.or(Some(0)),
            num_beams: self.num_beams.or(Some(3)),
            length_penalty: self.length_penalty.or(Some(0.0)),
            repetition_penalty: self.repetition_penalty,
            do_sample: self.do_sample.or(Some(false)),
            ..Default::default()
        }
    }
}

/// One request: the prompt and its generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaRequest {
    /// The prompt (query and example indices are positions: 0 for the
    /// query, 1.. for the examples).
    pub prompt: VqaPrompt,
    /// Generation settings.
    pub gen: RequestGen,
}

/// One answer of `leverflow vqa` as the command prints it (the same line
/// for every backend): the prompt, its ids, the generated ids, the raw
/// generation and the post-processed answer.
pub fn answer_line(
    prompt_text: &str,
    input_ids: &[u32],
    generated_ids: &[u32],
    raw_generation: &str,
) -> serde_json::Value {
    serde_json::json!({
        "prompt_text": prompt_text,
        "input_ids": input_ids,
        "generated_ids": generated_ids,
        "raw_generation": raw_generation,
        "answer": crate::accuracy::postprocess_generation(Some(raw_generation)),
    })
}

/// Reads a request file (one request object, or a list of them).
pub fn read_requests(path: &Path) -> Result<Vec<VqaRequest>, RequestError> {
    let text = std::fs::read_to_string(path).map_err(|source| RequestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| RequestError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let items = match value {
        serde_json::Value::Array(xs) => xs,
        other => vec![other],
    };
    let base = path.parent().unwrap_or(Path::new("."));
    items
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let r: RawRequest = serde_json::from_value(v).map_err(|e| RequestError::Request {
                path: path.to_path_buf(),
                index,
                message: e.to_string(),
            })?;
            let examples = r
                .examples
                .into_iter()
                .enumerate()
                .map(|(i, e)| PromptExample {
                    dataset_index: i as u64 + 1,
                    image: base.join(e.image),
                    question: e.question,
                    answer: e.answer,
                })
                .collect();
            Ok(VqaRequest {
                prompt: VqaPrompt {
                    query_index: 0,
                    system_prompt: r
                        .system_prompt
                        .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()),
                    examples,
                    query_image: base.join(r.query.image),
                    query_question: r.query.question,
                    gt_answers: Vec::new(),
                },
                gen: r.gen,
            })
        })
        .collect()
}

/// The positions of `requests` grouped by equal generation settings, in
/// order of first appearance (each group is answered as one batch).
pub fn group_by_settings(requests: &[VqaRequest]) -> Vec<(RequestGen, Vec<usize>)> {
    let mut groups: Vec<(RequestGen, Vec<usize>)> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == r.gen) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((r.gen.clone(), vec![i])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_resolve_images_and_group_by_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.json");
        std::fs::write(
            &path,
            r#"[{"examples": [{"image": "a.png", "question": "q1", "answer": "a1"}],
                 "query": {"image": "b.png", "question": "q"}},
                {"query": {"image": "/abs/c.png", "question": "q"}, "gen": {"num_beams": 1}},
                {"query": {"image": "d.png", "question": "q"}}]"#,
        )
        .unwrap();
        let r = read_requests(&path).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].prompt.examples[0].image, dir.path().join("a.png"));
        assert_eq!(r[0].prompt.system_prompt, DEFAULT_SYSTEM_PROMPT);
        assert_eq!(r[1].prompt.query_image, PathBuf::from("/abs/c.png"));
        let groups = group_by_settings(&r);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1, vec![0, 2]);
        assert_eq!(groups[1].0.overrides().num_beams, Some(1));
    }

    #[test]
    fn bad_requests_name_the_file_and_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "[{\"query\": {\"image\": \"x\"}}]").unwrap();
        let e = read_requests(&path).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("request 0"), "{e}");
        std::fs::write(&path, "{").unwrap();
        let e = read_requests(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = read_requests(&dir.path().join("none.json")).unwrap_err();
        assert!(e.to_string().contains("none.json"));
        std::fs::write(
            &path,
            "{\"query\": {\"image\": \"x\", \"question\": \"q\"}, \"gen\": {\"beams\": 2}}",
        )
        .unwrap();
        assert!(read_requests(&path).is_err());
    }
}
