//! Property / fuzz harness of the parsers of files that come from other
//! people (issue 21, "Hostile inputs"), on stable Rust with `arbtest`.
//!
//! Every case writes an input file (or a directory of them), runs the
//! parser and checks that it
//! * returns (`Ok` or a typed error) without panicking (`catch_unwind`), and
//! * allocates at most [`ALLOC_PER_INPUT_BYTE`] × the input's size +
//!   [`ALLOC_ALLOWANCE`] at its peak, measured by the counting global
//!   allocator of this test binary (memory maps do not count).
//!
//! Inputs are the committed seed corpus (`tests/fuzz_corpus/<target>/`,
//! every hostile case of the issue and a few valid files; always run) and
//! mutations of it. The mutation rounds are driven by time: by default
//! about [`DEFAULT_FUZZ_SECS`] seconds in total, `LEVERFLOW_FUZZ_SECS=N` for
//! about N seconds. They are deterministic: the arbtest seed of round `i` of
//! a target is a fixed function of the target's name and `i`, so a run
//! repeats the same cases (a slower machine runs fewer of them). A failing
//! case prints its seed and saves its input under `target/fuzz-failures/`;
//! `LEVERFLOW_FUZZ_SEED=0x... LEVERFLOW_FUZZ_TARGET=<name>` reruns only that
//! case. A case that aborts the process (stack overflow, an allocation
//! failure) cannot print: its input is the file
//! `target/fuzz-failures/in-progress/<target>/…` left behind.
//!
//! `cargo test -p leverflow-operators --test fuzz_parsers -- --ignored
//! write_seed_corpus` writes the seed corpus again (deterministically).

use std::alloc::{GlobalAlloc, Layout, System};

use arbtest::arbitrary::{self, Unstructured};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use leverflow_operators::backends::replay as vqa;
use leverflow_operators::dataset::{DatasetConfig, DatasetKind, DatasetSplit, VqaDataset};
use leverflow_operators::image_decode::{self, ImageInput, ImageLimits};
use leverflow_operators::models::pointer_selector::PointerSelector;
use leverflow_operators::models::qwen2_5_vl::config::{
    GenerationDefaults, PreprocessorConfig, Qwen25VlConfig,
};
use leverflow_operators::models::qwen2_5_vl::weights::WeightStore;
use leverflow_operators::{accuracy, source, tensor_io};

// ---------------------------------------------------------------- allocator

/// Counts live heap bytes and their peak (all threads of this binary; the
/// cases run one at a time, see [`SERIAL`]).
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are
// updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One case at a time: the allocation peak is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------- settings

/// Peak heap bytes allowed per byte of input.
const ALLOC_PER_INPUT_BYTE: usize = 64;
/// Peak heap bytes every case may use on top (64 MiB).
const ALLOC_ALLOWANCE: usize = 64 << 20;
/// Seconds of mutation rounds by default (all targets together).
const DEFAULT_FUZZ_SECS: f64 = 3.0;
/// Bytes of arbtest randomness per case (drives the mutations).
const ENTROPY_BYTES: u64 = 4096;
/// Largest mutated input (keeps a round fast).
const MAX_INPUT: usize = 4 << 20;

/// Image limits of the harness: the bound above must hold for every image
/// the limits accept.
const FUZZ_IMAGE_LIMITS: ImageLimits = ImageLimits {
    max_side: 2048,
    max_alloc_bytes: 16 << 20,
};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus")
}

fn failures_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .join("fuzz-failures")
}

// ---------------------------------------------------------------- targets

/// A parser under test: `prepare` writes the input into the case
/// directory (returning the path the parser reads), `run` parses it. The
/// outcome (`Ok` or an error) is ignored: only panics and allocation count.
struct Target {
    name: &'static str,
    prepare: fn(&Path, &[u8]) -> PathBuf,
    run: fn(&Path),
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write the case input");
    p
}

/// A torch.save zip around a pickle (stored entries), and one storage.
fn torch_zip(pickle: &[u8], storage: &[u8], deflate_storage: bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let st = if deflate_storage {
        stored.compression_method(zip::CompressionMethod::Deflated)
    } else {
        stored
    };
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/data/0", st).unwrap();
    z.write_all(storage).unwrap();
    z.start_file("archive/version", stored).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
}

fn load_tensors(p: &Path) {
    let _ = tensor_io::load_matrix(p);
    let _ = tensor_io::load_state_dict(p);
}

fn load_checkpoint(p: &Path) {
    type B = burn::backend::NdArray<f32>;
    let _ = PointerSelector::<B>::load(p, 1, &Default::default());
}

fn read_weights(dir: &Path) {
    if let Ok(store) = WeightStore::open(dir, true) {
        for name in store.names() {
            let _ = store.read_f32(&name);
        }
    }
}

/// A valid one-tensor shard, for the index target.
fn small_shard() -> Vec<u8> {
    let bytes: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &bytes).unwrap();
    safetensors::serialize(vec![("model.norm.weight", view)], None).unwrap()
}

const VALID_QUESTIONS: &str = r#"{"questions": [{"question_id": 1, "image_id": 5, "question": "what colour?"}, {"question_id": 2, "image_id": 6, "question": "what shape?"}]}"#;
const VALID_ANNOTATIONS: &str = r#"{"annotations": [{"question_id": 1, "image_id": 5, "multiple_choice_answer": "red", "answers": [{"answer": "red", "answer_id": 1}]}, {"question_id": 2, "image_id": 6, "answers": [{"answer": "circle"}, {"answer": "circle"}]}]}"#;

fn load_vqa(dir: &Path) {
    let q = dir.join("questions.json");
    let a = dir.join("annotations.json");
    let _ = accuracy::load_questions_annotations(&q, &a);
    let cfg = DatasetConfig::new(
        DatasetKind::Vqav2Local,
        DatasetSplit::Train,
        Some(q),
        a,
        dir.join("images"),
    );
    if let Ok(ds) = VqaDataset::load(&cfg) {
        let _ = ds.get(0);
    }
}

fn read_beams(p: &Path) {
    if let Ok(r) = source::BeamReader::open(p) {
        for rec in r {
            if rec.is_err() {
                break;
            }
        }
    }
    let _ = source::count_records(p);
}

const TARGETS: &[Target] = &[
    Target {
        name: "pickle",
        prepare: |d, b| write(d, "x.pt", &torch_zip(b, &[0u8; 256], false)),
        run: load_tensors,
    },
    Target {
        name: "torch_zip",
        prepare: |d, b| write(d, "x.pt", b),
        run: load_tensors,
    },
    Target {
        name: "checkpoint",
        prepare: |d, b| write(d, "sft.ckpt", b),
        run: load_checkpoint,
    },
    Target {
        name: "npy",
        prepare: |d, b| write(d, "x.npy", b),
        run: |p| {
            let _ = tensor_io::load_matrix(p);
        },
    },
    Target {
        name: "safetensors",
        prepare: |d, b| {
            write(d, "model.safetensors", b);
            d.to_path_buf()
        },
        run: |d| {
            load_tensors(&d.join("model.safetensors"));
            read_weights(d);
        },
    },
    Target {
        name: "safetensors_index",
        prepare: |d, b| {
            write(d, "model-00001-of-00001.safetensors", &small_shard());
            write(d, "model.safetensors.index.json", b);
            d.to_path_buf()
        },
        run: read_weights,
    },
    Target {
        name: "config",
        prepare: |d, b| {
            write(d, "config.json", b);
            write(d, "preprocessor_config.json", b);
            write(d, "generation_config.json", b);
            d.to_path_buf()
        },
        run: |d| {
            let _ = Qwen25VlConfig::from_file(&d.join("config.json"));
            let _ = PreprocessorConfig::from_file(&d.join("preprocessor_config.json"));
            let _ = GenerationDefaults::from_file(&d.join("generation_config.json"));
        },
    },
    Target {
        name: "beam_json",
        prepare: |d, b| write(d, "beams.json", b),
        run: read_beams,
    },
    Target {
        name: "beam_jsonl",
        prepare: |d, b| write(d, "beams.jsonl", b),
        run: read_beams,
    },
    Target {
        name: "vqa_questions",
        prepare: |d, b| {
            write(d, "questions.json", b);
            write(d, "annotations.json", VALID_ANNOTATIONS.as_bytes());
            d.to_path_buf()
        },
        run: load_vqa,
    },
    Target {
        name: "vqa_annotations",
        prepare: |d, b| {
            write(d, "questions.json", VALID_QUESTIONS.as_bytes());
            write(d, "annotations.json", b);
            d.to_path_buf()
        },
        run: load_vqa,
    },
    Target {
        name: "sampler_cache",
        prepare: |d, b| write(d, "sampler_cache.json", b),
        run: |p| {
            let _ = source::load_sampler_cache(p);
            let _ = source::load_candidate_indices(p);
        },
    },
    Target {
        name: "replay",
        prepare: |d, b| write(d, "rl_data.json", b),
        run: |p| {
            if let Ok(index) = vqa::ReplayIndex::open_json(p) {
                for q in 0..4u64 {
                    let _ = index.get(q, &[0, 1]);
                    let _ = index.get(q, &[q + 1, 1]);
                }
            }
        },
    },
    Target {
        name: "image",
        prepare: |d, b| write(d, "image.png", b),
        run: |p| {
            let _ = image_decode::decode_rgb(ImageInput::File(p), &FUZZ_IMAGE_LIMITS);
        },
    },
];

// ---------------------------------------------------------------- one case

/// Where a case's input came from, for the failure report.
enum Origin<'a> {
    Seed(&'a Path),
    Mutation { seed: u64, round: u64 },
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Seed(p) => write!(f, "seed file {}", p.display()),
            Origin::Mutation { seed, round } => write!(
                f,
                "mutation round {round}, seed 0x{seed:016x} (rerun: LEVERFLOW_FUZZ_SEED=0x{seed:016x})"
            ),
        }
    }
}

struct Outcome {
    peak: usize,
}

fn hex_preview(b: &[u8]) -> String {
    let n = b.len().min(256);
    let mut s: String = b[..n].iter().map(|x| format!("{x:02x}")).collect();
    if b.len() > n {
        s.push_str(&format!("… ({} bytes)", b.len()));
    }
    s
}

/// Runs `target` on `input` in a fresh directory under the in-progress
/// folder; panics (after saving the input) on a panic or an allocation over
/// the bound.
fn run_case(target: &Target, input: &[u8], origin: &Origin<'_>) -> Outcome {
    let work = failures_dir().join("in-progress").join(target.name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("create the case directory");
    let path = (target.prepare)(&work, input);
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&path)));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = ALLOC_PER_INPUT_BYTE
        .saturating_mul(input.len())
        .saturating_add(ALLOC_ALLOWANCE);
    let problem = match &result {
        Err(p) => Some(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)")
        )),
        Ok(()) if peak > bound => Some(format!(
            "allocated {peak} bytes at its peak, more than {ALLOC_PER_INPUT_BYTE} x {} input bytes + {ALLOC_ALLOWANCE}",
            input.len()
        )),
        Ok(()) => None,
    };
    let _ = std::fs::remove_dir_all(&work);
    if let Some(problem) = problem {
        let name = format!("{}-{}.bin", target.name, hex_preview(&sha_like(input)));
        let saved = failures_dir().join(name);
        let _ = std::fs::create_dir_all(failures_dir());
        let _ = std::fs::write(&saved, input);
        panic!(
            "fuzz target {}: {problem}\n  input: {origin}\n  saved: {}\n  bytes: {}",
            target.name,
            saved.display(),
            hex_preview(input)
        );
    }
    Outcome { peak }
}

/// A short content hash for the failure file name (FNV-1a, 8 bytes).
fn sha_like(b: &[u8]) -> [u8; 8] {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x100000001b3);
    }
    h.to_le_bytes()
}

fn seeds_of(target: &Target) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir().join(target.name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no seed files", dir.display());
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

// ---------------------------------------------------------------- mutations

const INTERESTING_INTS: [u64; 14] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    u64::MAX,
];

const TOKENS: [&str; 16] = [
    "[",
    "{",
    "\"",
    "]",
    "}",
    ",",
    ":",
    "-1",
    "1e999",
    "18446744073709551616",
    "4294967296",
    "99999999",
    "..",
    "/",
    "<|im_end|>",
    "null",
];

/// A mutation of a seed, driven by arbtest's bytes.
fn mutate(u: &mut Unstructured<'_>, seeds: &[(PathBuf, Vec<u8>)]) -> arbitrary::Result<Vec<u8>> {
    let mut data = u.choose(seeds)?.1.clone();
    let n = u.int_in_range(1..=8)?;
    for _ in 0..n {
        let at = |u: &mut Unstructured<'_>, len: usize| -> arbitrary::Result<usize> {
            if len == 0 {
                Ok(0)
            } else {
                u.int_in_range(0..=len - 1)
            }
        };
        match u.int_in_range(0..=9)? {
            0 if !data.is_empty() => {
                let i = at(u, data.len())?;
                data[i] ^= 1 << u.int_in_range(0..=7)?;
            }
            1 if !data.is_empty() => {
                let i = at(u, data.len())?;
                data[i] = *u.choose(&[0u8, 0xff, 0x7f, 0x80, 1, b'0', b'9', b'(', b'.', b'a'])?;
            }
            2 if data.len() >= 8 => {
                let i = at(u, data.len() - 7)?;
                let v = *u.choose(&INTERESTING_INTS)?;
                if u.arbitrary::<bool>()? {
                    data[i..i + 8].copy_from_slice(&v.to_le_bytes());
                } else {
                    data[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                }
            }
            3 if !data.is_empty() => {
                let i = at(u, data.len())?;
                let len = u.int_in_range(1..=(data.len() - i).min(256))?;
                data.drain(i..i + len);
            }
            4 if !data.is_empty() => {
                let i = at(u, data.len())?;
                let len = u.int_in_range(1..=(data.len() - i).min(256))?;
                let copy = data[i..i + len].to_vec();
                let times = u.int_in_range(1..=64)?;
                let j = at(u, data.len())?;
                for _ in 0..times {
                    data.splice(j..j, copy.iter().copied());
                }
            }
            5 => {
                let i = at(u, data.len() + 1)?;
                let len = u.int_in_range(1..=16)?;
                let bytes: Vec<u8> = (0..len)
                    .map(|_| u.arbitrary::<u8>())
                    .collect::<arbitrary::Result<_>>()?;
                data.splice(i..i, bytes);
            }
            6 => {
                let other = &u.choose(seeds)?.1;
                let i = at(u, data.len())?;
                let j = at(u, other.len())?;
                data.truncate(i);
                data.extend_from_slice(&other[j..]);
            }
            7 if !data.is_empty() => {
                let i = at(u, data.len())?;
                data.truncate(i);
            }
            8 => {
                // Replace a run of ASCII digits by a large or odd number.
                let digits: Vec<usize> = (0..data.len())
                    .filter(|&i| data[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let start = *u.choose(&digits)?;
                    let mut end = start;
                    while end < data.len() && data[end].is_ascii_digit() {
                        end += 1;
                    }
                    let tok = *u.choose(&TOKENS[7..12])?;
                    data.splice(start..end, tok.bytes());
                }
            }
            _ => {
                let i = at(u, data.len() + 1)?;
                let tok = *u.choose(&TOKENS)?;
                let times = u.int_in_range(1..=32)?;
                for _ in 0..times {
                    data.splice(i..i, tok.bytes());
                }
            }
        }
        data.truncate(MAX_INPUT);
    }
    Ok(data)
}

/// Arbtest seed of round `round` of `target`: fixed, so the default run is
/// deterministic. The low 32 bits are arbtest's buffer size.
fn round_seed(target: &str, round: u64) -> u64 {
    let mut h = sha_like(target.as_bytes());
    h.reverse();
    let mut x = u64::from_le_bytes(h) ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x & 0xffff_ffff_0000_0000) | ENTROPY_BYTES
}

fn fuzz_budget() -> Duration {
    let secs = std::env::var("LEVERFLOW_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_FUZZ_SECS);
    Duration::from_secs_f64(secs)
}

fn mutation_case(target: &Target, seeds: &[(PathBuf, Vec<u8>)], seed: u64, round: u64) -> usize {
    let mut peak = 0;
    arbtest::arbtest(|u| {
        let input = mutate(u, seeds)?;
        peak = run_case(target, &input, &Origin::Mutation { seed, round }).peak;
        Ok(())
    })
    .seed(seed)
    .run();
    peak
}

// ---------------------------------------------------------------- the test

#[test]
fn fuzz_parsers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Panics inside parsers are caught and reported by `run_case`; keep the
    // default hook's backtrace noise out of the output.
    let only_target = std::env::var("LEVERFLOW_FUZZ_TARGET").ok();
    let only_seed = std::env::var("LEVERFLOW_FUZZ_SEED").ok().map(|s| {
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .expect("LEVERFLOW_FUZZ_SEED must be hex")
    });
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| only_target.as_deref().is_none_or(|n| n == t.name))
        .collect();
    assert!(!targets.is_empty(), "no target named {only_target:?}");

    if let Some(seed) = only_seed {
        for t in &targets {
            let seeds = seeds_of(t);
            let peak = mutation_case(t, &seeds, seed, 0);
            println!("{}: seed 0x{seed:016x}: ok, peak {peak} bytes", t.name);
        }
        return;
    }

    // 1. The seed corpus, always.
    for t in &targets {
        for (path, bytes) in seeds_of(t) {
            let out = run_case(t, &bytes, &Origin::Seed(&path));
            println!(
                "seed {}/{}: ok ({} bytes, peak {} bytes)",
                t.name,
                path.file_name().unwrap().to_string_lossy(),
                bytes.len(),
                out.peak
            );
        }
    }

    // 2. Mutation rounds, for the time budget, shared evenly.
    let budget = fuzz_budget();
    let share = budget / targets.len() as u32;
    let mut total = 0u64;
    for t in &targets {
        let seeds = seeds_of(t);
        let started = Instant::now();
        let mut rounds = 0u64;
        let mut max_peak = 0usize;
        while started.elapsed() < share {
            let seed = round_seed(t.name, rounds);
            max_peak = max_peak.max(mutation_case(t, &seeds, seed, rounds));
            rounds += 1;
        }
        total += rounds;
        println!(
            "fuzz {}: {rounds} mutated cases in {:.1} s, largest peak {max_peak} bytes",
            t.name,
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "fuzz: {total} mutated cases in {:.1} s",
        budget.as_secs_f64()
    );
}

// ---------------------------------------------------------------- corpus

/// Pickle of `torch._utils._rebuild_tensor_v2(storage '0', offset, shape,
/// stride, False, OrderedDict())`, optionally as `{key: tensor}`; sizes past
/// 2^31 are written as LONG1.
fn tensor_pickle(class: &str, shape: &[u64], stride: &[u64], key: Option<&str>) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let text = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: u64| {
        if v <= i32::MAX as u64 {
            p.push(b'J');
            p.extend((v as i32).to_le_bytes());
        } else {
            p.extend([0x8a, 8]);
            p.extend(v.to_le_bytes());
        }
    };
    if let Some(k) = key {
        p.push(b'}');
        text(&mut p, k);
    }
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    text(&mut p, "storage");
    p.extend(format!("ctorch\n{class}\n").as_bytes());
    text(&mut p, "0");
    text(&mut p, "cpu");
    int(&mut p, 64);
    p.extend([b't', b'Q']);
    int(&mut p, 0);
    p.push(b'(');
    for &s in shape {
        int(&mut p, s);
    }
    p.extend([b't', b'(']);
    for &s in stride {
        int(&mut p, s);
    }
    p.extend([b't', 0x89]);
    p.extend(b"ccollections\nOrderedDict\n)Rt");
    p.push(b'R');
    if key.is_some() {
        p.push(b's');
    }
    p.push(b'.');
    p
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect()
}

/// Sets the uncompressed size of zip entry `name` in its local and central
/// headers.
fn patch_zip_size(zip: &mut [u8], name: &str, size: u32) {
    let n = name.as_bytes();
    for i in 0..zip.len().saturating_sub(46) {
        let sig = u32::from_le_bytes([zip[i], zip[i + 1], zip[i + 2], zip[i + 3]]);
        if sig == 0x04034b50 && zip[i + 30..].starts_with(n) {
            zip[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
        }
        if sig == 0x02014b50 && zip[i + 46..].starts_with(n) {
            zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
    }
}

/// `zip` with the BINUNICODE string `from` of its `data.pkl` renamed `to`.
fn rename_pickle_key(zip_bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..ar.len() {
        let mut f = ar.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).unwrap();
        if name.ends_with("data.pkl") {
            let mut old = vec![b'X'];
            old.extend((from.len() as u32).to_le_bytes());
            old.extend(from.as_bytes());
            let mut new = vec![b'X'];
            new.extend((to.len() as u32).to_le_bytes());
            new.extend(to.as_bytes());
            let at = data
                .windows(old.len())
                .position(|w| w == old.as_slice())
                .expect("key in data.pkl");
            data.splice(at..at + old.len(), new);
        }
        out.start_file(name, stored).unwrap();
        out.write_all(&data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A PNG of `w` x `h` zero grey pixels (tiny on disk for any canvas).
fn zero_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; w as usize];
        for _ in 0..h {
            stream.write_all(&row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

fn npy(shape: &str, version: u8, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let pre = if version == 1 { 10 } else { 12 };
    while !(pre + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY".to_vec();
    b.extend([version, 0]);
    if version == 1 {
        b.extend((header.len() as u16).to_le_bytes());
    } else {
        b.extend((header.len() as u32).to_le_bytes());
    }
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

fn safetensors_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

fn rl_json() -> Vec<u8> {
    use leverflow_schemas::{CandidateRecord, PointerLayout, QueryRecord, RlRecord};
    let mut out = serde_json::Map::new();
    for q in 0..3u64 {
        let pointer_candidates = (0..2u64)
            .map(|k| {
                let mut c = CandidateRecord::new(
                    &[0, 1],
                    &[q + k, k],
                    PointerLayout::PerQueryPool,
                    "beam",
                    -1.0,
                )
                .unwrap();
                c.vqa_raw_generation = Some(format!("answer {q} {k}"));
                c
            })
            .collect();
        let r = RlRecord {
            query: QueryRecord {
                query_id: q,
                question_id: Some(q + 1000),
                image_id: Some(7),
                question: Some("what colour?".into()),
                gt_answers_raw: Some(vec!["red".into()]),
                gt_answers_norm: Some(vec!["red".into()]),
            },
            candidate_pool_ids: Some(vec![q, q + 1, q + 2]),
            pointer_candidates,
        };
        out.insert(q.to_string(), serde_json::to_value(&r).unwrap());
    }
    out.insert("_meta".into(), serde_json::json!({"counts": {}}));
    serde_json::to_vec(&serde_json::Value::Object(out)).unwrap()
}

fn repo_file(rel: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every seed file: (target, file name, bytes). Hostile cases are named
/// after what they do; `valid_*` files parse.
fn seed_corpus() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();
    // pickle (wrapped into a torch zip with a 256-byte storage by the target)
    v.push((
        "pickle",
        "valid_tensor.pkl",
        tensor_pickle("FloatStorage", &[4, 16], &[16, 1], None),
    ));
    v.push((
        "pickle",
        "valid_state_dict.pkl",
        tensor_pickle("HalfStorage", &[8, 8], &[1, 8], Some("embeddings")),
    ));
    // case 1: the memo refers to itself, 10^25 elements if copied
    let mut laughs = vec![0x80, 2, b']', b'K', 7, b'a', b'q', 0];
    for i in 1..=25u8 {
        laughs.push(b'(');
        for _ in 0..10 {
            laughs.extend([b'h', i - 1]);
        }
        laughs.extend([b'l', b'q', i]);
    }
    laughs.push(b'.');
    v.push(("pickle", "case1_billion_laughs.pkl", laughs));
    // case 2: 100,000 nested lists (stack overflow on drop)
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(std::iter::repeat_n(b'a', 99_999));
    deep.push(b'.');
    v.push(("pickle", "case2_nested_lists.pkl", deep));
    // case 3: BINBYTES8 of length 2^64 - 1
    let mut long = vec![0x80, 4, 0x8e];
    long.extend(u64::MAX.to_le_bytes());
    long.push(b'.');
    v.push(("pickle", "case3_binbytes8_len_max.pkl", long));
    // copy-on-write of a shared list again and again (quadratic)
    let mut cow = vec![0x80, 2, b']', b'('];
    cow.extend(std::iter::repeat_n(b'N', 4000));
    cow.push(b'e');
    for _ in 0..20_000 {
        cow.extend([b'2', b'N', b'a']);
    }
    cow.push(b'.');
    v.push(("pickle", "cow_quadratic.pkl", cow));
    // case 4 in the pickle target's 256-byte storage
    v.push((
        "pickle",
        "case4_shape_2p40_stride0.pkl",
        tensor_pickle("FloatStorage", &[1 << 40, 64], &[0, 1], None),
    ));

    // torch zips
    let small = tensor_pickle("FloatStorage", &[4, 16], &[16, 1], None);
    v.push((
        "torch_zip",
        "valid_tensor.pt",
        torch_zip(&small, &f32_bytes(64), false),
    ));
    v.push((
        "torch_zip",
        "valid_deflated.pt",
        torch_zip(&small, &f32_bytes(64), true),
    ));
    v.push((
        "torch_zip",
        "case4_shape_2p40_stride0.pt",
        torch_zip(
            &tensor_pickle("FloatStorage", &[1 << 40, 64], &[0, 1], None),
            &[0u8; 256],
            false,
        ),
    ));
    v.push((
        "torch_zip",
        "case4_shape_2p22_stride0.pt",
        torch_zip(
            &tensor_pickle("FloatStorage", &[1 << 22, 64], &[0, 1], None),
            &[0u8; 256],
            false,
        ),
    ));
    v.push((
        "torch_zip",
        "case4_numel_overflow.pt",
        torch_zip(
            &tensor_pickle("FloatStorage", &[1 << 62, 1 << 62], &[0, 0], None),
            &[0u8; 256],
            false,
        ),
    ));
    // case 5: a compressed entry that claims 4 GiB, and a deflate bomb
    let mut claims = torch_zip(&small, &f32_bytes(64), true);
    patch_zip_size(&mut claims, "archive/data/0", u32::MAX - 1);
    v.push(("torch_zip", "case5_claims_4gib.pt", claims));
    v.push((
        "torch_zip",
        "case5_deflate_bomb_8mib.pt",
        torch_zip(
            &tensor_pickle("FloatStorage", &[2048, 1024], &[1024, 1], None),
            &vec![0u8; 8 << 20],
            true,
        ),
    ));
    v.push(("torch_zip", "legacy_pickle.pt", small.clone()));

    // pointer-selector checkpoints
    let ckpt = repo_file("demo/sft.ckpt");
    // case 7: a key renamed to layer 99999999 (3.8 GB of expected keys)
    v.push((
        "checkpoint",
        "case7_layer_99999999.ckpt",
        rename_pickle_key(
            &ckpt,
            "lever_lm.pointer_selector.attn_norms.0.bias",
            "lever_lm.pointer_selector.attn_norms.99999999.bias",
        ),
    ));
    v.push(("checkpoint", "valid_demo_sft.ckpt", ckpt));

    // npy
    v.push(("npy", "valid_f4.npy", npy("(4, 2)", 1, &f32_bytes(8))));
    v.push((
        "npy",
        "case6_shape_2p62x64.npy",
        npy("(4611686018427387904, 64)", 1, &f32_bytes(8)),
    ));
    v.push((
        "npy",
        "shape_2p40x64.npy",
        npy("(1099511627776, 64)", 2, &f32_bytes(8)),
    ));
    let mut hlen = npy("(4, 2)", 2, &f32_bytes(8));
    hlen[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    v.push(("npy", "header_len_max.npy", hlen));

    // safetensors
    v.push((
        "safetensors",
        "valid_one_tensor.safetensors",
        safetensors_file(
            r#"{"embeddings":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]}}"#,
            &f32_bytes(8),
        ),
    ));
    v.push((
        "safetensors",
        "shape_overflow.safetensors",
        safetensors_file(
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,64],"data_offsets":[0,32]}}"#,
            &f32_bytes(8),
        ),
    ));
    let mut hl = safetensors_file(r#"{}"#, &[]);
    hl[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    v.push(("safetensors", "header_len_max.safetensors", hl));

    // model.safetensors.index.json (the target adds a valid shard)
    v.push((
        "safetensors_index",
        "valid_index.json",
        br#"{"metadata": {"total_size": 32}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}"#.to_vec(),
    ));
    // case 9: absolute path and `..` in the weight map
    v.push((
        "safetensors_index",
        "case9_absolute_path.json",
        br#"{"weight_map": {"model.norm.weight": "/etc/hostname"}}"#.to_vec(),
    ));
    v.push((
        "safetensors_index",
        "case9_dotdot.json",
        br#"{"weight_map": {"model.norm.weight": "../in-progress/safetensors_index/model-00001-of-00001.safetensors"}}"#.to_vec(),
    ));

    // config.json / preprocessor / generation (the target writes all three)
    v.push((
        "config",
        "valid_config.json",
        repo_file("tests/fixtures/qwen2_5_vl_tiny/config.json"),
    ));
    v.push((
        "config",
        "valid_preprocessor_config.json",
        repo_file("tests/fixtures/qwen2_5_vl_tiny/preprocessor_config.json"),
    ));
    v.push((
        "config",
        "valid_generation_config.json",
        repo_file("tests/fixtures/qwen2_5_vl_tiny/generation_config.json"),
    ));
    let cfg: serde_json::Value =
        serde_json::from_slice(&repo_file("tests/fixtures/qwen2_5_vl_tiny/config.json")).unwrap();
    let mut c = cfg.clone();
    c["image_token_id"] = serde_json::json!(4_295_119_951u64);
    v.push((
        "config",
        "case9_token_id_over_u32.json",
        serde_json::to_vec(&c).unwrap(),
    ));
    let mut c = cfg.clone();
    c["rope_scaling"]["mrope_section"] = serde_json::json!([
        9_223_372_036_854_775_808u64,
        9_223_372_036_854_775_808u64,
        4
    ]);
    v.push((
        "config",
        "case9_mrope_sum_wraps.json",
        serde_json::to_vec(&c).unwrap(),
    ));
    v.push((
        "config",
        "case9_pixel_bounds.json",
        br#"{"min_pixels": 1000000, "max_pixels": 10, "merge_size": 0, "eos_token_id": [4294967296]}"#.to_vec(),
    ));

    // beams
    v.push((
        "beam_json",
        "valid_beam_data.json",
        repo_file("tests/fixtures/pointer_selector/beam_data.json"),
    ));
    let mut deep = b"{\"0\": {\"id_list\": ".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    v.push(("beam_json", "nested_100k.json", deep));
    v.push((
        "beam_jsonl",
        "valid_beams.jsonl",
        b"{\"0\": {\"id_list\": [[3, 1, 0], [2, 4, 0]], \"score_list\": [-0.5, -1.0]}}\n{\"query_idx\": 1, \"id_list\": [[0, 2, 1]], \"score_list\": [0.1]}\n"
            .to_vec(),
    ));
    v.push((
        "beam_jsonl",
        "big_numbers.jsonl",
        b"{\"18446744073709551615\": {\"id_list\": [[18446744073709551615]], \"score_list\": [1e999]}}\n"
            .to_vec(),
    ));

    // official VQA files (the other file of the pair is a fixed valid one)
    v.push((
        "vqa_questions",
        "valid_questions.json",
        VALID_QUESTIONS.as_bytes().to_vec(),
    ));
    v.push((
        "vqa_questions",
        "merged_style.json",
        br#"{"annotations": [{"question_id": 3, "image_id": 1, "question": "q?", "answers": ["a", "b", "a"]}]}"#.to_vec(),
    ));
    v.push((
        "vqa_annotations",
        "valid_annotations.json",
        VALID_ANNOTATIONS.as_bytes().to_vec(),
    ));
    v.push((
        "vqa_annotations",
        "odd_types.json",
        br#"{"annotations": [{"question_id": -1, "image_id": 1e300, "answers": [{"answer": null}]}, {"question_id": 18446744073709551616}]}"#.to_vec(),
    ));

    // sampler cache / candidate indices
    v.push((
        "sampler_cache",
        "valid_sampler_cache.json",
        repo_file("tests/fixtures/pointer_selector/sampler_cache.json"),
    ));
    v.push((
        "sampler_cache",
        "valid_candidate_indices.json",
        repo_file("tests/fixtures/pointer_selector/candidate_indices.json"),
    ));

    // replay (a generate output)
    v.push(("replay", "valid_rl_data.json", rl_json()));

    // images, case 8: a 12000 x 12000 PNG of a few hundred KB
    v.push(("image", "case8_png_12000x12000.png", zero_png(12000, 12000)));
    v.push(("image", "valid_grey_32x16.png", zero_png(32, 16)));
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 30, 90]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    v.push(("image", "valid_16x16.jpg", jpeg));
    v
}

/// Writes the seed corpus again (run with `--ignored`).
#[test]
#[ignore = "writes tests/fuzz_corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = corpus_dir();
    let _ = std::fs::remove_dir_all(&dir);
    for (target, name, bytes) in seed_corpus() {
        assert!(TARGETS.iter().any(|t| t.name == target), "{target}");
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    }
}
