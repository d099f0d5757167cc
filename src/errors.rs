//! Error messages at the edge: the library names settings by their field
//! names; here they become the flags a user typed, with the hint of what to
//! pass when there is one.

use leverflow_operators::backends::BackendError;
use leverflow_operators::config::ConfigError;
use leverflow_operators::pipeline::error::{MissingImage, NotInAnnotations};
use leverflow_operators::pipeline::PipelineError;

/// The message of a failed command, with flag names and hints.
pub fn describe(e: &anyhow::Error) -> String {
    if let Some(c) = e.downcast_ref::<ConfigError>() {
        return config_message(c);
    }
    if let Some(p) = e.downcast_ref::<PipelineError>() {
        return pipeline_message(p);
    }
    format!("{e:#}")
}

fn flag(setting: &str) -> String {
    format!("--{setting}")
}

fn config_message(c: &ConfigError) -> String {
    if c.message == "missing" {
        format!(
            "missing {} (see `leverflow generate --help`)",
            flag(c.setting)
        )
    } else {
        format!("{}: {}", flag(c.setting), c.message)
    }
}

fn pipeline_message(p: &PipelineError) -> String {
    match p {
        PipelineError::Config(c) => config_message(c),
        PipelineError::Backend(BackendError::Config(c)) => config_message(c),
        PipelineError::Backend(BackendError::NotADirectory(name)) => {
            format!("--vqa_model {name}: not a local directory; {}", {
                let full = BackendError::NotADirectory(String::new()).to_string();
                full.trim_start_matches(": not a local directory; ").to_string()
            })
        }
        PipelineError::Backend(e @ (BackendError::NoCuda | BackendError::MixedDevices)) => {
            format!("--device/--devices: {e}")
        }
        PipelineError::NoTrainingSplit => "the training split is needed for queries and examples: pass --train_ques_path and --train_ann_path (official VQA files) or --train_path (merged vqav2-style file)".into(),
        PipelineError::NoAnnotations => "strict evaluation needs official annotation files: pass --train_ques_path and --train_ann_path (or --val_*), or --no_strict_eval to allow the fallback match".into(),
        PipelineError::Stage(s) => {
            if s.downcast_ref::<MissingImage>().is_some() {
                format!("{s}; pass --on_missing_image skip to skip such queries")
            } else if s.downcast_ref::<NotInAnnotations>().is_some() {
                format!("{s} (pass --no_strict_eval to use the fallback match)")
            } else {
                s.to_string()
            }
        }
        other => other.to_string(),
    }
}
