//! Checks of the output paths before any work: the JSON and the Parquet
//! output are different files and neither is an input, and their
//! directories exist (created) and are writable, so a run never loads a
//! model only to fail at its very end.

use std::path::{Path, PathBuf};

use super::error::PipelineError;
use crate::config::{ConfigError, RunConfig};

/// The path as the file system resolves it: absolute, its directory's
/// symbolic links resolved (the file itself may not exist yet).
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if let Ok(c) = std::fs::canonicalize(&abs) {
        return c;
    }
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// The input files a run reads, by setting.
fn inputs(cfg: &RunConfig) -> Vec<(&'static str, &Path)> {
    [
        ("sft_ckpt", &cfg.sft_ckpt),
        ("beam_data", &cfg.beam_data),
        ("query_emb", &cfg.query_emb),
        ("cand_emb", &cfg.cand_emb),
        ("candidate_indices", &cfg.candidate_indices),
        ("sampler_cache", &cfg.sampler_cache),
        ("train_ques_path", &cfg.train_ques_path),
        ("train_ann_path", &cfg.train_ann_path),
        ("val_ques_path", &cfg.val_ques_path),
        ("val_ann_path", &cfg.val_ann_path),
        ("train_path", &cfg.train_path),
        ("val_path", &cfg.val_path),
        ("replay_from", &cfg.replay_from),
        ("hostfile", &cfg.hostfile),
        ("cluster_secret_file", &cfg.cluster_secret_file),
    ]
    .into_iter()
    .filter_map(|(name, p)| p.as_deref().map(|p| (name, p)))
    .collect()
}

/// Refuses outputs that are one file or an input, and makes sure the
/// output directories exist and take new files.
pub fn check_output_paths(
    cfg: &RunConfig,
    output: &Path,
    parquet: &Path,
) -> Result<(), PipelineError> {
    let (out, pq) = (resolved(output), resolved(parquet));
    if out == pq {
        return Err(ConfigError::new(
            "parquet_path",
            format!(
                "{} is the JSON output too (output_path {}): give the Parquet output a path of its own",
                parquet.display(),
                output.display()
            ),
        )
        .into());
    }
    for (setting, input) in inputs(cfg) {
        let input_at = resolved(input);
        for (out_setting, path, at) in [
            ("output_path", output, &out),
            ("parquet_path", parquet, &pq),
        ] {
            if &input_at == at {
                return Err(ConfigError::new(
                    out_setting,
                    format!(
                        "{} is also the input {setting}: an output never overwrites an input",
                        path.display()
                    ),
                )
                .into());
            }
        }
    }
    for path in [output, parquet] {
        if path.is_dir() && path != parquet {
            return Err(ConfigError::new(
                "output_path",
                format!("{} is a directory, not a file", path.display()),
            )
            .into());
        }
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        };
        let io = |what: &'static str| {
            let dir = dir.clone();
            move |source| PipelineError::Io {
                path: dir,
                what,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("cannot create the output directory"))?;
        // A probe file, created exclusively and removed at once.
        tempfile::Builder::new()
            .prefix(".leverflow-probe-")
            .tempfile_in(&dir)
            .map_err(io("the output directory does not take new files"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_must_differ_from_each_other_and_from_the_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let json = d.join("out").join("rl.json");
        let cfg = RunConfig {
            beam_data: Some(d.join("beam.json")),
            ..RunConfig::default()
        };
        check_output_paths(&cfg, &json, &json.with_extension("parquet")).unwrap();
        assert!(d.join("out").is_dir(), "the output directory is made");
        // `--output_path X.parquet` with the default Parquet path.
        let x = d.join("x.parquet");
        let e = check_output_paths(&cfg, &x, &x).unwrap_err().to_string();
        assert!(e.contains("parquet_path") && e.contains("x.parquet"), "{e}");
        // The same file reached through another spelling.
        let other = d.join("out").join("..").join("out").join("rl.json");
        assert!(check_output_paths(&cfg, &json, &other).is_err());
        // An output onto an input.
        std::fs::write(d.join("beam.json"), "{}").unwrap();
        let e = check_output_paths(&cfg, &d.join("beam.json"), &x)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beam_data"), "{e}");
        // A directory where the JSON output should go.
        let e = check_output_paths(&cfg, &d.join("out"), &x)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn an_output_directory_that_takes_no_files_is_found_before_any_work() {
        use std::os::unix::fs::PermissionsExt;
        // Root ignores permissions: nothing to check then.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let e = check_output_paths(
            &RunConfig::default(),
            &ro.join("a.json"),
            &ro.join("a.parquet"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not take new files"), "{e}");
    }
}
