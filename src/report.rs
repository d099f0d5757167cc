//! The human summary a run prints on stdout.

use leverflow_operators::config::OutputFormat;
use leverflow_operators::outputs::Summary;
use leverflow_operators::pipeline::RunSummary;

/// Prints the summary of a finished `generate` or `candidates` run.
pub fn print_run(run: &RunSummary) {
    if let Some(c) = &run.cluster {
        if c.dataset.is_none() {
            // Not process 0: it writes nothing but part files.
            return;
        }
    }
    let (s, t) = (&run.summary, &run.timings);
    print_counts(s, run.with_vqa, Some(t.dataflow_s));
    let i = &s.incremental;
    println!(
        "  incremental        {} added, {} removed, {} changed, {} reused; from the store: {} answers, {} candidate sets",
        i.queries_added,
        i.queries_removed,
        i.queries_changed,
        i.queries_reused,
        i.vqa_cached,
        i.candidate_sets_cached
    );
    if i.output_segments > 0 {
        println!(
            "  outputs            {} of {} segments copied from the previous outputs",
            i.output_segments_copied, i.output_segments
        );
    }
    println!(
        "  time               {:.2}s (load {:.2}s, dataflow {:.2}s, write {:.2}s); {:.0} candidates/s",
        t.total_s,
        t.load_s,
        t.dataflow_s,
        t.write_s,
        s.candidates as f64 / t.dataflow_s.max(1e-9)
    );
    for (f, path) in &run.outputs {
        match f {
            OutputFormat::Json => println!("  JSON               {}", path.display()),
            OutputFormat::Parquet => println!("  Parquet            {}", path.display()),
        }
    }
    if let Some(d) = &run.delta {
        println!("  delta Parquet      {}", d.parquet.display());
        println!("  retracted ids      {}", d.retracted.display());
    }
    if let Some((dir, parts)) = run.cluster.as_ref().and_then(|c| c.dataset.as_ref()) {
        println!(
            "  Parquet dataset    {} ({parts} part files)",
            dir.display()
        );
    }
}

/// Prints the counts part of the summary (also `leverflow stats`);
/// `dataflow_s`: the dataflow's seconds, for the call rate.
pub fn print_counts(s: &Summary, with_vqa: bool, dataflow_s: Option<f64>) {
    println!("leverflow summary");
    println!("  queries            {}", s.queries);
    if s.skipped > 0 {
        println!("  skipped queries    {} (missing images)", s.skipped);
    }
    println!("  candidates         {}", s.candidates);
    for (k, m) in &s.by_method {
        if with_vqa {
            println!(
                "    {k:<12} {:>8} candidates  mean accuracy {:.3}  correct {}",
                m.candidates,
                if m.candidates > 0 {
                    m.acc_sum / m.candidates as f64
                } else {
                    0.0
                },
                m.correct
            );
        } else {
            println!("    {k:<12} {:>8} candidates", m.candidates);
        }
    }
    if !with_vqa || s.queries == 0 {
        return;
    }
    println!(
        "  queries with a correct candidate  {:.1}%",
        100.0 * s.queries_with_correct as f64 / s.queries as f64
    );
    if let (Some([p10, p50, p90]), Some(mean)) = (s.reward_quantiles(), s.reward_mean()) {
        println!("  reward             mean {mean:.3}  p10 {p10:.3}  p50 {p50:.3}  p90 {p90:.3}");
    }
    match dataflow_s {
        Some(secs) => println!(
            "  VQA calls          {} ({:.1}/s)",
            s.vqa_calls,
            s.vqa_calls as f64 / secs.max(1e-9)
        ),
        None => println!("  VQA calls          {}", s.vqa_calls),
    }
    let get = |k: &str| s.backend.get(k).and_then(|v| v.as_f64());
    if let (Some(enc), Some(hit)) = (get("images_encoded"), get("images_cached")) {
        let total = (enc + hit).max(1.0);
        println!(
            "  vision cache       {enc:.0} images encoded, {hit:.0} served from cache ({:.1}% hits); {:.0} prompt tokens prefilled",
            100.0 * hit / total,
            get("tokens_prefilled").unwrap_or(0.0)
        );
    }
}
