//! OpenFlamingo's tokenizer and the original project's prompt format.
//!
//! The tokenizer is the language model's `tokenizer.json` with the tokens
//! open-flamingo's factory adds: `<|endofchunk|>` and `<image>`
//! (additional special tokens), then `<PAD>` when the tokenizer has no pad
//! token; ids follow the vocabulary in that order. The prompt of `k`
//! examples and a query is, as Lever-Plus renders it,
//! `<image>Question:{q} Short answer:{a}<|endofchunk|>` per example (each
//! item `.strip(" ")`), then `<image>Question:{q} Short answer:`, tokenized
//! without special tokens. The questions and answers are user-provided:
//! they are tokenized between the control tokens with added-token matching
//! off, so text that looks like `<image>` never becomes one.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

/// The token that marks an image.
pub const IMAGE_TOKEN: &str = "<image>";
/// The token that ends an in-context example.
pub const END_OF_CHUNK_TOKEN: &str = "<|endofchunk|>";
/// The pad token the factory adds when the tokenizer has none.
pub const PAD_TOKEN: &str = "<PAD>";

/// Errors of the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A tokenizer file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The tokenizer with OpenFlamingo's tokens.
#[derive(Debug, Clone)]
pub struct FlamingoTokenizer {
    tokenizer: Tokenizer,
    /// `<image>`.
    pub image_token_id: u32,
    /// `<|endofchunk|>`.
    pub end_of_chunk_token_id: u32,
    /// The EOS token (`eos_token` of the tokenizer config): generation stops
    /// on it and pads with it (Lever-Plus sets `pad_token = eos_token`).
    pub eos_token_id: u32,
    /// Rows of the resized token embedding (`len(tokenizer)`).
    pub vocab_len: usize,
    /// HF's `clean_up_tokenization_spaces` of the tokenizer config.
    clean_up_spaces: bool,
}

fn read_json(path: &Path) -> Result<Option<Value>, PromptError> {
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |message: String| PromptError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(format!("invalid JSON: {e}")))
}

/// A special token's text in a tokenizer config (a string or an
/// `AddedToken` object with `content`).
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl FlamingoTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and
    /// `special_tokens_map.json` of the language model's directory and adds
    /// OpenFlamingo's tokens.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let tok_path = dir.join("tokenizer.json");
        let file_err = |path: &Path, message: String| PromptError::File {
            path: path.to_path_buf(),
            message,
        };
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| file_err(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let special = |key: &str| {
            token_text(cfg.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_text(map.as_ref().and_then(|m| m.get(key))))
        };
        let eos = special("eos_token").ok_or_else(|| {
            file_err(
                &cfg_path,
                "no `eos_token` (here or in special_tokens_map.json)".into(),
            )
        })?;
        let has_pad = special("pad_token").is_some();
        let mut added = vec![
            AddedToken::from(END_OF_CHUNK_TOKEN, true),
            AddedToken::from(IMAGE_TOKEN, true),
        ];
        if !has_pad {
            added.push(AddedToken::from(PAD_TOKEN, true));
        }
        tokenizer.add_special_tokens(&added);
        // User text between the control tokens is never matched to them.
        tokenizer.set_encode_special_tokens(true);
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| file_err(&tok_path, format!("token `{t}` is not in the vocabulary")))
        };
        let vocab_len = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let clean_up_spaces = cfg
            .as_ref()
            .and_then(|c| c.get("clean_up_tokenization_spaces"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Ok(Self {
            image_token_id: id(IMAGE_TOKEN)?,
            end_of_chunk_token_id: id(END_OF_CHUNK_TOKEN)?,
            eos_token_id: id(&eos)?,
            vocab_len,
            clean_up_spaces,
            tokenizer,
        })
    }

    /// Tokenizes text without special tokens, added control tokens not
    /// matched.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    /// The prompt text and ids of `examples` (question, answer) and a query
    /// question (see the module doc).
    pub fn prompt<'a>(
        &self,
        examples: impl IntoIterator<Item = (&'a str, &'a str)>,
        query: &str,
    ) -> Result<(String, Vec<u32>), PromptError> {
        let mut text = String::new();
        let mut ids = Vec::new();
        let mut item = |body: String, end: bool| -> Result<(), PromptError> {
            let body = body.trim_matches(' ');
            text.push_str(IMAGE_TOKEN);
            text.push_str(body);
            ids.push(self.image_token_id);
            ids.extend(self.encode(body)?);
            if end {
                text.push_str(END_OF_CHUNK_TOKEN);
                ids.push(self.end_of_chunk_token_id);
            }
            Ok(())
        };
        for (q, a) in examples {
            item(format!("Question:{q} Short answer:{a}"), true)?;
        }
        item(format!("Question:{query} Short answer:"), false)?;
        Ok((text, ids))
    }

    /// Decodes generated ids as HF does (`skip_special_tokens=True`, then
    /// `clean_up_tokenization` when the tokenizer config asks for it).
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        let s = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(match self.clean_up_spaces {
            true => clean_up_tokenization(&s),
            false => s,
        })
    }
}

/// HF's `clean_up_tokenization`.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
