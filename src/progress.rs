//! Progress reporting on stderr: a bar (indicatif), JSON lines, or nothing.
//!
//! Stages bump shared atomic [`Counters`]; a reporter thread renders them a
//! few times a second, so workers never block on the terminal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use leverflow_operators::config::ProgressMode;
pub use leverflow_operators::pipeline::Counters;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    pub fn of(progress: ProgressMode, quiet: bool) -> Self {
        match (quiet, progress) {
            (true, _) | (_, ProgressMode::None) => Self::None,
            (_, ProgressMode::Bar) => Self::Bar,
            (_, ProgressMode::Json) => Self::Json,
        }
    }
}

/// A run's progress on stderr, in a [`ProgressStyle`]: phase lines, and a
/// reporter thread while the dataflow runs.
pub struct Terminal {
    style: ProgressStyle,
    reporter: Mutex<Option<Reporter>>,
}

impl Terminal {
    /// Progress in `style`.
    pub fn new(style: ProgressStyle) -> Self {
        Self {
            style,
            reporter: Mutex::new(None),
        }
    }
}

impl leverflow_operators::pipeline::Progress for Terminal {
    fn phase(&self, message: &str) {
        phase(self.style, message);
    }

    fn started(&self, counters: Arc<Counters>, job: &str) {
        if let Ok(mut r) = self.reporter.lock() {
            *r = Some(Reporter::start(self.style, counters, job));
        }
    }

    fn finished(&self) {
        if let Some(r) = self.reporter.lock().ok().and_then(|mut r| r.take()) {
            r.finish();
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
        // A server backend: requests in flight and answers received.
        let remote = c.vqa_remote.get().map(|g| {
            (
                g.in_flight.load(Ordering::Relaxed),
                g.answered.load(Ordering::Relaxed),
            )
        });
        match (&bar, style) {
            (Some(bar), _) => {
                bar.set_position(queries);
                let server = remote.map_or(String::new(), |(flying, answered)| {
                    format!(
                        " | {flying} in flight, {:.1} answers/s",
                        answered as f64 / secs
                    )
                });
                bar.set_message(format!(
                    "| {candidates} candidates | {calls} VQA calls ({:.1}/s){server}",
                    calls as f64 / secs
                ));
            }
            (None, ProgressStyle::Json)
                if done || last_json.elapsed() >= Duration::from_secs(1) =>
            {
                last_json = Instant::now();
                let mut line = serde_json::json!({
                    "event": "progress", "stage": stage, "queries_done": queries,
                    "queries_total": c.queries_total.load(Ordering::Relaxed),
                    "candidates_done": candidates, "vqa_calls": calls,
                    "vqa_calls_per_s": calls as f64 / secs, "elapsed_s": secs,
                });
                if let (Some((flying, answered)), Some(m)) = (remote, line.as_object_mut()) {
                    m.insert("requests_in_flight".into(), flying.into());
                    m.insert("requests_answered".into(), answered.into());
                    m.insert("answers_per_s".into(), (answered as f64 / secs).into());
                }
                eprintln!("{line}");
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
