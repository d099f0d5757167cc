//! Relevance of a prediction to the ground-truth answers (`compute_relevance`
//! of the original RL-data generation): token F1 and a character similarity
//! equal to Python's `difflib.SequenceMatcher(None, pred, gt).ratio()`.

use std::collections::HashMap;

use super::normalize::py_strip;

/// The relevance scores of one prediction (`vqa_rel_token_f1`,
/// `vqa_rel_edit_sim`, `vqa_rel_score` in the original's records).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Relevance {
    /// Best token F1 over the ground-truth answers.
    pub token_f1: f64,
    /// Best `SequenceMatcher` ratio over the ground-truth answers.
    pub edit_sim: f64,
    /// `max(token_f1, edit_sim)`.
    pub score: f64,
}

/// Relevance of `pred` to `gt_list` like the original `compute_relevance`:
/// both sides are `strip().lower()`-ed; an empty prediction or an empty list
/// gives all zeros; otherwise token F1 and edit similarity are each maximised
/// over the list independently and `score` is the larger of the two.
/// (The original maps a `None` prediction or answer to `""`; callers do the
/// same.)
pub fn relevance(pred: &str, gt_list: &[String]) -> Relevance {
    let pred = py_strip(pred).to_lowercase();
    if pred.is_empty() || gt_list.is_empty() {
        return Relevance::default();
    }
    let gts: Vec<String> = gt_list.iter().map(|g| py_strip(g).to_lowercase()).collect();
    let pred_tokens = tokens(&pred);
    let pred_chars: Vec<char> = pred.chars().collect();
    let mut f1_max = f64::NEG_INFINITY;
    for g in &gts {
        let f = token_f1_tokens(&pred_tokens, &tokens(g));
        if f > f1_max {
            f1_max = f;
        }
    }
    let mut ed_max = f64::NEG_INFINITY;
    for g in &gts {
        let g_chars: Vec<char> = g.chars().collect();
        let e = sequence_matcher_ratio(&pred_chars, &g_chars);
        if e > ed_max {
            ed_max = e;
        }
    }
    let score = if ed_max > f1_max { ed_max } else { f1_max };
    Relevance {
        token_f1: f1_max,
        edit_sim: ed_max,
        score,
    }
}

/// `re.findall("[a-z0-9]+", s.lower())`.
fn tokens(s: &str) -> Vec<String> {
    let lowered = s.to_lowercase();
    lowered
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Token F1 of the original (`token_f1`): multiset overlap of the
/// `[a-z0-9]+` tokens of the lower-cased strings; 0 when either side has no
/// token or nothing overlaps.
pub fn token_f1(a: &str, b: &str) -> f64 {
    token_f1_tokens(&tokens(a), &tokens(b))
}

fn token_f1_tokens(a: &[String], b: &[String]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, (u32, u32)> = HashMap::new();
    for t in a {
        counts.entry(t.as_str()).or_default().0 += 1;
    }
    for t in b {
        counts.entry(t.as_str()).or_default().1 += 1;
    }
    let common: u32 = counts.values().map(|&(x, y)| x.min(y)).sum();
    let prec = f64::from(common) / a.len().max(1) as f64;
    let rec = f64::from(common) / b.len().max(1) as f64;
    if prec + rec == 0.0 {
        return 0.0;
    }
    2.0 * prec * rec / (prec + rec)
}

/// Python's `difflib.SequenceMatcher(None, a, b).ratio()` on Unicode code
/// points, including the default `autojunk` heuristic: when `b` has at least
/// 200 elements, elements occurring more than `len(b) / 100 + 1` times are
/// "popular" and cannot start a match (they can still extend one).
pub fn sequence_matcher_ratio(a: &[char], b: &[char]) -> f64 {
    let length = a.len() + b.len();
    if length == 0 {
        return 1.0;
    }
    let matches = SequenceMatcher::new(a, b).matching_characters();
    2.0 * matches as f64 / length as f64
}

/// The parts of `difflib.SequenceMatcher` needed for `ratio()`.
struct SequenceMatcher<'a> {
    a: &'a [char],
    b: &'a [char],
    /// Positions of each non-popular element of `b`, ascending.
    b2j: HashMap<char, Vec<usize>>,
    /// `j2len` rows of the longest-match dynamic programme, offset by one
    /// (`row[j + 1]` is the length of the match ending at `b[j]`), with the
    /// indices written so far so they can be cleared cheaply.
    prev: Vec<usize>,
    prev_set: Vec<usize>,
    cur: Vec<usize>,
    cur_set: Vec<usize>,
}

impl<'a> SequenceMatcher<'a> {
    fn new(a: &'a [char], b: &'a [char]) -> Self {
        let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
        for (j, &c) in b.iter().enumerate() {
            b2j.entry(c).or_default().push(j);
        }
        let n = b.len();
        if n >= 200 {
            let ntest = n / 100 + 1;
            b2j.retain(|_, idxs| idxs.len() <= ntest);
        }
        Self {
            a,
            b,
            b2j,
            prev: vec![0; n + 1],
            prev_set: Vec::new(),
            cur: vec![0; n + 1],
            cur_set: Vec::new(),
        }
    }

    /// `find_longest_match(alo, ahi, blo, bhi)` with no junk function: the
    /// earliest (in `a`, then `b`) longest block of non-popular elements,
    /// then extended on both sides over equal elements (popular ones
    /// included, since they are not "junk").
    fn find_longest_match(
        &mut self,
        alo: usize,
        ahi: usize,
        blo: usize,
        bhi: usize,
    ) -> (usize, usize, usize) {
        let (a, b) = (self.a, self.b);
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        for &j in &self.prev_set {
            self.prev[j] = 0;
        }
        self.prev_set.clear();
        for (i, ai) in a.iter().enumerate().take(ahi).skip(alo) {
            for &j in &self.cur_set {
                self.cur[j] = 0;
            }
            self.cur_set.clear();
            if let Some(js) = self.b2j.get(ai) {
                for &j in js {
                    if j < blo {
                        continue;
                    }
                    if j >= bhi {
                        break;
                    }
                    let k = self.prev[j] + 1;
                    self.cur[j + 1] = k;
                    self.cur_set.push(j + 1);
                    if k > bestsize {
                        besti = i + 1 - k;
                        bestj = j + 1 - k;
                        bestsize = k;
                    }
                }
            }
            std::mem::swap(&mut self.prev, &mut self.cur);
            std::mem::swap(&mut self.prev_set, &mut self.cur_set);
        }
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi
            && bestj + bestsize < bhi
            && a[besti + bestsize] == b[bestj + bestsize]
        {
            bestsize += 1;
        }
        (besti, bestj, bestsize)
    }

    /// Sum of the sizes of `get_matching_blocks()`: recursive longest matches
    /// on the left and right remainders.
    fn matching_characters(&mut self) -> usize {
        let mut total = 0usize;
        let mut queue = vec![(0usize, self.a.len(), 0usize, self.b.len())];
        while let Some((alo, ahi, blo, bhi)) = queue.pop() {
            let (i, j, k) = self.find_longest_match(alo, ahi, blo, bhi);
            if k > 0 {
                total += k;
                if alo < i && blo < j {
                    queue.push((alo, i, blo, j));
                }
                if i + k < ahi && j + k < bhi {
                    queue.push((i + k, ahi, j + k, bhi));
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(a: &str, b: &str) -> f64 {
        let a: Vec<char> = a.chars().collect();
        let b: Vec<char> = b.chars().collect();
        sequence_matcher_ratio(&a, &b)
    }

    #[test]
    fn difflib_small_cases() {
        // Values from Python's difflib.
        assert_eq!(ratio("abcd", "bcde"), 0.75);
        assert_eq!(ratio("", ""), 1.0);
        assert_eq!(ratio("a", ""), 0.0);
        assert_eq!(ratio("no", "maybe"), 2.0 * 0.0 / 7.0);
        assert_eq!(ratio("rectangle", "triangle"), 12.0 / 17.0);
        // "qabxcd" vs "abycdf" -> blocks "ab", "cd": 2*4/12
        assert_eq!(ratio("qabxcd", "abycdf"), 8.0 / 12.0);
    }

    #[test]
    fn autojunk_popular_elements() {
        // b of 200 'x': 'x' is popular, no match can start, but the empty
        // match at (0, 0) is still extended over equal elements (Python
        // gives 20/210).
        let b = "x".repeat(200);
        assert_eq!(ratio(&"x".repeat(10), &b), 20.0 / 210.0);
        // ... only from the start of the ranges: a popular run in the middle
        // cannot be found (Python: 0.0).
        let b = format!("{}y", "x".repeat(200));
        assert_eq!(ratio(&format!("z{}", "x".repeat(10)), &b), 0.0);
        // below 200 elements nothing is popular
        let b = "x".repeat(199);
        assert_eq!(ratio(&"x".repeat(10), &b), 20.0 / 209.0);
    }

    #[test]
    fn token_f1_cases() {
        assert_eq!(
            token_f1("red circle", "a red circle"),
            2.0 * 1.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0)
        );
        assert_eq!(token_f1("...", "red"), 0.0);
        assert_eq!(token_f1("red red", "red"), 2.0 * 0.5 * 1.0 / 1.5);
        assert_eq!(token_f1("Café", "caf"), 1.0);
    }

    #[test]
    fn relevance_edges() {
        assert_eq!(relevance("", &["red".into()]), Relevance::default());
        assert_eq!(relevance(" \t", &["red".into()]), Relevance::default());
        assert_eq!(relevance("red", &[]), Relevance::default());
        let r = relevance(" RED ", &["blue".into(), "Red".into()]);
        assert_eq!((r.token_f1, r.edit_sim, r.score), (1.0, 1.0, 1.0));
    }
}
