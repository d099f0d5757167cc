//! Progress reporting on stderr: a bar (indicatif), JSON lines, or nothing.
//!
//! Stages bump shared atomic [`Counters`]; a reporter thread renders them a
//! few times a second, so workers never block on the terminal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters shared by every worker of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Queries whose record is finished.
    pub queries_done: AtomicU64,
    /// Candidates finished.
    pub candidates_done: AtomicU64,
    /// Prompts sent to the VQA model.
    pub vqa_calls: AtomicU64,
    /// Queries expected (0 if unknown).
    pub queries_total: AtomicU64,
    /// Queries whose stored record was reused.
    pub queries_reused: AtomicU64,
    /// Answers served from the store.
    pub vqa_cached: AtomicU64,
    /// Candidate sets served from the store.
    pub candidate_sets_cached: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStyle {
    /// An indicatif bar.
    Bar,
    /// One JSON object per line.
    Json,
    /// Nothing.
    None,
}

impl ProgressStyle {
    /// From `--progress` and `--quiet`.
    pub fn parse(progress: &str, quiet: bool) -> anyhow::Result<Self> {
        if quiet {
            return Ok(Self::None);
        }
        match progress {
            "bar" => Ok(Self::Bar),
            "json" => Ok(Self::Json),
            "none" => Ok(Self::None),
            other => anyhow::bail!("--progress {other}: expected bar, json or none"),
        }
    }
}

/// A phase message ("loading model ...") in the chosen style.
pub fn phase(style: ProgressStyle, message: &str) {
    match style {
        ProgressStyle::Bar => eprintln!("leverflow: {message}"),
        ProgressStyle::Json => eprintln!(
            "{}",
            serde_json::json!({"event": "phase", "message": message})
        ),
        ProgressStyle::None => {}
    }
}

/// The running reporter; [`Reporter::finish`] stops it.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting `counters` in `style` under the label `stage`.
    pub fn start(style: ProgressStyle, counters: Arc<Counters>, stage: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = match style {
            ProgressStyle::None => None,
            _ => {
                let stop = Arc::clone(&stop);
                let stage = stage.to_string();
                Some(std::thread::spawn(move || {
                    report(style, &counters, &stop, &stage)
                }))
            }
        };
        Self { stop, handle }
    }

    /// Stops the reporter after a final update.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn report(style: ProgressStyle, c: &Counters, stop: &AtomicBool, stage: &str) {
    let start = Instant::now();
    let bar = (style == ProgressStyle::Bar).then(|| {
        let total = c.queries_total.load(Ordering::Relaxed);
        let bar = if total > 0 {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::new_spinner()
        };
        let template = if total > 0 {
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} queries {msg} ETA {eta}"
        } else {
            "{prefix} [{elapsed_precise}] {spinner} {pos} queries {msg}"
        };
        if let Ok(s) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(s);
        }
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
        bar.set_prefix(stage.to_string());
        bar
    });
    let mut last_json = Instant::now() - Duration::from_secs(10);
    loop {
        let done = stop.load(Ordering::Relaxed);
        let queries = c.queries_done.load(Ordering::Relaxed);
        let candidates = c.candidates_done.load(Ordering::Relaxed);
        let calls = c.vqa_calls.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        match (&bar, style) {
            (Some(bar), _) => {
                bar.set_position(queries);
                bar.set_message(format!(
                    "| {candidates} candidates | {calls} VQA calls ({:.1}/s)",
                    calls as f64 / secs
                ));
            }
            (None, ProgressStyle::Json)
                if done || last_json.elapsed() >= Duration::from_secs(1) =>
            {
                last_json = Instant::now();
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "event": "progress", "stage": stage, "queries_done": queries,
                        "queries_total": c.queries_total.load(Ordering::Relaxed),
                        "candidates_done": candidates, "vqa_calls": calls,
                        "vqa_calls_per_s": calls as f64 / secs, "elapsed_s": secs,
                    })
                );
            }
            _ => {}
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(bar) = bar {
        bar.finish();
    }
}
