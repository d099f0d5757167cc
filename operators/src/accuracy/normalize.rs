//! The official VQA answer normalisation (`VQAEval.processPunctuation` +
//! `VQAEval.processDigitArticle`, preceded by the newline/tab replacement and
//! `strip()` that `VQAEval.evaluate` applies to every answer).
//!
//! The implementation is a few linear passes over reusable buffers (no regex,
//! no backtracking, no allocation for ASCII input once the buffers are warm),
//! reproducing the Python semantics exactly:
//!
//! * `strip()` / `split()` use Python's notion of whitespace ([`is_py_space`]);
//! * `\d` in the original regexes is Python's Unicode `\d` (general category
//!   `Nd`), see [`is_py_digit`];
//! * the period regex `(?!<=\d)(\.)(?!\d)` removes a period that is not followed
//!   by a digit (its first look-ahead can never fail, a period is not `<`), and
//!   because the original passes `re.UNICODE` (= 32) as the `count` argument of
//!   `sub`, at most [`PERIOD_STRIP_LIMIT`] periods are removed;
//! * `lower()` is the full Unicode lower-casing (Rust's `str::to_lowercase`
//!   has the same special cases, final sigma included).

use std::sync::LazyLock;

/// The punctuation characters of the official evaluator, in its order.
///
/// Each is either deleted or replaced by a space (see [`Normalizer`]); since
/// every replacement inserts only spaces, the order does not change the result,
/// but it is kept for reference.
pub const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// How many periods the original period regex removes at most (it passes
/// `re.UNICODE`, whose value is 32, as the `count` argument of `re.sub`).
pub const PERIOD_STRIP_LIMIT: usize = 32;

/// Number words mapped to digits (`manualMap` of the official evaluator).
pub const MANUAL_MAP: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// Articles dropped by the official evaluator.
pub const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The contractions table of the official VQA evaluator, in its order and with
/// its quirks (keys with capitals can never match because words are
/// lower-cased first; `"somebody'd"` maps to `"somebodyd"`).
pub const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// Contractions sorted by key for binary search.
static CONTRACTIONS_SORTED: LazyLock<Vec<(&'static str, &'static str)>> = LazyLock::new(|| {
    let mut v: Vec<(&'static str, &'static str)> = CONTRACTIONS.to_vec();
    v.sort_unstable_by(|a, b| a.0.cmp(b.0));
    v
});

fn contraction(word: &str) -> Option<&'static str> {
    let table = &*CONTRACTIONS_SORTED;
    table
        .binary_search_by(|probe| probe.0.cmp(word))
        .ok()
        .map(|i| table[i].1)
}

fn manual_map(word: &str) -> Option<&'static str> {
    Some(match word {
        "none" | "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

fn is_article(word: &str) -> bool {
    matches!(word, "a" | "an" | "the")
}

/// Python's `str.isspace()` for one character: Unicode `White_Space` plus the
/// information separators U+001C..U+001F (bidirectional class B/S), which
/// Python's `strip()` and `split()` also treat as whitespace.
#[inline]
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` without arguments.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

static ND_RE: LazyLock<regex::Regex> = LazyLock::new(|| {
    // A fixed, valid pattern: cannot fail.
    #[allow(clippy::unwrap_used)]
    regex::Regex::new(r"^\p{Nd}$").unwrap()
});

/// Python's Unicode `\d` (general category `Nd`) for one character.
#[inline]
pub fn is_py_digit(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        let mut buf = [0u8; 4];
        ND_RE.is_match(c.encode_utf8(&mut buf))
    }
}

#[inline]
fn punct_index(c: char) -> Option<usize> {
    if !c.is_ascii() {
        return None;
    }
    PUNCT.iter().position(|&p| p == c)
}

/// Reusable state for [`normalize_answer`]: keeps its buffers between calls so
/// that normalising many answers allocates nothing once they are warm.
#[derive(Debug, Default, Clone)]
pub struct Normalizer {
    stripped: String,
    punct: String,
    lowered: String,
    out: String,
}

impl Normalizer {
    /// A normaliser with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Normalises `s` like the official evaluator and returns the result,
    /// which borrows this normaliser's buffer until the next call.
    pub fn normalize<'a>(&'a mut self, s: &str) -> &'a str {
        // 1. "\n", "\t" -> " ", then strip().  (Both are whitespace, so strip
        //    before replacing gives the same text.)
        self.stripped.clear();
        for c in py_strip(s).chars() {
            self.stripped
                .push(if c == '\n' || c == '\t' { ' ' } else { c });
        }
        let text = self.stripped.as_str();

        // 2. processPunctuation: which punctuation characters are deleted.
        //    A mark is deleted when it occurs next to an ASCII space in the
        //    input, or (all marks) when the input has digit,comma,digit.
        let mut delete = [false; PUNCT.len()];
        let mut comma_digit = false;
        let mut any_punct = false;
        let mut prev: Option<char> = None;
        let mut it = text.chars().peekable();
        while let Some(c) = it.next() {
            let next = it.peek().copied();
            if let Some(k) = punct_index(c) {
                any_punct = true;
                if prev == Some(' ') || next == Some(' ') {
                    delete[k] = true;
                }
                if c == ',' && !comma_digit {
                    if let (Some(p), Some(n)) = (prev, next) {
                        comma_digit = is_py_digit(p) && is_py_digit(n);
                    }
                }
            }
            prev = Some(c);
        }
        if comma_digit {
            delete = [true; PUNCT.len()];
        }
        self.punct.clear();
        if any_punct {
            for c in text.chars() {
                match punct_index(c) {
                    Some(k) if delete[k] => {}
                    Some(_) => self.punct.push(' '),
                    None => self.punct.push(c),
                }
            }
        } else {
            self.punct.push_str(text);
        }

        //    Period regex: delete a '.' not followed by a digit (looking at the
        //    text after punctuation processing), at most 32 times.
        self.lowered.clear();
        let mut removed = 0usize;
        let mut it = self.punct.chars().peekable();
        while let Some(c) = it.next() {
            if c == '.' && removed < PERIOD_STRIP_LIMIT {
                let followed_by_digit = it.peek().is_some_and(|&n| is_py_digit(n));
                if !followed_by_digit {
                    removed += 1;
                    continue;
                }
            }
            self.lowered.push(c);
        }

        // 3. processDigitArticle: lower(), split(), number words, articles,
        //    contractions, " ".join.
        if self.lowered.is_ascii() {
            self.lowered.make_ascii_lowercase();
        } else {
            self.lowered = self.lowered.to_lowercase();
        }
        self.out.clear();
        for word in self.lowered.split(is_py_space).filter(|w| !w.is_empty()) {
            let word = manual_map(word).unwrap_or(word);
            if is_article(word) {
                continue;
            }
            let word = contraction(word).unwrap_or(word);
            if !self.out.is_empty() {
                self.out.push(' ');
            }
            self.out.push_str(word);
        }
        &self.out
    }
}

/// The official VQA normalisation of one answer string (prediction or ground
/// truth), as `VQAEval.evaluate` applies it. Allocates; for bulk work reuse a
/// [`Normalizer`].
pub fn normalize_answer(s: &str) -> String {
    Normalizer::new().normalize(s).to_owned()
}

/// Python's `round(x, ndigits)` for a float: correctly rounded to `ndigits`
/// decimals, ties (exact binary values only) to even. Rust's fixed-precision
/// formatting has exactly these semantics, and parsing back is correctly
/// rounded like CPython's `_Py_dg_strtod`.
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{:.*}", ndigits, x).parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize_answer(s)
    }

    #[test]
    fn tables_have_official_sizes() {
        assert_eq!(CONTRACTIONS.len(), 120);
        assert_eq!(MANUAL_MAP.len(), 12);
        assert_eq!(ARTICLES, ["a", "an", "the"]);
        for (k, v) in MANUAL_MAP {
            assert_eq!(manual_map(k), Some(v));
        }
        for (k, v) in CONTRACTIONS {
            assert_eq!(contraction(k), Some(v), "{k}");
        }
        // keys are unique
        let mut keys: Vec<&str> = CONTRACTIONS.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 120);
    }

    #[test]
    fn basic_words() {
        assert_eq!(n("Yes"), "yes");
        assert_eq!(n("  The Red  Circle \n"), "red circle");
        assert_eq!(n("two"), "2");
        assert_eq!(n("None"), "0");
        assert_eq!(n("I dont know"), "i don't know");
        assert_eq!(n("an apple"), "apple");
        // capitalised contraction keys are dead (words are lower-cased first)
        assert_eq!(n("Im"), "im");
        assert_eq!(n("somebody'd"), "somebodyd");
        assert_eq!(n(""), "");
        assert_eq!(n(" \t\n "), "");
    }

    #[test]
    fn punctuation_rules() {
        // no space next to '-': replaced by a space
        assert_eq!(n("no-no"), "no no");
        // next to a space: deleted
        assert_eq!(n("no -no"), "no no");
        assert_eq!(n("a- b"), "b");
        // only the punctuation next to a space is deleted, others replaced
        assert_eq!(n("x/y ?z"), "x y z");
        assert_eq!(n("x/y?z"), "x y z");
        assert_eq!(n("ab?c /"), "ab c");
        // deleted vs replaced matters when glued
        assert_eq!(n("foo?bar ?"), "foobar");
        // digit,comma,digit anywhere: every mark is deleted
        assert_eq!(n("4,096"), "4096");
        assert_eq!(n("1,2-3"), "123");
        assert_eq!(n("a,b"), "b"); // "a" is an article
        assert_eq!(n("x,y"), "x y");
        // strip happens before the space test
        assert_eq!(n(" -no"), "no");
        assert_eq!(n("-\nno"), "no");
        // newline becomes a space, so the '-' is deleted
        assert_eq!(n("x-\ny-z"), "x yz");
        // other whitespace is not an ASCII space: '-' is replaced
        assert_eq!(n("x-\ry-z"), "x y z");
        // Unicode digits count for the comma rule (Arabic-Indic digits)
        assert_eq!(n("\u{661},\u{662}-x"), "\u{661}\u{662}x");
    }

    #[test]
    fn period_rules() {
        assert_eq!(n("red."), "red");
        assert_eq!(n("3.5"), "3.5");
        assert_eq!(n("64.0"), "64.0");
        assert_eq!(n("a.b"), "ab");
        assert_eq!(n("..5"), ".5");
        // the follower is looked at after punctuation processing
        assert_eq!(n(".,5"), "5"); // ',' replaced by ' ' -> ". 5"
        assert_eq!(n("x .,5"), "x 5");
        // at most 32 periods are removed
        let forty = format!("yes{}", ".".repeat(40));
        assert_eq!(n(&forty), format!("yes{}", ".".repeat(8)));
        let thirty_two = format!("yes{}", ".".repeat(32));
        assert_eq!(n(&thirty_two), "yes");
        // a Unicode digit after the period keeps it
        assert_eq!(n("1.\u{663}"), "1.\u{663}");
    }

    #[test]
    fn unicode_lower_and_space() {
        assert_eq!(n("CAFÉ"), "café");
        assert_eq!(n("ΟΔΟΣ ΣΑ"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2} \u{3c3}\u{3b1}");
        assert_eq!(n("a\u{3000}b"), "b"); // ideographic space splits; "a" dropped
        assert_eq!(n("x\u{1f}y"), "x y"); // unit separator is Python whitespace
        assert_eq!(n("\u{a0}yes\u{a0}"), "yes");
    }

    #[test]
    fn normalizer_reuse_matches_fresh() {
        let mut norm = Normalizer::new();
        for s in ["Two.", "4,096", "no-no", "The Cat", "x"] {
            let a = norm.normalize(s).to_owned();
            assert_eq!(a, normalize_answer(s));
        }
    }

    #[test]
    fn python_round() {
        assert_eq!(py_round(0.125, 2), 0.12);
        assert_eq!(py_round(0.375, 2), 0.38);
        assert_eq!(py_round(2.675, 2), 2.67);
        assert_eq!(py_round(100.0 * (2.0 / 3.0), 2), 66.67);
        assert_eq!(py_round(30.000000000000004, 2), 30.0);
    }
}
