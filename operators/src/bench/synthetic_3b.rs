//! A random-weight checkpoint with every shape of the published
//! Qwen2.5-VL-3B-Instruct (`bench vqa --synthetic 3b`): text 36 layers of
//! width 2048 (16 query / 2 KV heads, MLP 11008, vocabulary 151,936, tied
//! head, M-RoPE sections [16, 24, 24], rope θ 1e6), vision 32 blocks of
//! width 1280 (MLP 3420, 16 heads, window 112, full attention in blocks
//! 7/15/23/31) merged to 2048: 3.75 B parameters, written in bf16 as 4
//! shards with an index, as the published checkpoint is. The tokenizer,
//! chat template, processor settings and prompt images come from the tiny
//! fixture, since the real ones cannot be downloaded here.
//!
//! The tensors are written one by one, straight from a fast generator
//! into the file (a few MB buffered), so writing the 7.5 GB takes little
//! memory. Weights are uniform with standard deviation 0.02 (norms 1,
//! biases 0), reproducible from a fixed seed.

use std::io::Write;
use std::path::Path;

use super::BenchError;
use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
use crate::models::qwen2_5_vl::weights::{expected_shapes, INDEX_FILE, LM_HEAD};

/// Shards of the written checkpoint (as published).
pub const SHARDS: usize = 4;

/// Files copied from the fixture next to the weights.
const FIXTURE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
];

/// The published Qwen2.5-VL-3B-Instruct configuration, with the fixture's
/// token ids (the same as the published ones).
fn config_3b(fixture_config: &serde_json::Value) -> serde_json::Value {
    let mut c = fixture_config.clone();
    for (key, value) in [
        ("hidden_size", serde_json::json!(2048)),
        ("intermediate_size", serde_json::json!(11008)),
        ("num_attention_heads", serde_json::json!(16)),
        ("num_key_value_heads", serde_json::json!(2)),
        ("num_hidden_layers", serde_json::json!(36)),
        ("max_window_layers", serde_json::json!(70)),
        ("rope_theta", serde_json::json!(1_000_000.0)),
        ("tie_word_embeddings", serde_json::json!(true)),
        ("vocab_size", serde_json::json!(151_936)),
        ("torch_dtype", serde_json::json!("bfloat16")),
    ] {
        c[key] = value;
    }
    c["rope_scaling"] = serde_json::json!({"type": "mrope", "mrope_section": [16, 24, 24]});
    c["vision_config"] = serde_json::json!({
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    });
    c
}

/// xorshift64*: a fast, reproducible stream of 64-bit values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// bf16 words of one tensor: `fill` for norms (1.0) and biases (0.0),
/// else uniform in ±0.02·√3 (standard deviation 0.02).
fn words(name: &str, n: usize, rng: &mut Rng, out: &mut impl FnMut(&[u16])) {
    let is_norm = name.ends_with("norm.weight")
        || name.ends_with("norm1.weight")
        || name.ends_with("norm2.weight")
        || name.ends_with("ln_q.weight");
    let fill = if is_norm {
        Some(half::bf16::from_f32(1.0).to_bits())
    } else if name.ends_with(".bias") {
        Some(0)
    } else {
        None
    };
    let scale = 0.02 * 3f32.sqrt() / (1u64 << 23) as f32;
    let mut buf = vec![0u16; 1 << 16];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len());
        for w in &mut buf[..k] {
            *w = match fill {
                Some(f) => f,
                None => {
                    // 24 random bits -> uniform in [-1, 1) · 0.02·√3.
                    let r = (rng.next() >> 40) as i64 - (1 << 23);
                    half::bf16::from_f32(r as f32 * scale).to_bits()
                }
            };
        }
        out(&buf[..k]);
        left -= k;
    }
}

/// Writes the checkpoint into `dir` (which must exist): config, index,
/// shards, the fixture's tokenizer / processor files and its `images/`.
/// Returns the number of parameters written.
pub fn write(fixture: &Path, dir: &Path) -> Result<u64, BenchError> {
    for f in FIXTURE_FILES {
        let src = fixture.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f))?;
        }
    }
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    for e in std::fs::read_dir(fixture.join("images"))? {
        let p = e?.path();
        if let Some(name) = p.file_name() {
            std::fs::copy(&p, images.join(name))?;
        }
    }
    let fixture_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json"))?)?;
    let config_path = dir.join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config_3b(&fixture_config))?,
    )?;
    let parsed = Qwen25VlConfig::from_file(&config_path).map_err(BenchError::workload)?;
    // Tied: the head is the embedding, not stored.
    let tensors: Vec<(String, Vec<usize>)> = expected_shapes(&parsed)
        .into_iter()
        .filter(|(n, _)| n != LM_HEAD)
        .collect();
    let total: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    // Consecutive runs of tensors of about a quarter of the bytes each.
    let mut shards: Vec<Vec<&(String, Vec<usize>)>> = vec![Vec::new(); SHARDS];
    let mut acc = 0u64;
    for t in &tensors {
        let s = ((acc * SHARDS as u64) / total.max(1)) as usize;
        shards[s.min(SHARDS - 1)].push(t);
        acc += t.1.iter().product::<usize>() as u64;
    }
    let mut weight_map = serde_json::Map::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, SHARDS);
        write_shard(&dir.join(&file), shard, &mut rng)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total * 2},
        "weight_map": weight_map,
    });
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)?;
    Ok(total)
}

/// One bf16 safetensors file holding `tensors` in order.
fn write_shard(
    path: &Path,
    tensors: &[&(String, Vec<usize>)],
    rng: &mut Rng,
) -> Result<(), BenchError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&header)?;
    // The data section starts on an 8-byte boundary (padded with spaces).
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(&text)?;
    let mut failed = None;
    let mut bytes = Vec::with_capacity(2 << 16);
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        words(name, n, rng, &mut |chunk| {
            if failed.is_some() {
                return;
            }
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|w| w.to_le_bytes()));
            if let Err(e) = out.write_all(&bytes) {
                failed = Some(e);
            }
        });
        if let Some(e) = failed.take() {
            return Err(e.into());
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::qwen2_5_vl::weights::WeightStore;

    #[test]
    fn the_3b_config_has_the_published_shapes() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny");
        let fc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec(&config_3b(&fc)).unwrap()).unwrap();
        let c = Qwen25VlConfig::from_file(&path).unwrap();
        let n: usize = expected_shapes(&c)
            .iter()
            .filter(|(n, _)| n != LM_HEAD)
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // 3.75 B parameters (the published count with the tied head).
        assert_eq!(n, 3_754_622_976);
    }

    #[test]
    fn shards_are_valid_safetensors_in_bf16() {
        let dir = tempfile::tempdir().unwrap();
        let t = [
            ("a.norm.weight".to_string(), vec![3]),
            ("a.bias".to_string(), vec![2]),
            ("a.weight".to_string(), vec![5, 7]),
        ];
        let refs: Vec<&(String, Vec<usize>)> = t.iter().collect();
        let path = dir.path().join("model.safetensors");
        write_shard(&path, &refs, &mut Rng(1)).unwrap();
        let store = WeightStore::open(dir.path(), false).unwrap();
        assert_eq!(store.read_f32("a.norm.weight").unwrap().0, vec![1.0; 3]);
        assert_eq!(store.read_f32("a.bias").unwrap().0, vec![0.0; 2]);
        let (w, shape) = store.read_f32("a.weight").unwrap();
        assert_eq!(shape, vec![5, 7]);
        let bound = 0.02 * 3f32.sqrt() * 1.01;
        assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|&x| x != 0.0));
    }
}
