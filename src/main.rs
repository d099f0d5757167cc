//! `leverflow`: builds reinforcement-learning data for in-context example
//! selection in VQA as a timely dataflow.
//!
//! This binary is the edge: command-line parsing ([`cli`]), `--config` YAML
//! ([`config`]), run orchestration ([`generate`]), progress and summaries
//! ([`progress`]); the stages themselves live in `leverflow-operators`.

mod cli;
mod config;

use anyhow::Result;
use clap::Parser;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = config::expand_config_args(std::env::args().collect())?;
    let cli = cli::Cli::parse_from(args);
    match cli.command {
        cli::Command::Generate(_) | cli::Command::Candidates(_) => {
            anyhow::bail!("not wired yet")
        }
        cli::Command::Score(_) | cli::Command::Vqa(_) | cli::Command::Bench(_) => {
            anyhow::bail!("not wired yet")
        }
    }
}
