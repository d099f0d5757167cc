//! `leverflow`: builds reinforcement-learning data for in-context example
//! selection in VQA as a timely dataflow.
//!
//! This binary is the edge: command-line parsing ([`cli`]), `--config` YAML
//! ([`config`]), run orchestration ([`generate`]), VQA backends
//! ([`backends`], [`qwen`]), progress ([`progress`]) and benchmarks
//! ([`bench`]); the stages themselves live in `leverflow-operators`.

mod backends;
mod bench;
mod benches;
mod cli;
mod config;
mod demo;
mod generate;
mod merge;
mod plot;
mod progress;
mod qwen;
mod stats;

use anyhow::Result;
use clap::Parser;

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
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    tracing::debug!("finished");
}

fn real_main() -> Result<()> {
    let args = config::expand_config_args(std::env::args().collect())?;
    let cli = cli::Cli::parse_from(args);
    match cli.command {
        cli::Command::Generate(a) => run_job(*a, generate::Job::Generate),
        cli::Command::Candidates(a) => run_job(*a, generate::Job::Candidates),
        cli::Command::Score(a) => score(&a),
        cli::Command::Vqa(a) => qwen::run_vqa_command(&a),
        cli::Command::Bench(a) => benches::run(&a),
        cli::Command::Stats(a) => stats::run(&a.output, a.json, a.plot.as_deref()),
        cli::Command::Merge(a) => merge::run(&a),
    }
}

fn run_job(mut args: cli::GenerateArgs, job: generate::Job) -> Result<()> {
    if args.demo {
        demo::apply(&mut args, job)?;
    }
    if args.print_config {
        print!("{}", serde_yaml::to_string(&args)?);
        return Ok(());
    }
    generate::run(args, job)
}

fn score(a: &cli::ScoreArgs) -> Result<()> {
    let index =
        leverflow_operators::accuracy::load_questions_annotations(&a.questions, &a.annotations)?;
    let report = leverflow_operators::accuracy::score_predictions(&index, &a.predictions)?;
    let full = report.to_json();
    let out = serde_json::json!({"overall": full["overall"], "perQuestion": full["perQuestion"]});
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
