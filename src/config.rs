//! `--config FILE`: a YAML file with the same keys as the flags.
//!
//! The YAML is turned into command-line tokens that are placed *before* the
//! user's own flags, so the precedence is flags > YAML > defaults (clap lets a
//! later occurrence of a flag override an earlier one). Values may use Hydra's
//! `${oc.env:VAR}` / `${oc.env:VAR,default}` interpolation.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Finds `--config FILE` / `--config=FILE` in `args` (after the subcommand)
/// and returns the argument list with the YAML's tokens inserted right after
/// the subcommand name.
pub fn expand_config_args(args: Vec<String>) -> Result<Vec<String>> {
    let Some(sub_pos) = args
        .iter()
        .position(|a| a == "generate" || a == "candidates")
    else {
        return Ok(args);
    };
    let mut config_path = None;
    for (i, a) in args.iter().enumerate().skip(sub_pos + 1) {
        if a == "--config" {
            config_path = args.get(i + 1).cloned();
        } else if let Some(v) = a.strip_prefix("--config=") {
            config_path = Some(v.to_string());
        }
    }
    let Some(path) = config_path else {
        return Ok(args);
    };
    let tokens = yaml_to_args(Path::new(&path))?;
    let mut out = args[..=sub_pos].to_vec();
    out.extend(tokens);
    out.extend_from_slice(&args[sub_pos + 1..]);
    Ok(out)
}

/// Reads the YAML file and converts it to flag tokens.
pub fn yaml_to_args(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| {
        let place = e
            .location()
            .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!("{}: invalid YAML{place}: {e}", path.display())
    })?;
    let serde_yaml::Value::Mapping(map) = value else {
        bail!(
            "{}: the config must be a mapping of flag names to values",
            path.display()
        );
    };
    let mut tokens = Vec::new();
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            bail!(
                "{}: every key must be a string, found {key:?}",
                path.display()
            );
        };
        if key == "config" {
            bail!(
                "{}: `config` cannot be set inside a config file",
                path.display()
            );
        }
        let flag = format!("--{}", key.replace('-', "_"));
        let where_ = || format!("{} (key `{key}`)", path.display());
        match value {
            serde_yaml::Value::Null => {}
            serde_yaml::Value::Bool(true) => tokens.push(flag),
            serde_yaml::Value::Bool(false) => {
                if key.replace('-', "_") == "strict_eval" {
                    tokens.push("--no_strict_eval".to_string());
                }
            }
            serde_yaml::Value::Sequence(items) => {
                tokens.push(flag);
                for item in items {
                    tokens.push(scalar(&item).with_context(where_)?);
                }
            }
            other => {
                tokens.push(flag);
                tokens.push(scalar(&other).with_context(where_)?);
            }
        }
    }
    Ok(tokens)
}

fn scalar(value: &serde_yaml::Value) -> Result<String> {
    let raw = match value {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        other => bail!("expected a scalar value, found {other:?}"),
    };
    interpolate(&raw)
}

/// Replaces `${oc.env:VAR}` and `${oc.env:VAR,default}` by the environment
/// variable (or the default); an unset variable without default is an error.
pub fn interpolate(raw: &str) -> Result<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            bail!("unterminated interpolation in `{raw}`");
        };
        let expr = &after[..end];
        let Some(body) = expr.strip_prefix("oc.env:") else {
            bail!("unsupported interpolation `${{{expr}}}` in `{raw}` (only ${{oc.env:VAR}} is supported)");
        };
        let (var, default) = match body.split_once(',') {
            Some((v, d)) => (
                v.trim(),
                Some(d.trim().trim_matches(|c| c == '\'' || c == '"')),
            ),
            None => (body.trim(), None),
        };
        match (std::env::var(var), default) {
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d),
            (Err(_), None) => bail!(
                "environment variable {var} is not set (used as ${{oc.env:{var}}} in `{raw}`); set it or give a default: ${{oc.env:{var},value}}"
            ),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_tokens_come_before_user_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::env::set_var("LEVERFLOW_TEST_ROOT", "/data");
        std::fs::write(
            &path,
            "num_beams: 7\ntemps: [0.5, 2.0]\ntrain_coco_root: ${oc.env:LEVERFLOW_TEST_ROOT}/img\nsave_prompts: true\nstrict_eval: false\nbeam-data: b.json\n",
        )
        .unwrap();
        let args: Vec<String> = [
            "leverflow",
            "generate",
            "--config",
            path.to_str().unwrap(),
            "--num_beams",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand_config_args(args).unwrap();
        let joined = out.join(" ");
        assert!(joined.starts_with("leverflow generate --num_beams 7 --temps 0.5 2.0 --train_coco_root /data/img --save_prompts --no_strict_eval --beam_data b.json --config"), "{joined}");
        assert!(joined.ends_with("--num_beams 3"));
    }

    #[test]
    fn interpolation_defaults_and_errors() {
        assert_eq!(
            interpolate("${oc.env:LEVERFLOW_UNSET_VAR,abc}/x").unwrap(),
            "abc/x"
        );
        let err = interpolate("${oc.env:LEVERFLOW_UNSET_VAR}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("LEVERFLOW_UNSET_VAR"), "{err}");
    }

    #[test]
    fn bad_yaml_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "num_beams: 3\ntemps: [1.0,\n").unwrap();
        let err = yaml_to_args(&path).unwrap_err().to_string();
        assert!(err.contains("bad.yaml") && err.contains("line"), "{err}");
    }
}
