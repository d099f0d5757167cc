//! `leverflow bench`: the benchmarks whose medians go into BENCHMARKS.md.
//!
//! Speed targets are checked here, never by timed tests. Each benchmark runs
//! its workload `reps` times and prints one JSON line with the median, the
//! min/max and the throughput at the median.

use std::time::Instant;

/// Times `work` `reps` times (after one warm-up run) and returns the seconds
/// of each run.
pub fn time_runs<F: FnMut() -> anyhow::Result<()>>(
    reps: usize,
    mut work: F,
) -> anyhow::Result<Vec<f64>> {
    work()?;
    let mut secs = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        work()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    Ok(secs)
}

/// Median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints a benchmark result: `items` units of work per run.
pub fn report(name: &str, unit: &str, items: f64, secs: &[f64], extra: serde_json::Value) {
    let med = median(secs);
    let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = secs.iter().copied().fold(0.0, f64::max);
    let mut line = serde_json::json!({
        "bench": name,
        "reps": secs.len(),
        "median_s": med,
        "min_s": min,
        "max_s": max,
        format!("{unit}_per_s"): items / med,
        "items_per_run": items,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
