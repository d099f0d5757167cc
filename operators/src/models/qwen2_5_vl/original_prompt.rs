//! The original project's plain-text prompt (`Qwen2VLInterface.concat_prompt`
//! with `is_last_for_generation=True`) and the `mask_length` it gives
//! `get_cond_prob` for `vqa_gt_prob`.
//!
//! The original scores the answer of a prompt that is rendered with the chat
//! template (system prompt, image placeholders expanded to one token per
//! merged patch), but it measures where the answer starts on a different
//! string: the instruction (empty in the Qwen config), then each example as
//! `<image>Question:<q> Short answer:<a>` (spaces stripped at both ends)
//! followed by the join string `<|endofchunk|>`, then
//! `<image>Question:<q> Short answer:`, tokenized as plain text. That count
//! is much smaller than the real prompt's length, so the original's
//! `exp(-mean CE)` covers the tail of the system prompt, the images and the
//! examples as well as the answer. [`mask_length`] reproduces the count so
//! `--gt_prob_mode original` gives the original's numbers.

use super::processor::{ProcessorError, PromptRequest};

/// The image marker the original's Qwen interface writes (`<image>`, plain
/// text for the Qwen tokenizer).
pub const IMAGE_MARKER: &str = "<image>";

/// The join string after each in-context example (`icd_join_char`, the
/// original's default for its Qwen interface).
pub const EXAMPLE_JOIN: &str = "<|endofchunk|>";

/// The original's plain-text prompt of `req` (no chat template, no system
/// prompt, one `<image>` marker per image).
pub fn plain_prompt(req: &PromptRequest) -> String {
    let mut out = String::new();
    for ex in &req.examples {
        let item = format!(
            "{IMAGE_MARKER}Question:{} Short answer:{}",
            ex.question, ex.answer
        );
        out.push_str(item.trim_matches(' '));
        out.push_str(EXAMPLE_JOIN);
    }
    out.push_str(&format!(
        "{IMAGE_MARKER}Question:{} Short answer:",
        req.query.question
    ));
    out
}

/// The original's `mask_length` for `req`: the token count of
/// [`plain_prompt`], tokenized by `encode` (the tokenizer without special
/// tokens added, as `tokenizer(text, add_special_tokens=False)`).
pub fn mask_length(
    req: &PromptRequest,
    encode: impl Fn(&str) -> Result<Vec<u32>, ProcessorError>,
) -> Result<usize, ProcessorError> {
    Ok(encode(&plain_prompt(req))?.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn plain_prompt_joins_examples_and_ends_with_the_query() {
        let req = PromptRequest::from_paths(
            None,
            [
                (PathBuf::from("a.png"), "q1?".into(), "yes ".into()),
                (PathBuf::from("b.png"), "q2?".into(), "red".into()),
            ],
            (PathBuf::from("c.png"), "q3?".into()),
        );
        assert_eq!(
            plain_prompt(&req),
            "<image>Question:q1? Short answer:yes<|endofchunk|>\
             <image>Question:q2? Short answer:red<|endofchunk|>\
             <image>Question:q3? Short answer:"
        );
        let n = mask_length(&req, |t| Ok(t.bytes().map(u32::from).collect())).unwrap();
        assert_eq!(n, plain_prompt(&req).len());
    }
}
