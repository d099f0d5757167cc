//! `leverflow`: builds reinforcement-learning data for in-context example
//! selection in VQA as a timely dataflow.
//!
//! This binary is the face of the library `leverflow-operators`: flags
//! ([`cli`], `--config` YAML in [`config`]) become a typed `RunConfig`,
//! subcommands are dispatched here, and progress ([`progress`]) and
//! summaries ([`report`]) are printed; all the work is the library's.

mod cli;
mod config;
mod demo;
mod errors;
mod merge;
mod plot;
mod progress;
mod report;
mod stats;

use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use leverflow_operators::pipeline::{Job, Pipeline};

fn main() {
    // Diagnostics for developers and bug reports: `LEVERFLOW_LOG=debug`
    // (any `tracing` filter) prints them on stderr; silent by default.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("LEVERFLOW_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // colours only on a terminal, not in a redirected log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    tracing::debug!("started");
    if let Err(e) = real_main() {
        eprintln!("error: {}", errors::describe(&e));
        std::process::exit(1);
    }
    tracing::debug!("finished");
}

fn real_main() -> Result<()> {
    let args = config::expand_config_args(std::env::args().collect())?;
    let cli = cli::Cli::parse_from(args);
    match cli.command {
        cli::Command::Generate(a) => run_job(*a, Job::Generate),
        cli::Command::Candidates(a) => run_job(*a, Job::Candidates),
        cli::Command::Score(a) => score(&a),
        cli::Command::Vqa(a) => vqa(&a),
        cli::Command::Bench(a) => bench(&a),
        cli::Command::Stats(a) => stats::run(&a.output, a.json, a.plot.as_deref()),
        cli::Command::Merge(a) => merge::run(&a),
    }
}

/// `generate` and `candidates`: the pipeline with the parsed settings.
fn run_job(args: cli::GenerateArgs, job: Job) -> Result<()> {
    let mut config = args.into_config()?;
    if config.demo {
        demo::apply(&mut config, job)?;
    }
    if config.print_config {
        print!("{}", serde_yaml::to_string(&config.recorded())?);
        return Ok(());
    }
    let style = progress::ProgressStyle::of(config.progress, config.quiet);
    let run = Pipeline::new(config, job)
        .with_progress(Arc::new(progress::Terminal::new(style)))
        .run()?;
    if run.cluster.as_ref().is_some_and(|c| c.dataset.is_none()) {
        if style != progress::ProgressStyle::None {
            let process = run.cluster.as_ref().map_or(0, |c| c.process);
            eprintln!("process {process}: done; process 0 writes the manifest and the JSON");
        }
        return Ok(());
    }
    report::print_run(&run);
    Ok(())
}

/// `leverflow score`: the official accuracy of a results file.
fn score(a: &cli::ScoreArgs) -> Result<()> {
    let index =
        leverflow_operators::accuracy::load_questions_annotations(&a.questions, &a.annotations)?;
    let report = leverflow_operators::accuracy::score_predictions(&index, &a.predictions)?;
    let full = report.to_json();
    let out = serde_json::json!({"overall": full["overall"], "perQuestion": full["perQuestion"]});
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// `leverflow vqa`: answers a request file, printing one JSON line per request.
fn vqa(a: &cli::VqaArgs) -> Result<()> {
    use leverflow_operators::backends::{openflamingo, qwen2_5_vl, request};
    let requests = request::read_requests(&a.request)?;
    let device = a
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", a.device))?;
    let hub =
        leverflow_operators::models::hub::HubSettings::from_env(a.revision.as_deref(), a.offline);
    let lines = if openflamingo::is_openflamingo(&a.vqa_model) {
        openflamingo::answer_requests(&a.vqa_model, &hub, device, &requests)?
    } else {
        qwen2_5_vl::answer_requests(&a.vqa_model, &hub, device, &requests)?
    };
    for line in lines {
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

/// `leverflow bench`: the library's benchmarks, run on this binary.
fn bench(a: &cli::BenchArgs) -> Result<()> {
    let settings = leverflow_operators::bench::BenchSettings {
        pool: a.pool,
        queries: a.queries,
        reps: a.reps,
        workers: a.workers,
        vqa_model: a.vqa_model.clone(),
        batch_size: a.batch_size,
        synthetic_3b_layers: a.synthetic_3b_layers,
        synthetic: a.synthetic,
        batch_only: a.batch_only,
        vision_cache_mb: a.vision_cache_mb,
        device: a
            .device
            .parse()
            .map_err(|e| anyhow::anyhow!("--device {}: {e}", a.device))?,
        keep_dir: a.keep_dir.clone(),
        exe: std::env::current_exe()?,
        repo: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        openai: leverflow_operators::bench::openai::OpenAiBench {
            base_url: a.openai_base_url.clone(),
            model: a.openai_model.clone(),
            concurrency: a.concurrency.clone(),
        },
    };
    Ok(leverflow_operators::bench::run(&a.what, &settings)?)
}
