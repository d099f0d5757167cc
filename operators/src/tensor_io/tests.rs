use super::*;
use std::io::Write;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pointer_selector")
        .join(name)
}

/// Pickle bytes of `torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`,
/// optionally wrapped in a `{name: tensor}` dict.
fn tensor_pickle(
    class: &str,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    dict_key: Option<&str>,
) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let su = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    };
    if dict_key.is_some() {
        p.push(b'}');
        su(&mut p, dict_key.unwrap_or(""));
    }
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
    p.push(b'(');
    // persistent id ('storage', torch.<class>, '0', 'cpu', numel)
    p.push(b'(');
    su(&mut p, "storage");
    p.extend(format!("ctorch\n{class}\n").as_bytes());
    su(&mut p, "0");
    su(&mut p, "cpu");
    int(&mut p, 1000);
    p.push(b't');
    p.push(b'Q');
    int(&mut p, offset);
    p.push(b'(');
    for &s in shape {
        int(&mut p, s);
    }
    p.push(b't');
    p.push(b'(');
    for &s in stride {
        int(&mut p, s);
    }
    p.push(b't');
    p.push(0x89);
    p.extend(b"ccollections\nOrderedDict\n)R");
    p.push(b't');
    p.push(b'R');
    if dict_key.is_some() {
        p.push(b's');
    }
    p.push(b'.');
    p
}

fn write_torch_zip(path: &Path, pickle: &[u8], storage: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opt =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opt).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/data/0", opt).unwrap();
    z.write_all(storage).unwrap();
    z.start_file("archive/version", opt).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

#[test]
fn loads_fixture_embeddings() {
    let m = load_matrix(&fixture("candidate_embeddings.pt")).unwrap();
    assert_eq!((m.rows, m.cols), (64, 64));
    let pool = load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap();
    assert_eq!((pool.rows, pool.cols), (300, 64));
    // candidate p = pool row 20 + p
    assert_eq!(m.row(0), pool.row(20));
    assert_eq!(m.row(63), pool.row(83));
    let q = load_matrix(&fixture("query_embeddings.pt")).unwrap();
    assert_eq!(q.row(39), pool.row(39));
}

#[test]
fn loads_lightning_checkpoint() {
    let sd = load_state_dict(&fixture("sft.ckpt")).unwrap();
    let w = &sd["lever_lm.pointer_selector.query_update_gate.weight"];
    assert_eq!(w.shape, vec![32, 64]);
    assert!(sd.contains_key("lever_lm.pointer_selector.cross_attn_layers.2.in_proj_bias"));
    assert!(sd.contains_key("lever_lm.sen_model.text_model.embeddings.token_embedding.weight"));
    assert!(!sd.contains_key("epoch"));
}

#[test]
fn half_bf16_and_strided_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
    // f16, offset 2, shape [2,3] contiguous
    let mut st = vec![0u8; 4];
    for v in &vals {
        st.extend(half::f16::from_f32(*v).to_le_bytes());
    }
    let p = dir.path().join("h.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("HalfStorage", 2, &[2, 3], &[3, 1], None),
        &st,
    );
    let m = load_matrix(&p).unwrap();
    assert_eq!(m.data, vals[..6].to_vec());
    // bf16 transposed view: shape [3,2] stride [1,3] over storage of 6
    let mut st = vec![];
    for v in &vals[..6] {
        st.extend(half::bf16::from_f32(*v).to_le_bytes());
    }
    let p = dir.path().join("b.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("BFloat16Storage", 0, &[3, 2], &[1, 3], None),
        &st,
    );
    let m = load_matrix(&p).unwrap();
    assert_eq!((m.rows, m.cols), (3, 2));
    assert_eq!(
        m.data,
        vec![vals[0], vals[3], vals[1], vals[4], vals[2], vals[5]]
    );
    // f32 in a dict under 'embeddings'
    let st: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = dir.path().join("d.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("FloatStorage", 0, &[4, 3], &[3, 1], Some("embeddings")),
        &st,
    );
    assert_eq!(load_matrix(&p).unwrap().data, vals);
    // the same file read as a bare state dict
    let sd = load_state_dict(&p).unwrap();
    assert_eq!(sd["embeddings"].shape, vec![4, 3]);
    assert_eq!(sd["embeddings"].data, vals);
    // storage too small
    let p = dir.path().join("s.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("FloatStorage", 6, &[4, 3], &[3, 1], None),
        &st,
    );
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("past its storage"), "{e}");
}

#[test]
fn rejects_nan_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut vals: Vec<f32> = (0..12).map(|i| i as f32).collect();
    vals[7] = f32::NAN;
    let st: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = dir.path().join("nan.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("FloatStorage", 0, &[4, 3], &[3, 1], None),
        &st,
    );
    match load_matrix(&p).unwrap_err() {
        TensorIoError::NonFinite { row, col, path, .. } => {
            assert_eq!((row, col), (2, 1));
            assert_eq!(path, p);
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn corrupt_and_non_tensor_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.pt");
    std::fs::write(&p, b"this is not a zip").unwrap();
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(
        e.contains("garbage.pt") && e.contains("not a PyTorch zip"),
        "{e}"
    );
    // truncated real file
    let bytes = std::fs::read(fixture("candidate_embeddings.pt")).unwrap();
    let p = dir.path().join("trunc.pt");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("trunc.pt"), "{e}");
    // a checkpoint is not a single tensor: error lists the dict
    let e = load_matrix(&fixture("sft.ckpt")).unwrap_err().to_string();
    assert!(e.contains("sft.ckpt") && e.contains("dict"), "{e}");
    // a pickle holding an int
    let p = dir.path().join("int.pt");
    write_torch_zip(&p, &[0x80, 2, b'K', 5, b'.'], b"");
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("int.pt") && e.contains("an int"), "{e}");
    let e = load_state_dict(&p).unwrap_err().to_string();
    assert!(e.contains("int.pt"), "{e}");
    // bad opcode
    let p = dir.path().join("op.pt");
    write_torch_zip(&p, &[0x80, 2, 0xff, b'.'], b"");
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("op.pt") && e.contains("opcode"), "{e}");
}

#[test]
fn safetensors_and_npy() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.25).collect();
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &bytes).unwrap();
    let other =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 2], &bytes).unwrap();
    let p1 = dir.path().join("one.safetensors");
    safetensors::serialize_to_file(vec![("x", view.clone())], None, &p1).unwrap();
    assert_eq!(load_matrix(&p1).unwrap().data, vals);
    let p2 = dir.path().join("two.safetensors");
    safetensors::serialize_to_file(vec![("a", view.clone()), ("b", other.clone())], None, &p2)
        .unwrap();
    let e = load_matrix(&p2).unwrap_err().to_string();
    assert!(
        e.contains("ambiguous") && e.contains("\"a\"") && e.contains("\"b\""),
        "{e}"
    );
    let p3 = dir.path().join("named.safetensors");
    safetensors::serialize_to_file(vec![("embeddings", other), ("b", view)], None, &p3).unwrap();
    let m = load_matrix(&p3).unwrap();
    assert_eq!((m.rows, m.cols), (3, 2));
    let sd = load_state_dict(&p3).unwrap();
    assert_eq!(sd["b"].shape, vec![2, 3]);

    // npy f8
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    for v in &vals {
        npy.extend((*v as f64).to_le_bytes());
    }
    let p = dir.path().join("a.npy");
    std::fs::write(&p, &npy).unwrap();
    let m = load_matrix(&p).unwrap();
    assert_eq!((m.rows, m.cols, m.data.clone()), (3, 2, vals.clone()));
}

#[test]
fn sha256_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, b"abc").unwrap();
    assert_eq!(
        file_sha256(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
