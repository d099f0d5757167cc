//! Candidate pointer sequences per query: beam search on the model's true
//! conditional chain, temperature sampling, uniformly random sequences and
//! similarity retrieval, deduplicated by the set of positions, each scored
//! with its log-probability under the pointer selector.
//!
//! Semantics (positions are indices into the query's candidate pool):
//! * Step logits are exactly forward()'s teacher-forced logits: after each
//!   chosen index the query state is updated by the gate, chosen positions are
//!   set to -100 (`mask_value`), and the query's own position (if it is in
//!   the pool) is excluded (-inf, i.e. probabilities renormalised over the
//!   rest).  This differs from the original `beam_search_pointer`, which
//!   never applied the gate (see the fixture README).
//! * **beam**: `num_beams` beams by cumulative log-prob; every beam is
//!   extended by every position not in it and not excluded; ties are broken
//!   by the lexicographically smaller pointer.  `beam_score` is the sum of
//!   the chosen softmax probabilities; `beam_rank` the rank before dedup.
//! * **sample**: for each temperature τ, `num_samples_per_temp` sequences
//!   drawn step by step from `softmax(logits/τ)` restricted to positions not
//!   yet chosen and not excluded (as the original, whose -1e9 fill after the
//!   division removes chosen positions entirely).  `sample_logprob_tempered`
//!   is the exact log-prob of the sequence under those tempered, restricted
//!   distributions (the original added 1e-8 inside the log; we do not).
//! * **random**: `num_random` sequences of distinct, non-excluded positions,
//!   uniformly at random.
//! * **retrieval**: the original's `retrieve_pointer_by_similarity`: rank the
//!   non-excluded positions by cosine similarity of the RAW embeddings
//!   (descending, ties by smaller position); retrieval `r` takes, at each
//!   step, the `r`-th best position not yet in its pointer (the best one if
//!   fewer remain); repeated sets are skipped.
//! * Deduplication by the SET of positions with priority beam > retrieval >
//!   sample > random, first-seen order within a method; output order: beams,
//!   retrieval, samples, random.
//! * `logprob_score` = log π(pointer | query) at temperature 1 on the true
//!   chain with exclusion, for every candidate.
//!
//! Randomness: every query gets `ChaCha8Rng::seed_from_u64(splitmix64(
//! splitmix64(seed) ^ query_index))`; random sequences use stream 0 of it and
//! sample `j` of temperature number `t` uses stream `1 + t *
//! num_samples_per_temp + j`.  Results therefore depend only on (seed,
//! query_index, inputs), never on batching, worker count or order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use burn::tensor::backend::Backend;

use crate::models::pointer_selector::{
    PointerSelector, PointerSelectorConfig, PointerSelectorError, PreparedPool, QueryStates,
};

/// Errors of candidate generation.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    /// Invalid arguments (temperatures, beam count, shot number, ...).
    #[error("invalid candidate arguments: {0}")]
    Args(String),
    /// A query's input is inconsistent with its pool.
    #[error("query {query_index}: {msg}")]
    Query {
        /// the query's index
        query_index: u64,
        /// what is wrong
        msg: String,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] PointerSelectorError),
}

/// How a candidate was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum GenMethod {
    /// beam search on the model
    Beam,
    /// similarity retrieval on raw embeddings
    Retrieval,
    /// temperature sampling from the model
    Sample,
    /// uniformly random
    Random,
    /// a beam of the input beam data
    SourceBeam,
}

impl GenMethod {
    /// The name written to outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            GenMethod::Beam => "beam",
            GenMethod::Retrieval => "retrieval",
            GenMethod::Sample => "sample",
            GenMethod::Random => "random",
            GenMethod::SourceBeam => "source_beam",
        }
    }
}

/// One candidate pointer sequence of a query.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    /// positions in the query's pool
    pub positions: Vec<usize>,
    /// how it was produced
    pub gen_method: GenMethod,
    /// beam rank before deduplication (beams only)
    pub beam_rank: Option<usize>,
    /// sum of chosen probabilities (beams only)
    pub beam_score: Option<f64>,
    /// log π(positions | query) at temperature 1, with exclusion
    pub logprob_score: f64,
    /// sampling temperature (samples only)
    pub temperature: Option<f64>,
    /// log-prob under the tempered sampling distributions (samples only)
    pub sample_logprob_tempered: Option<f64>,
}

/// Settings of candidate generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CandidateArgs {
    /// beams kept at every step
    pub num_beams: usize,
    /// sampling temperatures (each > 0)
    pub temps: Vec<f64>,
    /// samples per temperature
    pub num_samples_per_temp: usize,
    /// uniformly random sequences
    pub num_random: usize,
    /// retrieval sequences
    pub num_retrieval: usize,
    /// sequence length (shots)
    pub shot_num: usize,
    /// base seed
    pub seed: u64,
}

impl CandidateArgs {
    /// Checks the arguments against a pool of `pool_size` candidates of
    /// which `excluded` (0 or 1) are excluded.
    pub fn validate(&self, pool_size: usize, excluded: usize) -> Result<(), CandidateError> {
        if let Some(t) = self.temps.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
            return Err(CandidateError::Args(format!(
                "temperature {t} must be finite and > 0"
            )));
        }
        let avail = pool_size.saturating_sub(excluded);
        if self.shot_num == 0 {
            return Err(CandidateError::Args("shot_num must be >= 1".into()));
        }
        if self.shot_num > avail {
            return Err(CandidateError::Args(format!(
                "shot_num {} exceeds the {avail} available positions (pool of {pool_size}, {excluded} excluded)",
                self.shot_num
            )));
        }
        if self.num_beams > avail {
            return Err(CandidateError::Args(format!(
                "num_beams {} exceeds the {avail} available positions (pool of {pool_size}, {excluded} excluded)",
                self.num_beams
            )));
        }
        Ok(())
    }
}

/// One query of a batch.
#[derive(Debug, Clone, Copy)]
pub struct QueryInput<'a> {
    /// stable index of the query (seeds its RNG)
    pub query_index: u64,
    /// raw query embedding `[d_model]`
    pub embedding: &'a [f32],
    /// position of the query itself in its pool, excluded from all sequences
    pub exclude_position: Option<usize>,
}

/// A beam as returned by [`beam_search`].
#[derive(Debug, Clone, PartialEq)]
pub struct BeamHyp {
    /// positions
    pub pointer: Vec<usize>,
    /// cumulative log-prob (with exclusion)
    pub logprob: f64,
    /// sum of chosen probabilities
    pub score: f64,
}

/// SplitMix64 finaliser (used to derive per-query seeds).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RNG of `query_index` on `stream` (see the module docs).
pub fn query_rng(seed: u64, query_index: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(splitmix64(splitmix64(seed) ^ query_index));
    r.set_stream(stream);
    r
}

#[derive(Clone)]
enum Kind {
    Beam {
        score: f64,
    },
    Sample {
        temp_idx: usize,
        rng: Box<ChaCha8Rng>,
        logp_tau: f64,
    },
    Fixed {
        seq: Vec<usize>,
    },
}

#[derive(Clone)]
struct Track {
    query: usize,
    prefix: Vec<usize>,
    logp: f64,
    kind: Kind,
    /// output slot among this query's samples / fixed sequences
    slot: usize,
}

/// Masked log-sum-exp of a step row: chosen positions at `mask`, the
/// excluded one left out.
fn lse_masked(row: &[f32], prefix: &[usize], exclude: Option<usize>, mask: f32) -> f64 {
    let mut r = row.to_vec();
    for &p in prefix {
        r[p] = mask;
    }
    if let Some(e) = exclude {
        r[e] = f32::NEG_INFINITY;
    }
    let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = r.iter().map(|&x| (x - m).exp() as f64).sum();
    m as f64 + s.ln()
}

/// Draws from softmax(row/τ) over positions not in `prefix` and not excluded;
/// returns (position, tempered log-prob).
fn draw_tempered(
    row: &[f32],
    prefix: &[usize],
    exclude: Option<usize>,
    tau: f64,
    rng: &mut ChaCha8Rng,
) -> (usize, f64) {
    let allowed = |j: usize| Some(j) != exclude && !prefix.contains(&j);
    let mut m = f32::NEG_INFINITY;
    for (j, &x) in row.iter().enumerate() {
        if allowed(j) {
            m = m.max(x);
        }
    }
    // unnormalised weights (0 for disallowed positions), computed once
    let w: Vec<f64> = row
        .iter()
        .enumerate()
        .map(|(j, &x)| {
            if allowed(j) {
                (((x - m) as f64) / tau).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = w.iter().sum();
    let target = rng.random::<f64>() * total;
    let mut acc = 0f64;
    let mut last = usize::MAX;
    for (j, &wj) in w.iter().enumerate() {
        if wj == 0.0 && !allowed(j) {
            continue;
        }
        last = j;
        acc += wj;
        if acc > target {
            return (j, (wj / total).ln());
        }
    }
    // rounding: the last allowed position
    (last, (w[last] / total).ln())
}

/// The `n` largest entries of `row` (excluding `exclude`), best first, ties
/// broken by the smaller position; a bounded insertion buffer, O(K·n).
fn top_positions(row: &[f32], exclude: Option<usize>, n: usize) -> Vec<usize> {
    let mut buf: Vec<usize> = Vec::with_capacity(n + 1);
    if n == 0 {
        return buf;
    }
    for (j, &x) in row.iter().enumerate() {
        if Some(j) == exclude {
            continue;
        }
        // positions arrive in increasing order: an equal value never wins
        if buf.len() == n && x <= row[buf[n - 1]] {
            continue;
        }
        let mut pos = buf.len();
        while pos > 0 && x > row[buf[pos - 1]] {
            pos -= 1;
        }
        buf.insert(pos, j);
        buf.truncate(n);
    }
    buf
}

/// Retrieval sequences of the original (see the module docs).  Only the
/// best `n + shot` positions of the similarity ranking can ever be picked,
/// so only those are ranked.
fn retrieval_sequences<B: Backend>(
    pool: &PreparedPool<B>,
    query: &[f32],
    exclude: Option<usize>,
    n: usize,
    shot: usize,
) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![];
    }
    let norm = |v: &[f32]| {
        v.iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt()
            .max(1e-12)
    };
    let qn = norm(query);
    let k = pool.len();
    let sims: Vec<f64> = (0..k)
        .map(|p| {
            let r = pool.raw_row(p);
            r.iter()
                .zip(query)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                / (qn * norm(r))
        })
        .collect();
    let cmp = |a: &usize, b: &usize| sims[*b].total_cmp(&sims[*a]).then(a.cmp(b));
    let mut ranking: Vec<usize> = (0..k).filter(|&p| Some(p) != exclude).collect();
    let top = (n + shot).min(ranking.len());
    if top < ranking.len() {
        ranking.select_nth_unstable_by(top, cmp);
        ranking.truncate(top);
    }
    ranking.sort_by(cmp);
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in 0..n {
        let mut pointer: Vec<usize> = Vec::with_capacity(shot);
        for _ in 0..shot {
            let avail: Vec<usize> = ranking
                .iter()
                .copied()
                .filter(|p| !pointer.contains(p))
                .take(r + 1)
                .collect();
            if avail.is_empty() {
                break;
            }
            pointer.push(if r < avail.len() { avail[r] } else { avail[0] });
        }
        if pointer.len() == shot {
            let mut key = pointer.clone();
            key.sort_unstable();
            if seen.insert(key) {
                out.push(pointer);
            }
        }
    }
    out
}

/// Uniformly random sequences of distinct non-excluded positions.
fn random_sequences(
    k: usize,
    exclude: Option<usize>,
    n: usize,
    shot: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    (0..n)
        .map(|_| {
            let mut s: Vec<usize> = Vec::with_capacity(shot);
            while s.len() < shot {
                let p = rng.random_range(0..k);
                if Some(p) != exclude && !s.contains(&p) {
                    s.push(p);
                }
            }
            s
        })
        .collect()
}

/// A finished sample: (pointer, log-prob at T=1, temperature index, tempered log-prob).
type SampleOut = (Vec<usize>, f64, usize, f64);
/// A finished fixed sequence: (pointer, log-prob at T=1).
type FixedOut = (Vec<usize>, f64);

/// Raw per-query outputs of the engine (before deduplication).
#[derive(Default)]
struct RawOut {
    beams: Vec<BeamHyp>,
    samples: Vec<SampleOut>,
    fixed: Vec<FixedOut>,
}

fn better(a_lp: f64, a_ptr: (&[usize], usize), b_lp: f64, b_ptr: (&[usize], usize)) -> bool {
    if a_lp != b_lp {
        return a_lp > b_lp;
    }
    let a = a_ptr.0.iter().copied().chain(std::iter::once(a_ptr.1));
    let b = b_ptr.0.iter().copied().chain(std::iter::once(b_ptr.1));
    a.lt(b)
}

/// Runs beams, samples and the given fixed sequences for queries sharing one
/// pool, one batched forward per step.
fn run_group<B: Backend>(
    model: &PointerSelector<B>,
    pool: &PreparedPool<B>,
    queries: &[QueryInput<'_>],
    args: &CandidateArgs,
    fixed: Vec<Vec<Vec<usize>>>,
) -> Result<Vec<RawOut>, CandidateError> {
    let k = pool.len();
    let mask = model.mask_value();
    let nq = queries.len();
    let embs: Vec<&[f32]> = queries.iter().map(|q| q.embedding).collect();
    let mut states: QueryStates = model.query_states(pool, &embs)?;
    let mut out: Vec<RawOut> = (0..nq).map(|_| RawOut::default()).collect();
    // step 0: one row per query; spawn tracks
    let logits = model.step_logits(pool, &states);
    let mut new_tracks: Vec<Track> = Vec::new();
    let mut parents: Vec<usize> = Vec::new();
    for (b, q) in queries.iter().enumerate() {
        let row = &logits[b * k..(b + 1) * k];
        let ex = q.exclude_position;
        let lse = lse_masked(row, &[], ex, mask);
        // beams: top num_beams positions (ties: smaller index)
        for j in top_positions(row, ex, args.num_beams) {
            let lp = row[j] as f64 - lse;
            new_tracks.push(Track {
                query: b,
                prefix: vec![j],
                logp: lp,
                kind: Kind::Beam { score: lp.exp() },
                slot: 0,
            });
            parents.push(b);
        }
        for (t, &tau) in args.temps.iter().enumerate() {
            for s in 0..args.num_samples_per_temp {
                let mut rng = query_rng(
                    args.seed,
                    q.query_index,
                    1 + (t * args.num_samples_per_temp + s) as u64,
                );
                let (j, lt) = draw_tempered(row, &[], ex, tau, &mut rng);
                let slot = t * args.num_samples_per_temp + s;
                new_tracks.push(Track {
                    query: b,
                    prefix: vec![j],
                    logp: row[j] as f64 - lse,
                    kind: Kind::Sample {
                        temp_idx: t,
                        rng: Box::new(rng),
                        logp_tau: lt,
                    },
                    slot,
                });
                parents.push(b);
            }
        }
        for (slot, seq) in fixed[b].iter().enumerate() {
            let j = seq[0];
            new_tracks.push(Track {
                query: b,
                prefix: vec![j],
                logp: row[j] as f64 - lse,
                kind: Kind::Fixed { seq: seq.clone() },
                slot,
            });
            parents.push(b);
        }
    }
    for step in 1..args.shot_num {
        // Tracks with the same (parent state, chosen index) share one state
        // row (same prefix of the same query), so each distinct prefix is
        // run once; `rows_of[track]` is its row in this step's logits.
        let mut uniq: std::collections::HashMap<(usize, usize), usize> =
            std::collections::HashMap::new();
        let (mut u_parents, mut u_chosen) = (Vec::new(), Vec::new());
        let rows_of: Vec<usize> = new_tracks
            .iter()
            .zip(&parents)
            .map(|(t, &p)| {
                let c = *t.prefix.last().unwrap_or(&0);
                *uniq.entry((p, c)).or_insert_with(|| {
                    u_parents.push(p);
                    u_chosen.push(c);
                    u_parents.len() - 1
                })
            })
            .collect();
        states = model.gate_update(pool, &states, &u_parents, &u_chosen)?;
        let tracks = std::mem::take(&mut new_tracks);
        parents.clear();
        if tracks.is_empty() {
            break;
        }
        let logits = model.step_logits(pool, &states);
        // per-row lse at temperature 1 (chosen at mask, exclusion)
        let mut lses = vec![f64::NAN; u_parents.len()];
        for (t, &row) in tracks.iter().zip(&rows_of) {
            if lses[row].is_nan() {
                lses[row] = lse_masked(
                    &logits[row * k..(row + 1) * k],
                    &t.prefix,
                    queries[t.query].exclude_position,
                    mask,
                );
            }
        }
        // beams: per query, best extensions
        let mut best: Vec<Vec<(f64, usize, usize)>> = vec![Vec::new(); nq]; // (logp, track row, j)
        for (r, t) in tracks.iter().enumerate() {
            if !matches!(t.kind, Kind::Beam { .. }) {
                continue;
            }
            let ex = queries[t.query].exclude_position;
            let row = &logits[rows_of[r] * k..(rows_of[r] + 1) * k];
            let buf = &mut best[t.query];
            for (j, &x) in row.iter().enumerate() {
                if Some(j) == ex || t.prefix.contains(&j) {
                    continue;
                }
                let lp = t.logp + (x as f64 - lses[rows_of[r]]);
                let full = buf.len() >= args.num_beams;
                if full {
                    let (wl, wr, wj) = buf[buf.len() - 1];
                    if !better(lp, (&t.prefix, j), wl, (&tracks[wr].prefix, wj)) {
                        continue;
                    }
                }
                // insertion position
                let mut pos = buf.len();
                while pos > 0 {
                    let (pl, pr, pj) = buf[pos - 1];
                    if better(lp, (&t.prefix, j), pl, (&tracks[pr].prefix, pj)) {
                        pos -= 1;
                    } else {
                        break;
                    }
                }
                buf.insert(pos, (lp, r, j));
                if buf.len() > args.num_beams {
                    buf.pop();
                }
            }
        }
        for buf in &best {
            for &(lp, r, j) in buf {
                let t = &tracks[r];
                let score = match t.kind {
                    Kind::Beam { score } => score,
                    _ => 0.0,
                };
                let step_lp = logits[rows_of[r] * k + j] as f64 - lses[rows_of[r]];
                let mut prefix = t.prefix.clone();
                prefix.push(j);
                new_tracks.push(Track {
                    query: t.query,
                    prefix,
                    logp: lp,
                    kind: Kind::Beam {
                        score: score + step_lp.exp(),
                    },
                    slot: 0,
                });
                parents.push(rows_of[r]);
            }
        }
        // samples and fixed sequences
        for (r, t) in tracks.iter().enumerate() {
            let ex = queries[t.query].exclude_position;
            let row = &logits[rows_of[r] * k..(rows_of[r] + 1) * k];
            let (j, kind) = match &t.kind {
                Kind::Beam { .. } => continue,
                Kind::Sample {
                    temp_idx,
                    rng,
                    logp_tau,
                } => {
                    let mut rng = rng.clone();
                    let (j, lt) =
                        draw_tempered(row, &t.prefix, ex, args.temps[*temp_idx], &mut rng);
                    (
                        j,
                        Kind::Sample {
                            temp_idx: *temp_idx,
                            rng,
                            logp_tau: logp_tau + lt,
                        },
                    )
                }
                Kind::Fixed { seq } => (seq[step], t.kind.clone()),
            };
            // j is never in the prefix for samples; fixed sequences may repeat
            let x = if t.prefix.contains(&j) { mask } else { row[j] };
            let mut prefix = t.prefix.clone();
            prefix.push(j);
            new_tracks.push(Track {
                query: t.query,
                prefix,
                logp: t.logp + (x as f64 - lses[rows_of[r]]),
                kind,
                slot: t.slot,
            });
            parents.push(rows_of[r]);
        }
    }
    // collect
    let mut samples: Vec<Vec<Option<SampleOut>>> = (0..nq)
        .map(|_| vec![None; args.temps.len() * args.num_samples_per_temp])
        .collect();
    let mut fixed_out: Vec<Vec<Option<FixedOut>>> =
        fixed.iter().map(|f| vec![None; f.len()]).collect();
    for t in new_tracks {
        match t.kind {
            Kind::Beam { score } => out[t.query].beams.push(BeamHyp {
                pointer: t.prefix,
                logprob: t.logp,
                score,
            }),
            Kind::Sample {
                temp_idx, logp_tau, ..
            } => {
                samples[t.query][t.slot] = Some((t.prefix, t.logp, temp_idx, logp_tau));
            }
            Kind::Fixed { .. } => fixed_out[t.query][t.slot] = Some((t.prefix, t.logp)),
        }
    }
    for (b, o) in out.iter_mut().enumerate() {
        o.samples = samples[b].drain(..).flatten().collect();
        o.fixed = fixed_out[b].drain(..).flatten().collect();
    }
    Ok(out)
}

fn check_query<B: Backend>(
    pool: &PreparedPool<B>,
    q: &QueryInput<'_>,
    args: &CandidateArgs,
) -> Result<(), CandidateError> {
    if let Some(e) = q.exclude_position {
        if e >= pool.len() {
            return Err(CandidateError::Query {
                query_index: q.query_index,
                msg: format!(
                    "exclude_position {e} out of range for a pool of {}",
                    pool.len()
                ),
            });
        }
    }
    args.validate(pool.len(), q.exclude_position.is_some() as usize)
}

/// Beam search only (no deduplication): for each query the `num_beams` best
/// sequences with their cumulative log-probs and scores, best first.
pub fn beam_search<B: Backend>(
    model: &PointerSelector<B>,
    pool: &PreparedPool<B>,
    queries: &[QueryInput<'_>],
    num_beams: usize,
    shot_num: usize,
) -> Result<Vec<Vec<BeamHyp>>, CandidateError> {
    let args = CandidateArgs {
        num_beams,
        temps: vec![],
        num_samples_per_temp: 0,
        num_random: 0,
        num_retrieval: 0,
        shot_num,
        seed: 0,
    };
    for q in queries {
        check_query(pool, q, &args)?;
    }
    let raw = run_group(model, pool, queries, &args, vec![vec![]; queries.len()])?;
    Ok(raw.into_iter().map(|r| r.beams).collect())
}

/// Deduplicates by position set with priority beam > retrieval > sample >
/// random, keeping first-seen order within each method.
pub fn dedup_candidates(cands: Vec<Candidate>) -> Vec<Candidate> {
    let rank = |m: GenMethod| match m {
        GenMethod::Beam => 0,
        GenMethod::SourceBeam => 1,
        GenMethod::Retrieval => 2,
        GenMethod::Sample => 3,
        GenMethod::Random => 4,
    };
    let mut sorted: Vec<(usize, Candidate)> = cands.into_iter().enumerate().collect();
    sorted.sort_by_key(|(i, c)| (rank(c.gen_method), *i));
    let mut seen = std::collections::HashSet::new();
    sorted
        .into_iter()
        .filter_map(|(_, c)| {
            let mut key = c.positions.clone();
            key.sort_unstable();
            seen.insert(key).then_some(c)
        })
        .collect()
}

fn assemble(raw: RawOut, args: &CandidateArgs, n_retrieval: usize) -> Vec<Candidate> {
    let mut c = Vec::new();
    for (rank, b) in raw.beams.into_iter().enumerate() {
        c.push(Candidate {
            positions: b.pointer,
            gen_method: GenMethod::Beam,
            beam_rank: Some(rank),
            beam_score: Some(b.score),
            logprob_score: b.logprob,
            temperature: None,
            sample_logprob_tempered: None,
        });
    }
    let mut fixed = raw.fixed.into_iter();
    for (p, lp) in fixed.by_ref().take(n_retrieval) {
        c.push(Candidate {
            positions: p,
            gen_method: GenMethod::Retrieval,
            beam_rank: None,
            beam_score: None,
            logprob_score: lp,
            temperature: None,
            sample_logprob_tempered: None,
        });
    }
    for (p, lp, t, lt) in raw.samples {
        c.push(Candidate {
            positions: p,
            gen_method: GenMethod::Sample,
            beam_rank: None,
            beam_score: None,
            logprob_score: lp,
            temperature: Some(args.temps[t]),
            sample_logprob_tempered: Some(lt),
        });
    }
    for (p, lp) in fixed {
        c.push(Candidate {
            positions: p,
            gen_method: GenMethod::Random,
            beam_rank: None,
            beam_score: None,
            logprob_score: lp,
            temperature: None,
            sample_logprob_tempered: None,
        });
    }
    dedup_candidates(c)
}

/// Most logits values held at once (rows x K) before a batch is split.
const MAX_LOGITS: usize = 1 << 24;

/// Candidates for a batch of queries sharing one pool: one batched forward per
/// decoding step for all beams/samples of all queries (split into sub-batches
/// when the logits would exceed 2^24 values; results do not depend on it).
pub fn generate_candidates_batch<B: Backend>(
    model: &PointerSelector<B>,
    pool: &PreparedPool<B>,
    queries: &[QueryInput<'_>],
    args: &CandidateArgs,
) -> Result<Vec<Vec<Candidate>>, CandidateError> {
    for q in queries {
        check_query(pool, q, args)?;
    }
    let per_query = (args.num_beams.max(1)
        + args.temps.len() * args.num_samples_per_temp
        + args.num_random
        + args.num_retrieval)
        .max(1);
    let chunk = (MAX_LOGITS / (per_query * pool.len().max(1))).max(1);
    let mut out = Vec::with_capacity(queries.len());
    for qs in queries.chunks(chunk) {
        let mut fixed = Vec::with_capacity(qs.len());
        let mut n_ret = Vec::with_capacity(qs.len());
        for q in qs {
            let mut f = retrieval_sequences(
                pool,
                q.embedding,
                q.exclude_position,
                args.num_retrieval,
                args.shot_num,
            );
            n_ret.push(f.len());
            let mut rng = query_rng(args.seed, q.query_index, 0);
            f.extend(random_sequences(
                pool.len(),
                q.exclude_position,
                args.num_random,
                args.shot_num,
                &mut rng,
            ));
            fixed.push(f);
        }
        let raw = run_group(model, pool, qs, args, fixed)?;
        out.extend(
            raw.into_iter()
                .zip(n_ret)
                .map(|(r, n)| assemble(r, args, n)),
        );
    }
    Ok(out)
}

/// Candidates when every query has its own pool (`pools[i]` for
/// `queries[i]`, e.g. from a sampler cache).  Prepare the item rows once
/// with [`PointerSelector::prepare_rows`] and gather each pool with
/// [`PointerSelector::pool_from_rows`] (or use [`PointerSelector::prepare_pools`]).
pub fn generate_candidates_per_query_pools<B: Backend>(
    model: &PointerSelector<B>,
    pools: &[&PreparedPool<B>],
    queries: &[QueryInput<'_>],
    args: &CandidateArgs,
) -> Result<Vec<Vec<Candidate>>, CandidateError> {
    if pools.len() != queries.len() {
        return Err(CandidateError::Args(format!(
            "{} pools for {} queries",
            pools.len(),
            queries.len()
        )));
    }
    let mut out = Vec::with_capacity(queries.len());
    for (pool, q) in pools.iter().zip(queries) {
        out.extend(generate_candidates_batch(
            model,
            pool,
            std::slice::from_ref(q),
            args,
        )?);
    }
    Ok(out)
}

/// log π(seq | query) at temperature 1 on the true chain with exclusion, for
/// externally given sequences (e.g. the beam data's own beams); one batched
/// forward per step.
pub fn score_sequences<B: Backend>(
    model: &PointerSelector<B>,
    pool: &PreparedPool<B>,
    query: &QueryInput<'_>,
    seqs: &[Vec<usize>],
) -> Result<Vec<f64>, CandidateError> {
    let k = pool.len();
    for s in seqs {
        if s.is_empty() {
            return Err(CandidateError::Query {
                query_index: query.query_index,
                msg: "empty pointer sequence".into(),
            });
        }
        if let Some(&p) = s
            .iter()
            .find(|&&p| p >= k || Some(p) == query.exclude_position)
        {
            return Err(CandidateError::Query {
                query_index: query.query_index,
                msg: format!("sequence {s:?}: position {p} is out of range (pool of {k}) or the excluded query position"),
            });
        }
    }
    let qs: Vec<&[f32]> = seqs.iter().map(|_| query.embedding).collect();
    let logits = model.teacher_forced_logits_batch(pool, &qs, seqs)?;
    Ok(logits
        .iter()
        .zip(seqs)
        .map(|(steps, s)| {
            steps
                .iter()
                .zip(s)
                .map(|(row, &j)| {
                    crate::models::pointer_selector::log_softmax_at(row, j, query.exclude_position)
                })
                .sum()
        })
        .collect())
}

/// Throughput of [`generate_candidates_batch`] (one thread, default
/// backend) with random weights (d_model, hidden, layers), a pool of `k`
/// random rows and `n_queries` queries in batches of `batch`; pool
/// preparation is timed separately.
pub fn bench_candidates(
    d_model: usize,
    hidden: usize,
    layers: usize,
    k: usize,
    n_queries: usize,
    batch: usize,
    args: &CandidateArgs,
) -> Result<BenchResult, CandidateError> {
    type Bk = crate::models::pointer_selector::DefaultBackend;
    let device = Default::default();
    let model = PointerSelectorConfig::new(d_model, hidden, layers).init::<Bk>(&device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let data: Vec<f32> = (0..k * d_model)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    let pool_m = crate::tensor_io::Matrix {
        rows: k,
        cols: d_model,
        data,
    };
    let queries: Vec<Vec<f32>> = (0..n_queries)
        .map(|_| (0..d_model).map(|_| rng.random::<f32>() - 0.5).collect())
        .collect();
    let start = std::time::Instant::now();
    let pool = model.prepare_pool(&pool_m)?;
    let prepare_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let inputs: Vec<QueryInput<'_>> = queries
        .iter()
        .enumerate()
        .map(|(i, e)| QueryInput {
            query_index: i as u64,
            embedding: e,
            exclude_position: None,
        })
        .collect();
    for b in inputs.chunks(batch.max(1)) {
        generate_candidates_batch(&model, &pool, b, args)?;
    }
    Ok(BenchResult {
        prepare_s,
        queries_per_s: n_queries as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Result of [`bench_candidates`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchResult {
    /// seconds to prepare the pool (once per pool)
    pub prepare_s: f64,
    /// queries per second of candidate generation, pool preparation excluded
    pub queries_per_s: f64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::pointer_selector::DefaultBackend as Bk;
    use crate::tensor_io::{self, Matrix};
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/pointer_selector")
            .join(name)
    }

    fn model() -> PointerSelector<Bk> {
        PointerSelector::load(&fixture("sft.ckpt"), 1, &Default::default()).unwrap()
    }

    fn expected() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
    }

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    }

    fn all_rows() -> Matrix {
        tensor_io::load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap()
    }

    fn shared() -> Matrix {
        tensor_io::load_matrix(&fixture("candidate_embeddings.pt")).unwrap()
    }

    fn args() -> CandidateArgs {
        CandidateArgs {
            num_beams: 5,
            temps: vec![1.0, 1.3],
            num_samples_per_temp: 2,
            num_random: 1,
            num_retrieval: 2,
            shot_num: 2,
            seed: 42,
        }
    }

    #[test]
    fn beam_search_parity_and_differs_from_original() {
        check_beam_search_parity(&model());
    }

    /// Beams of every fixture query identical to the reference (log-probs
    /// and scores within 1e-5), and different from the ungated original's
    /// (any backend).
    pub(crate) fn check_beam_search_parity<B: Backend>(m: &PointerSelector<B>) {
        let exp = expected();
        let all = all_rows();
        let shared_pool = m.prepare_pool(&shared()).unwrap();
        let mut differs = 0;
        for (section, is_shared) in [("shared_pool", true), ("per_query_pool", false)] {
            for block in exp[section]["queries"].as_array().unwrap() {
                let qid = block["query_id"].as_u64().unwrap() as usize;
                let own;
                let pool = if is_shared {
                    &shared_pool
                } else {
                    own = m
                        .prepare_pool(
                            &all.select_rows(&usizes(&block["candidate_global_ids"]))
                                .unwrap(),
                        )
                        .unwrap();
                    &own
                };
                let q = QueryInput {
                    query_index: qid as u64,
                    embedding: all.row(qid),
                    exclude_position: block["exclude_position"].as_u64().map(|x| x as usize),
                };
                for (key, orig, shot) in [
                    (
                        "beam_search_shot2",
                        "original_beam_search_without_gate_shot2",
                        2,
                    ),
                    (
                        "beam_search_shot3",
                        "original_beam_search_without_gate_shot3",
                        3,
                    ),
                ] {
                    let got = beam_search(m, pool, &[q], 5, shot).unwrap().remove(0);
                    let want = block[key]["beams"].as_array().unwrap();
                    assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(want) {
                        assert_eq!(g.pointer, usizes(&w["pointer"]), "{section} q{qid} {key}");
                        assert!((g.logprob - w["logprob"].as_f64().unwrap()).abs() <= 1e-5);
                        assert!((g.score - w["score"].as_f64().unwrap()).abs() <= 1e-5);
                    }
                    // logprob_score of the same sequences through score_sequences
                    let seqs: Vec<Vec<usize>> = got.iter().map(|b| b.pointer.clone()).collect();
                    let sc = score_sequences(m, pool, &q, &seqs).unwrap();
                    for (s, g) in sc.iter().zip(&got) {
                        assert!((s - g.logprob).abs() <= 1e-5);
                    }
                    let o: Vec<Vec<usize>> = block[orig]["beams"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| usizes(&b["pointer"]))
                        .collect();
                    if !block[orig]["same_as_gated"].as_bool().unwrap_or(false) {
                        assert_ne!(
                            seqs, o,
                            "{section} q{qid}: must differ from the ungated original"
                        );
                        differs += 1;
                    }
                }
            }
        }
        assert!(differs > 0);
    }

    #[test]
    fn candidates_are_consistent_and_deduplicated() {
        let m = model();
        let all = all_rows();
        let pool = m.prepare_pool(&shared()).unwrap();
        let a = args();
        let qs: Vec<QueryInput> = [0usize, 20, 22, 5]
            .iter()
            .map(|&i| QueryInput {
                query_index: i as u64,
                embedding: all.row(i),
                exclude_position: (20..84).contains(&i).then(|| i - 20),
            })
            .collect();
        let out = generate_candidates_batch(&m, &pool, &qs, &a).unwrap();
        let order = |g: GenMethod| match g {
            GenMethod::Beam => 0,
            GenMethod::Retrieval => 1,
            GenMethod::Sample => 2,
            GenMethod::Random => 3,
            GenMethod::SourceBeam => 4,
        };
        for (q, cands) in qs.iter().zip(&out) {
            let mut sets = std::collections::HashSet::new();
            let mut last = 0;
            for c in cands {
                assert_eq!(c.positions.len(), 2);
                assert!(c
                    .positions
                    .iter()
                    .all(|&p| Some(p) != q.exclude_position && p < 64));
                let mut s = c.positions.clone();
                s.sort();
                assert!(sets.insert(s), "duplicate set");
                assert!(order(c.gen_method) >= last);
                last = order(c.gen_method);
                let lp =
                    score_sequences(&m, &pool, q, std::slice::from_ref(&c.positions)).unwrap()[0];
                assert!((lp - c.logprob_score).abs() <= 1e-6, "{:?}", c);
                match c.gen_method {
                    GenMethod::Beam => assert!(c.beam_rank.is_some() && c.beam_score.is_some()),
                    GenMethod::Sample => {
                        assert!(
                            c.temperature.is_some() && c.sample_logprob_tempered.unwrap() <= 0.0
                        )
                    }
                    _ => assert!(c.temperature.is_none() && c.beam_rank.is_none()),
                }
            }
            assert!(cands.iter().any(|c| c.gen_method == GenMethod::Retrieval));
        }
    }

    #[test]
    fn determinism_independent_of_batching() {
        let m = model();
        let all = all_rows();
        let pool = m.prepare_pool(&shared()).unwrap();
        let a = args();
        let mk = |i: usize| QueryInput {
            query_index: i as u64,
            embedding: all.row(i),
            exclude_position: None,
        };
        let batch = generate_candidates_batch(&m, &pool, &[mk(1), mk(3), mk(4)], &a).unwrap();
        let single = generate_candidates_batch(&m, &pool, &[mk(4)], &a).unwrap();
        let rev = generate_candidates_batch(&m, &pool, &[mk(4), mk(1)], &a).unwrap();
        assert_eq!(batch[2], single[0]);
        assert_eq!(batch[2], rev[0]);
        assert_eq!(batch[0], rev[1]);
        // another seed changes the samples
        let other = generate_candidates_batch(
            &m,
            &pool,
            &[mk(4)],
            &CandidateArgs {
                seed: 43,
                num_samples_per_temp: 6,
                ..a.clone()
            },
        )
        .unwrap();
        let again = generate_candidates_batch(
            &m,
            &pool,
            &[mk(4)],
            &CandidateArgs {
                seed: 43,
                num_samples_per_temp: 6,
                ..a
            },
        )
        .unwrap();
        assert_eq!(other, again);
    }

    #[test]
    fn sampling_first_step_matches_tempered_softmax() {
        let m = model();
        let all = all_rows();
        let pool = m.prepare_pool(&shared()).unwrap();
        let st = m.query_states(&pool, &[all.row(22)]).unwrap();
        let row = m.step_logits(&pool, &st);
        let ex = Some(2usize);
        let n = 20_000;
        for tau in [1.0f64, 1.3] {
            let mut counts = vec![0usize; 64];
            for i in 0..n {
                let mut rng = query_rng(9, i as u64, 1);
                let (j, lt) = draw_tempered(&row, &[], ex, tau, &mut rng);
                assert!(Some(j) != ex && lt <= 0.0);
                counts[j] += 1;
            }
            let m_ = row
                .iter()
                .enumerate()
                .filter(|(j, _)| Some(*j) != ex)
                .map(|(_, x)| *x as f64)
                .fold(f64::MIN, f64::max);
            let w: Vec<f64> = row
                .iter()
                .enumerate()
                .map(|(j, x)| {
                    if Some(j) == ex {
                        0.0
                    } else {
                        ((*x as f64 - m_) / tau).exp()
                    }
                })
                .collect();
            let tot: f64 = w.iter().sum();
            let mut chi2 = 0.0;
            let mut dof = 0;
            for j in 0..64 {
                let p = w[j] / tot;
                let f = counts[j] as f64 / n as f64;
                assert!(
                    (f - p).abs() <= 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3,
                    "tau {tau} pos {j}: {f} vs {p}"
                );
                if p * n as f64 >= 5.0 {
                    chi2 += (counts[j] as f64 - p * n as f64).powi(2) / (p * n as f64);
                    dof += 1;
                }
            }
            // generous bound: mean dof, sd sqrt(2 dof)
            assert!(
                chi2 < dof as f64 + 6.0 * (2.0 * dof as f64).sqrt() + 10.0,
                "chi2 {chi2} dof {dof}"
            );
            assert_eq!(counts[2], 0);
        }
    }

    #[test]
    fn retrieval_follows_the_original() {
        // 1-D-ish embeddings with known cosine ranking vs query [1, 0]
        let rows = [
            [0.0f32, 1.0],
            [0.8, 0.6],
            [-1.0, 0.0],
            [1.0, 0.05],
            [0.6, 0.8],
        ];
        let m = PointerSelectorConfig::new(2, 2, 1)
            .init::<Bk>(&Default::default())
            .unwrap();
        let pool = m
            .prepare_pool(&Matrix {
                rows: 5,
                cols: 2,
                data: rows.concat(),
            })
            .unwrap();
        // ranking: 3, 1, 4, 0, 2
        let r = retrieval_sequences(&pool, &[1.0, 0.0], None, 4, 2);
        assert_eq!(r, vec![vec![3, 1], vec![1, 4], vec![4, 0], vec![0, 2]]);
        let r = retrieval_sequences(&pool, &[1.0, 0.0], Some(1), 3, 2);
        assert_eq!(r, vec![vec![3, 4], vec![4, 0], vec![0, 2]]);
    }

    #[test]
    fn top_positions_ties_and_exclusion() {
        let row = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(top_positions(&row, None, 2), vec![1, 2]);
        assert_eq!(top_positions(&row, Some(1), 3), vec![2, 4, 3]);
        assert_eq!(top_positions(&row, None, 9), vec![1, 2, 4, 3, 0]);
        assert!(top_positions(&row, None, 0).is_empty());
    }

    #[test]
    fn dedup_priority_and_order() {
        let c = |p: Vec<usize>, g: GenMethod| Candidate {
            positions: p,
            gen_method: g,
            beam_rank: None,
            beam_score: None,
            logprob_score: 0.0,
            temperature: None,
            sample_logprob_tempered: None,
        };
        let out = dedup_candidates(vec![
            c(vec![1, 2], GenMethod::Beam),
            c(vec![2, 1], GenMethod::Beam),
            c(vec![3, 4], GenMethod::Sample),
            c(vec![4, 3], GenMethod::Retrieval),
            c(vec![5, 6], GenMethod::Random),
            c(vec![6, 5], GenMethod::Sample),
            c(vec![7, 8], GenMethod::Sample),
        ]);
        let got: Vec<(Vec<usize>, GenMethod)> = out
            .into_iter()
            .map(|c| (c.positions, c.gen_method))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![1, 2], GenMethod::Beam),
                (vec![4, 3], GenMethod::Retrieval),
                (vec![6, 5], GenMethod::Sample),
                (vec![7, 8], GenMethod::Sample),
            ]
        );
        assert_eq!(GenMethod::SourceBeam.as_str(), "source_beam");
    }

    #[test]
    fn bad_arguments() {
        let m = model();
        let all = all_rows();
        let pool = m.prepare_pool(&shared()).unwrap();
        let q = [QueryInput {
            query_index: 20,
            embedding: all.row(20),
            exclude_position: Some(0),
        }];
        let run = |a: CandidateArgs| {
            generate_candidates_batch(&m, &pool, &q, &a)
                .unwrap_err()
                .to_string()
        };
        assert!(run(CandidateArgs {
            temps: vec![1.0, 0.0],
            ..args()
        })
        .contains("temperature"));
        assert!(run(CandidateArgs {
            temps: vec![-1.0],
            ..args()
        })
        .contains("temperature"));
        assert!(run(CandidateArgs {
            num_beams: 64,
            ..args()
        })
        .contains("num_beams 64"));
        assert!(run(CandidateArgs {
            shot_num: 0,
            ..args()
        })
        .contains("shot_num"));
        assert!(run(CandidateArgs {
            shot_num: 64,
            ..args()
        })
        .contains("shot_num 64"));
        let bad = [QueryInput {
            exclude_position: Some(64),
            ..q[0]
        }];
        assert!(generate_candidates_batch(&m, &pool, &bad, &args()).is_err());
        let short = [QueryInput {
            embedding: &all.row(20)[..10],
            ..q[0]
        }];
        assert!(matches!(
            generate_candidates_batch(&m, &pool, &short, &args()),
            Err(CandidateError::Model(
                PointerSelectorError::DimMismatch { .. }
            ))
        ));
        assert!(score_sequences(&m, &pool, &q[0], &[vec![0, 1]]).is_err());
    }

    #[test]
    fn per_query_pools_match_single_pool_runs() {
        let m = model();
        let all = all_rows();
        let cache: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("sampler_cache.json")).unwrap())
                .unwrap();
        let ids = [0usize, 1, 3];
        let mats: Vec<Matrix> = ids
            .iter()
            .map(|i| all.select_rows(&usizes(&cache[i.to_string()])).unwrap())
            .collect();
        let pools = m.prepare_pools(&mats.iter().collect::<Vec<_>>()).unwrap();
        // the same pools gathered from once-prepared item rows
        let rows = m.prepare_rows(&all).unwrap();
        for (j, &i) in ids.iter().enumerate() {
            let gathered = m
                .pool_from_rows(&rows, &usizes(&cache[i.to_string()]))
                .unwrap();
            let q = [all.row(i)];
            let a = m.query_states(&gathered, &q).unwrap().data;
            let b = m.query_states(&pools[j], &q).unwrap().data;
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
        }
        assert!(m.pool_from_rows(&rows, &[300]).is_err());
        let qs: Vec<QueryInput> = ids
            .iter()
            .zip(&mats)
            .map(|(&i, _)| {
                let g = usizes(&cache[i.to_string()]);
                QueryInput {
                    query_index: i as u64,
                    embedding: all.row(i),
                    exclude_position: g.iter().position(|&x| x == i),
                }
            })
            .collect();
        let out = generate_candidates_per_query_pools(
            &m,
            &pools.iter().collect::<Vec<_>>(),
            &qs,
            &args(),
        )
        .unwrap();
        for (j, q) in qs.iter().enumerate() {
            let single = m.prepare_pool(&mats[j]).unwrap();
            let s =
                generate_candidates_batch(&m, &single, std::slice::from_ref(q), &args()).unwrap();
            assert_eq!(out[j].len(), s[0].len());
            for (a, b) in out[j].iter().zip(&s[0]) {
                assert_eq!(a.positions, b.positions);
                assert!((a.logprob_score - b.logprob_score).abs() < 1e-5);
            }
        }
    }

    /// Run with `cargo test --release -p leverflow-operators --lib bench_candidates_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_candidates_throughput() {
        let a = CandidateArgs {
            num_beams: 5,
            temps: vec![1.0, 1.3],
            num_samples_per_temp: 2,
            num_random: 1,
            num_retrieval: 0,
            shot_num: 2,
            seed: 1,
        };
        let q64 = bench_candidates(512, 256, 3, 64, 2048, 256, &a).unwrap();
        println!("K=64: {q64:?}");
        let q9k = bench_candidates(512, 256, 3, 9009, 128, 64, &a).unwrap();
        println!("K=9009: {q9k:?}");
        // per-query pools of 64 rows drawn from 5,000 items
        let device = Default::default();
        let model = PointerSelectorConfig::new(512, 256, 3)
            .init::<Bk>(&device)
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 256;
        let items = Matrix {
            rows: 5000,
            cols: 512,
            data: (0..5000 * 512).map(|_| rng.random::<f32>() - 0.5).collect(),
        };
        let qv: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..512).map(|_| rng.random::<f32>() - 0.5).collect())
            .collect();
        let t = std::time::Instant::now();
        let rows = model.prepare_rows(&items).unwrap();
        let prep = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let pools: Vec<PreparedPool<Bk>> = (0..n)
            .map(|i| {
                let pos: Vec<usize> = (0..64).map(|j| (i * 131 + j * 17) % 5000).collect();
                model.pool_from_rows(&rows, &pos).unwrap()
            })
            .collect();
        let qs: Vec<QueryInput> = qv
            .iter()
            .enumerate()
            .map(|(i, e)| QueryInput {
                query_index: i as u64,
                embedding: e,
                exclude_position: None,
            })
            .collect();
        generate_candidates_per_query_pools(&model, &pools.iter().collect::<Vec<_>>(), &qs, &a)
            .unwrap();
        println!(
            "per-query K=64: prepare_rows {prep:.3}s for 5000 items, {:.0} queries/s (pool gathers included)",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
}
