//! `postprocess_vqa_generation` of the original project: cut a raw model
//! generation at the first "Question", "Answer" or "Short" and then at the
//! first ", ".

/// Cuts a raw generation like the original's `postprocess_vqa_generation`:
/// `re.split("Question|Answer|Short", s, 1)[0]` followed by
/// `re.split(", ", ., 1)[0]`. Case-sensitive, no strip; `None` gives `""`.
pub fn postprocess_generation(raw: Option<&str>) -> String {
    let Some(s) = raw else {
        return String::new();
    };
    let cut = ["Question", "Answer", "Short"]
        .iter()
        .filter_map(|m| s.find(m))
        .min()
        .unwrap_or(s.len());
    let head = &s[..cut];
    let head = match head.find(", ") {
        Some(i) => &head[..i],
        None => head,
    };
    head.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts() {
        let p = |s: &str| postprocess_generation(Some(s));
        assert_eq!(p("blue, red Question: what"), "blue");
        assert_eq!(p("Short answer: blue"), "");
        assert_eq!(p("blue\nQuestion:"), "blue\n");
        assert_eq!(p(" blue Answer: red"), " blue ");
        assert_eq!(p("red Answer, Question"), "red ");
        assert_eq!(p("a,b"), "a,b");
        assert_eq!(p("question answer"), "question answer");
        assert_eq!(postprocess_generation(None), "");
    }
}
