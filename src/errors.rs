//! Error messages at the edge: the library names settings by their field
//! names; here they become the flags a user typed, with the hint of what to
//! pass when there is one.

use leverflow_operators::backends::BackendError;
use leverflow_operators::config::{ConfigError, RunConfig};
use leverflow_operators::pipeline::error::{MissingImage, NotInAnnotations};
use leverflow_operators::pipeline::PipelineError;

/// The message of a failed command, with flag names and hints.
pub fn describe(e: &anyhow::Error) -> String {
    let text = if let Some(c) = e.downcast_ref::<ConfigError>() {
        config_message(c)
    } else if let Some(p) = e.downcast_ref::<PipelineError>() {
        pipeline_message(p)
    } else {
        format!("{e:#}")
    };
    as_flags(&text)
}

/// The library names a setting in backticks (`` `workers` ``); on the
/// command line it is the flag `--workers`.
fn as_flags(text: &str) -> String {
    let settings = serde_json::to_value(RunConfig::default()).unwrap_or_default();
    let mut out = text.to_string();
    for name in settings.as_object().into_iter().flat_map(|m| m.keys()) {
        out = out.replace(&format!("`{name}`"), &format!("--{name}"));
    }
    out
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
        PipelineError::Backend(BackendError::Hub(e)) => format!("--vqa_model {e}"),
        PipelineError::Backend(
            e @ (BackendError::NoCuda
            | BackendError::NoWgpu
            | BackendError::NoWgpuAdapter { .. }
            | BackendError::MixedDevices),
        ) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_in_backticks_become_flags() {
        assert_eq!(
            as_flags("`processes` 3 but 2 host(s); `not_a_setting` stays"),
            "--processes 3 but 2 host(s); `not_a_setting` stays"
        );
        let e = anyhow::Error::new(ConfigError::new("temps", "every temperature must be > 0"));
        assert_eq!(describe(&e), "--temps: every temperature must be > 0");
    }
}
