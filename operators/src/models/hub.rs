//! `--vqa_model` names, resolved as the Hugging Face libraries resolve them:
//! a local checkpoint directory, a hub repository id
//! (`Qwen/Qwen2.5-VL-3B-Instruct`, at `--revision`), or one of the original
//! project's aliases (`qwen2.5_vl_3B`, `qwen2.5_vl_7B`); `flamingo_3B`
//! stands for OpenFlamingo's three repositories ([`resolve_openflamingo`]).
//!
//! A repository id is looked up in the local Hugging Face cache, laid out as
//! `huggingface_hub` lays it out:
//!
//! ```text
//! <cache>/models--Qwen--Qwen2.5-VL-3B-Instruct/refs/main        (the commit hash of `main`)
//! <cache>/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<hash>/ (the checkpoint's files)
//! ```
//!
//! where `<cache>` is `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. A repository that is not cached is downloaded
//! into that cache with the `hf-hub` crate (a progress bar per file;
//! `HF_TOKEN` is sent when set), unless downloads are off (`--offline` or
//! `HF_HUB_OFFLINE=1`): then the error says what is missing and how to
//! fetch it.

use std::path::{Path, PathBuf};

/// The original project's model names and the repositories they stand for.
pub const ALIASES: &[(&str, &str)] = &[
    ("qwen2.5_vl_3B", "Qwen/Qwen2.5-VL-3B-Instruct"),
    ("qwen2.5_vl_7B", "Qwen/Qwen2.5-VL-7B-Instruct"),
];

/// The original project's model names that leverflow cannot run (yet).
pub const UNSUPPORTED: &[&str] = &["flamingo_9B"];

/// The original project's name of OpenFlamingo-3B-vitl-mpt1b.
pub const FLAMINGO_3B: &str = "flamingo_3B";

/// The repositories of `flamingo_3B` and the file each must hold: the
/// language model (MPT-1b, with its tokenizer), open_clip's ViT-L-14
/// `openai` weights and OpenFlamingo's checkpoint, as open-flamingo's
/// factory and Lever-Plus load them.
pub const FLAMINGO_3B_REPOS: [(&str, &str); 3] = [
    ("anas-awadalla/mpt-1b-redpajama-200b", "config.json"),
    (
        "timm/vit_large_patch14_clip_224.openai",
        "open_clip_config.json",
    ),
    ("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "checkpoint.pt"),
];

/// The files of the `flamingo_3B` repositories a download fetches.
const FLAMINGO_SUFFIXES: &[&str] = &[".json", ".safetensors", ".bin", ".pt", ".txt", ".model"];

/// The files of a checkpoint that a download fetches (everything that
/// defines the model: configs, tokenizer, chat template, weights).
const CHECKPOINT_SUFFIXES: &[&str] = &[".json", ".safetensors", ".jinja", ".txt", ".model"];

/// Errors of resolving a model name.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The name is one of the original's models that leverflow cannot run.
    #[error("`{0}`: this OpenFlamingo model is not supported yet; the supported VQA models are OpenFlamingo-3B (`flamingo_3B`, or an OpenFlamingo directory) and Qwen2.5-VL checkpoints: a local checkpoint directory, a Hugging Face repository id such as `Qwen/Qwen2.5-VL-3B-Instruct`, or the aliases {aliases}", aliases = alias_list())]
    Unsupported(String),
    /// The name is neither a directory nor a repository id.
    #[error("`{0}`: neither a local directory nor a Hugging Face repository id (`owner/name`); pass the directory of a Qwen2.5-VL checkpoint (config.json, model*.safetensors, tokenizer.json, ...), a repository id such as `Qwen/Qwen2.5-VL-3B-Instruct`, or one of the aliases {aliases}", aliases = alias_list())]
    NotAModel(String),
    /// The repository is not cached and downloads are off.
    #[error("`{repo}` (revision `{revision}`) is not in the Hugging Face cache {}: {missing}, and downloads are off ({why}). Fetch it on a machine with network access with `huggingface-cli download {repo} --revision {revision}` (into the same cache: set HF_HUB_CACHE or HF_HOME alike), or run without `offline` and HF_HUB_OFFLINE", .cache.display())]
    NotCached {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache directory looked in.
        cache: PathBuf,
        /// What is missing (a path).
        missing: String,
        /// Which setting turned downloads off.
        why: &'static str,
    },
    /// A file of the cache could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The download failed.
    #[error("downloading `{repo}` (revision `{revision}`) into {}: {message}", .cache.display())]
    Download {
        /// The repository id.
        repo: String,
        /// The revision.
        revision: String,
        /// The cache directory.
        cache: PathBuf,
        /// What went wrong.
        message: String,
    },
}

fn alias_list() -> String {
    ALIASES
        .iter()
        .map(|(a, r)| format!("`{a}` ({r})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a `--vqa_model` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelName {
    /// An existing local directory.
    Dir(PathBuf),
    /// A hub repository id (an alias already replaced).
    Repo(String),
}

/// Reads a `--vqa_model` value: an existing directory wins (as in
/// `from_pretrained`), then the aliases, then a repository id.
pub fn parse_name(name: &str) -> Result<ModelName, HubError> {
    let path = Path::new(name);
    if path.is_dir() {
        return Ok(ModelName::Dir(path.to_path_buf()));
    }
    if UNSUPPORTED.contains(&name) {
        return Err(HubError::Unsupported(name.to_string()));
    }
    if let Some((_, repo)) = ALIASES.iter().find(|(a, _)| *a == name) {
        return Ok(ModelName::Repo((*repo).to_string()));
    }
    if is_repo_id(name) {
        return Ok(ModelName::Repo(name.to_string()));
    }
    Err(HubError::NotAModel(name.to_string()))
}

/// Whether `s` is a hub repository id as the hub accepts them: `owner/name`,
/// each part letters, digits, `-`, `_` and `.`, not starting or ending with
/// `-` or `.`, no `--` or `..`, at most 96 characters.
pub fn is_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    match s.split_once('/') {
        Some((owner, name)) => s.len() <= 96 && part_ok(owner) && part_ok(name),
        None => false,
    }
}

/// Where and how repositories are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The cache directory (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// The revision (branch, tag or commit hash).
    pub revision: String,
    /// `None`: downloads allowed; else which setting turned them off.
    pub offline: Option<&'static str>,
    /// The access token (`HF_TOKEN`).
    pub token: Option<String>,
}

impl HubSettings {
    /// The settings of a run: `revision` (default `main`) and `offline`
    /// from its flags, the rest from the environment as `huggingface_hub`
    /// reads it.
    pub fn from_env(revision: Option<&str>, offline: bool) -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let env_offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let offline = if offline {
            Some("`offline` is set")
        } else if env_offline {
            Some("HF_HUB_OFFLINE is set")
        } else {
            None
        };
        Self {
            cache,
            revision: revision.unwrap_or("main").to_string(),
            offline,
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        }
    }
}

/// The cache folder of a model repository (`models--owner--name`).
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The cached snapshot of `repo` at `revision`, if it is there: `Ok(None)`
/// names what is missing. A 40-hex revision is a commit; anything else is
/// read from `refs/<revision>`. A snapshot counts only with its
/// `config.json`.
pub fn cached_snapshot(
    cache: &Path,
    repo: &str,
    revision: &str,
) -> Result<Result<PathBuf, String>, HubError> {
    cached_snapshot_with(cache, repo, revision, "config.json")
}

/// Like [`cached_snapshot`], a snapshot counting only with `marker`.
pub fn cached_snapshot_with(
    cache: &Path,
    repo: &str,
    revision: &str,
    marker: &str,
) -> Result<Result<PathBuf, String>, HubError> {
    let folder = repo_folder(cache, repo);
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        let refs = folder.join("refs").join(revision);
        match std::fs::read_to_string(&refs) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Err(format!("no {}", refs.display())))
            }
            Err(source) => return Err(HubError::Io { path: refs, source }),
        }
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Ok(Err(format!(
            "{} does not hold a commit hash",
            folder.join("refs").join(revision).display()
        )));
    }
    let snapshot = folder.join("snapshots").join(&commit);
    if snapshot.join(marker).is_file() {
        Ok(Ok(snapshot))
    } else {
        Ok(Err(format!("no {}", snapshot.join(marker).display())))
    }
}

/// Resolves a `--vqa_model` value to a local checkpoint directory,
/// downloading a repository that is not cached (unless offline).
pub fn resolve(name: &str, settings: &HubSettings) -> Result<PathBuf, HubError> {
    let repo = match parse_name(name)? {
        ModelName::Dir(dir) => return Ok(dir),
        ModelName::Repo(repo) => repo,
    };
    let missing = match cached_snapshot(&settings.cache, &repo, &settings.revision)? {
        Ok(dir) => return Ok(dir),
        Err(missing) => missing,
    };
    if let Some(why) = settings.offline {
        return Err(HubError::NotCached {
            repo,
            revision: settings.revision.clone(),
            cache: settings.cache.clone(),
            missing,
            why,
        });
    }
    download(&repo, settings, CHECKPOINT_SUFFIXES, "config.json")
}

/// The snapshot directories of `flamingo_3B`'s repositories
/// ([`FLAMINGO_3B_REPOS`], in that order), downloading what is not cached
/// (unless offline).
pub fn resolve_openflamingo(settings: &HubSettings) -> Result<[PathBuf; 3], HubError> {
    let [lm, vision, checkpoint] =
        FLAMINGO_3B_REPOS.map(|(repo, marker)| snapshot_or_download(repo, marker, settings));
    Ok([lm?, vision?, checkpoint?])
}

/// The cached snapshot of `repo` holding `marker`, else a download of its
/// files (unless offline).
fn snapshot_or_download(
    repo: &str,
    marker: &str,
    settings: &HubSettings,
) -> Result<PathBuf, HubError> {
    let missing = match cached_snapshot_with(&settings.cache, repo, &settings.revision, marker)? {
        Ok(dir) => return Ok(dir),
        Err(missing) => missing,
    };
    match settings.offline {
        Some(why) => Err(HubError::NotCached {
            repo: repo.to_string(),
            revision: settings.revision.clone(),
            cache: settings.cache.clone(),
            missing,
            why,
        }),
        None => download(repo, settings, FLAMINGO_SUFFIXES, marker),
    }
}

/// Downloads the checkpoint files of `repo` into the cache (hf-hub lays
/// them out as the Python libraries do) and returns the snapshot directory.
fn download(
    repo: &str,
    settings: &HubSettings,
    suffixes: &[&str],
    marker: &str,
) -> Result<PathBuf, HubError> {
    use hf_hub::api::sync::ApiBuilder;
    let fail = |message: String| HubError::Download {
        repo: repo.to_string(),
        revision: settings.revision.clone(),
        cache: settings.cache.clone(),
        message,
    };
    let api = ApiBuilder::new()
        .with_cache_dir(settings.cache.clone())
        .with_token(settings.token.clone())
        .with_progress(true)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let handle = api.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        settings.revision.clone(),
    ));
    let info = handle.info().map_err(|e| fail(e.to_string()))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| !f.contains('/') && suffixes.iter().any(|x| f.ends_with(x)))
        .collect();
    if !files.iter().any(|f| f == marker) {
        return Err(fail(format!("the repository has no {marker}")));
    }
    let mut snapshot = None;
    for f in &files {
        let path = handle.get(f).map_err(|e| fail(format!("{f}: {e}")))?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| fail("no files were downloaded".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cache: &Path, offline: bool) -> HubSettings {
        HubSettings {
            cache: cache.to_path_buf(),
            revision: "main".into(),
            offline: offline.then_some("`offline` is set"),
            token: None,
        }
    }

    /// A cache holding `repo` at `refs/<revision>` → snapshot `commit`.
    fn cache_with(root: &Path, repo: &str, revision: &str, commit: &str) -> PathBuf {
        let folder = repo_folder(root, repo);
        let snap = folder.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let refs = folder.join("refs").join(revision);
        std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
        std::fs::write(refs, commit).unwrap();
        snap
    }

    #[test]
    fn names_are_directories_aliases_or_repository_ids() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(parse_name(d).unwrap(), ModelName::Dir(dir.path().into()));
        assert_eq!(
            parse_name("qwen2.5_vl_3B").unwrap(),
            ModelName::Repo("Qwen/Qwen2.5-VL-3B-Instruct".into())
        );
        assert_eq!(
            parse_name("qwen2.5_vl_7B").unwrap(),
            ModelName::Repo("Qwen/Qwen2.5-VL-7B-Instruct".into())
        );
        assert_eq!(
            parse_name("org/model_v1.5").unwrap(),
            ModelName::Repo("org/model_v1.5".into())
        );
        for bad in [
            "/no/such/dir",
            "just-a-name",
            "a/b/c",
            "../x",
            "a/-b",
            "a--b/c",
            "",
        ] {
            assert!(
                matches!(parse_name(bad), Err(HubError::NotAModel(_))),
                "{bad}"
            );
        }
        let e = parse_name("flamingo_9B").unwrap_err().to_string();
        assert!(e.contains("OpenFlamingo model is not supported yet"), "{e}");
        assert!(e.contains("qwen2.5_vl_3B") && e.contains("Qwen/Qwen2.5-VL-3B-Instruct"));
    }

    #[test]
    fn repository_ids_resolve_through_refs_to_snapshots() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = cache_with(cache.path(), "Qwen/Qwen2.5-VL-3B-Instruct", "main", commit);
        let s = settings(cache.path(), true);
        assert_eq!(resolve("Qwen/Qwen2.5-VL-3B-Instruct", &s).unwrap(), snap);
        assert_eq!(resolve("qwen2.5_vl_3B", &s).unwrap(), snap);
        // A commit hash as the revision needs no ref.
        let by_commit = HubSettings {
            revision: commit.into(),
            ..s.clone()
        };
        assert_eq!(resolve("qwen2.5_vl_3B", &by_commit).unwrap(), snap);
        // Another branch has its own ref.
        let other = "fedcba9876543210fedcba9876543210fedcba98";
        let snap2 = cache_with(cache.path(), "Qwen/Qwen2.5-VL-3B-Instruct", "v2", other);
        let v2 = HubSettings {
            revision: "v2".into(),
            ..s
        };
        assert_eq!(resolve("qwen2.5_vl_3B", &v2).unwrap(), snap2);
    }

    #[test]
    fn offline_misses_say_what_is_missing_and_how_to_fetch_it() {
        let cache = tempfile::tempdir().unwrap();
        let e = resolve("qwen2.5_vl_7B", &settings(cache.path(), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Qwen/Qwen2.5-VL-7B-Instruct"), "{e}");
        assert!(e.contains("refs/main"), "{e}");
        assert!(
            e.contains("huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --revision main"),
            "{e}"
        );
        assert!(e.contains("`offline` is set"), "{e}");
        // A ref whose snapshot lacks its config is not a checkpoint.
        let folder = repo_folder(cache.path(), "o/m");
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), "abc").unwrap();
        let e = resolve("o/m", &settings(cache.path(), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshots/abc/config.json"), "{e}");
        // A ref that points outside the snapshots is refused.
        std::fs::write(folder.join("refs/main"), "../../x").unwrap();
        let e = resolve("o/m", &settings(cache.path(), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hold a commit hash"), "{e}");
    }

    #[test]
    fn the_cache_follows_the_python_libraries_environment() {
        // Only the pure parts: the environment is process-global, so the
        // precedence is checked by the CLI test with a child's environment.
        assert_eq!(
            repo_folder(Path::new("/c"), "Qwen/Qwen2.5-VL-3B-Instruct"),
            PathBuf::from("/c/models--Qwen--Qwen2.5-VL-3B-Instruct")
        );
    }

    #[test]
    fn flamingo_3b_is_its_three_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let mut snaps = Vec::new();
        for (i, (repo, marker)) in FLAMINGO_3B_REPOS.iter().enumerate() {
            let commit = format!("{i}").repeat(40);
            let snap = cache_with(dir.path(), repo, "main", &commit);
            std::fs::write(snap.join(marker), "{}").unwrap();
            snaps.push(snap);
        }
        let got = resolve_openflamingo(&settings(dir.path(), true)).unwrap();
        assert_eq!(got.to_vec(), snaps);
        std::fs::remove_file(snaps[2].join("checkpoint.pt")).unwrap();
        let e = resolve_openflamingo(&settings(dir.path(), true))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("openflamingo/OpenFlamingo-3B-vitl-mpt1b") && e.contains("checkpoint.pt"),
            "{e}"
        );
    }
}
