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
        if v <= i32::MAX as usize {
            p.push(b'J');
            p.extend((v as i32).to_le_bytes());
        } else {
            // LONG1 with 8 bytes: sizes past 2^31 (hostile shapes).
            p.extend([0x8a, 8]);
            p.extend((v as u64).to_le_bytes());
        }
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
    std::fs::write(path, torch_zip_bytes(pickle, storage, false)).unwrap();
}

/// The bytes of a torch.save zip; `deflate` compresses the storage entry.
pub(crate) fn torch_zip_bytes(pickle: &[u8], storage: &[u8], deflate: bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opt =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opt).unwrap();
    z.write_all(pickle).unwrap();
    let st_opt = if deflate {
        opt.compression_method(zip::CompressionMethod::Deflated)
    } else {
        opt
    };
    z.start_file("archive/data/0", st_opt).unwrap();
    z.write_all(storage).unwrap();
    z.start_file("archive/version", opt).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap().into_inner()
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

// ---- Hostile inputs (issue 21): each test fails on the unbounded readers.

/// A pickle whose memo refers to itself: level i is a list of ten copies
/// of level i - 1 ("billion laughs", 10^levels elements if copied).
pub(crate) fn billion_laughs_pickle(levels: u8) -> Vec<u8> {
    let mut p = vec![0x80, 2, b']', b'K', 7, b'a', b'q', 0];
    for i in 1..=levels {
        p.push(b'(');
        for _ in 0..10 {
            p.extend([b'h', i - 1]);
        }
        p.extend([b'l', b'q', i]);
    }
    p.push(b'.');
    p
}

#[test]
fn pickle_memo_is_shared_not_copied() {
    // 25 levels: 10^25 list elements if every GET deep-copied (the old
    // reader passed 2.9 GB within 3.5 s); shared, it is a few KB.
    let pkl = billion_laughs_pickle(25);
    assert!(pkl.len() < 700, "{}", pkl.len());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("laughs.pt");
    write_torch_zip(&p, &pkl, b"");
    let started = std::time::Instant::now();
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("laughs.pt") && e.contains("a list"), "{e}");
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    // The shared value still reads as ten copies per level.
    let v = pickle::parse(&billion_laughs_pickle(3)).unwrap();
    let Value::List(l3) = v else { panic!("{v:?}") };
    assert_eq!(l3.len(), 10);
    assert!(matches!(&l3[9], Value::List(l2) if l2.len() == 10));
}

#[test]
fn pickle_copy_on_write_is_budgeted() {
    // A list of n items, then DUP + APPEND again and again: each APPEND on
    // the shared copy copies the whole list (quadratic memory) until the
    // budget stops it.
    let n = 4000;
    let mut p = vec![0x80, 2, b']', b'('];
    p.extend(std::iter::repeat_n(b'N', n));
    p.push(b'e');
    for _ in 0..200_000 {
        p.extend([b'2', b'N', b'a']);
    }
    p.push(b'.');
    let e = pickle::parse(&p).unwrap_err().to_string();
    assert!(
        e.contains("pickle byte") && e.contains("size allows"),
        "{e}"
    );
}

#[test]
fn pickle_nesting_is_capped() {
    // 1,000,000 nested lists: the old reader overflowed the stack
    // (SIGABRT) when it dropped the value.
    let n = 1_000_000;
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    let e = pickle::parse(&p).unwrap_err().to_string();
    assert!(e.contains("nested deeper than 512"), "{e}");
    // The same through MARK / LIST, and inside a torch file.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', n));
    p.extend(std::iter::repeat_n(b'l', n));
    p.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.pt");
    write_torch_zip(&path, &p, b"");
    let e = load_state_dict(&path).unwrap_err().to_string();
    assert!(e.contains("deep.pt") && e.contains("nested deeper"), "{e}");
    // Nesting within the cap parses and drops fine.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 500));
    p.extend(std::iter::repeat_n(b'a', 499));
    p.push(b'.');
    assert!(matches!(pickle::parse(&p), Ok(Value::List(_))));
}

#[test]
fn pickle_lengths_are_checked() {
    // BINBYTES8 / BINUNICODE8 / SHORT_BINBYTES / LONG4 with lengths past
    // the data: `pos + n` overflowed (a panic) for 2^64 - 1.
    for op in [0x8eu8, 0x8d, 0x96] {
        let mut p = vec![0x80, 4, op];
        p.extend(u64::MAX.to_le_bytes());
        p.push(b'.');
        let e = pickle::parse(&p).unwrap_err().to_string();
        assert!(
            e.contains("pickle byte 11") && e.contains("end of pickle data"),
            "{e}"
        );
    }
    let mut p = vec![0x80, 2, 0x8b];
    p.extend(u32::MAX.to_le_bytes());
    let e = pickle::parse(&p).unwrap_err().to_string();
    assert!(e.contains("end of pickle data"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("len.pt");
    let mut p = vec![0x80, 4, 0x8e];
    p.extend(u64::MAX.to_le_bytes());
    write_torch_zip(&path, &p, b"");
    let e = load_matrix(&path).unwrap_err().to_string();
    assert!(e.contains("len.pt") && e.contains("data.pkl"), "{e}");
}

#[test]
fn tensor_sizes_are_checked_against_the_storage() {
    let dir = tempfile::tempdir().unwrap();
    let storage = vec![0u8; 256]; // 64 f32
    let cases: [(&str, &[usize], &[usize], &str); 5] = [
        // passed the old bounds check, then a 256 TiB allocation (abort)
        (
            "huge.pt",
            &[1 << 40, 64],
            &[0, 1],
            "more elements than its storage",
        ),
        // accepted by the old reader: 1 GiB from 256 bytes
        (
            "broadcast.pt",
            &[1 << 22, 64],
            &[0, 1],
            "more elements than its storage",
        ),
        // the element count overflows usize
        (
            "overflow.pt",
            &[1 << 62, 1 << 62],
            &[0, 0],
            "more elements than fit",
        ),
        // (s - 1) * stride overflows usize
        (
            "stride.pt",
            &[2, 4],
            &[usize::MAX / 2, 1],
            "extends past its storage",
        ),
        // plainly past the end
        ("past.pt", &[8, 8], &[9, 1], "extends past its storage"),
    ];
    for (name, shape, stride, want) in cases {
        let p = dir.path().join(name);
        write_torch_zip(
            &p,
            &tensor_pickle("FloatStorage", 0, shape, stride, None),
            &storage,
        );
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
    // A view within the storage is still read (a transposed 8 x 8).
    let p = dir.path().join("ok.pt");
    write_torch_zip(
        &p,
        &tensor_pickle("FloatStorage", 0, &[8, 8], &[1, 8], None),
        &storage,
    );
    assert_eq!(load_matrix(&p).unwrap().data.len(), 64);
}

#[test]
fn tensors_sharing_one_storage_are_bounded() {
    // 2,000 tensor entries over one 64 KiB storage: 125 MiB of output from a
    // small file; the archive's output allowance stops it.
    let storage = vec![0u8; 64 << 10];
    let one = tensor_pickle("FloatStorage", 0, &[128, 128], &[128, 1], Some("t"));
    // Reuse the tensor: build a dict {"t0": T, "t1": T, ...} with the
    // tensor memoized once.
    let body = &one[2..one.len() - 1]; // "} 'X t' <tensor> s" without PROTO/STOP
    let mut p = vec![0x80, 2];
    p.extend(&body[..body.len() - 1]); // leave the tensor on the stack
    p.extend([b'r', 0, 0, 0, 0, b's']); // PUT 0, SETITEM
    for i in 1..2000 {
        let key = format!("t{i}");
        p.push(b'X');
        p.extend((key.len() as u32).to_le_bytes());
        p.extend(key.as_bytes());
        p.extend([b'j', 0, 0, 0, 0, b's']);
    }
    p.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.pt");
    write_torch_zip(&path, &p, &storage);
    let e = load_state_dict(&path).unwrap_err().to_string();
    assert!(
        e.contains("shared.pt") && e.contains("repeating one storage"),
        "{e}"
    );
}

/// Sets the "uncompressed size" of the zip entry `name` in both its local
/// and central headers.
fn patch_zip_size(zip: &mut [u8], name: &str, size: u32) {
    let n = name.as_bytes();
    let mut i = 0;
    while i + 46 < zip.len() {
        let sig = u32::from_le_bytes([zip[i], zip[i + 1], zip[i + 2], zip[i + 3]]);
        if sig == 0x04034b50 && zip[i + 30..].starts_with(n) {
            zip[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
        }
        if sig == 0x02014b50 && zip[i + 46..].starts_with(n) {
            zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
        i += 1;
    }
}

#[test]
fn compressed_entries_are_bounded_by_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let pkl = tensor_pickle("FloatStorage", 0, &[16, 16], &[16, 1], None);
    // A valid compressed storage still loads.
    let vals: Vec<u8> = (0..256).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let p = dir.path().join("deflated.pt");
    std::fs::write(&p, torch_zip_bytes(&pkl, &vals, true)).unwrap();
    assert_eq!(load_matrix(&p).unwrap().data[255], 255.0);
    // The header claims 4 GiB: never trusted for the allocation.
    let mut bytes = torch_zip_bytes(&pkl, &vals, true);
    patch_zip_size(&mut bytes, "archive/data/0", u32::MAX - 1);
    let p = dir.path().join("claims.pt");
    std::fs::write(&p, &bytes).unwrap();
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(
        e.contains("claims.pt") && e.contains("claims 4294967294 bytes"),
        "{e}"
    );
    // A deflate bomb: 8 MiB of zeros in a few KB, past the ratio.
    let zeros = vec![0u8; 8 << 20];
    let pkl = tensor_pickle("FloatStorage", 0, &[2048, 1024], &[1024, 1], None);
    let bytes = torch_zip_bytes(&pkl, &zeros, true);
    assert!(bytes.len() < 64 << 10, "{}", bytes.len());
    let p = dir.path().join("bomb.pt");
    std::fs::write(&p, &bytes).unwrap();
    let e = load_matrix(&p).unwrap_err().to_string();
    assert!(e.contains("bomb.pt") && e.contains("at most 64x"), "{e}");
}

/// An `.npy` file (format 1.0, little-endian f4) with the given shape text
/// and data.
pub(crate) fn npy_bytes(shape: &str, data: &[u8]) -> Vec<u8> {
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.extend(data);
    npy
}

#[test]
fn npy_shape_products_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // (2^62, 64) wrapped to 0 elements and was accepted (then "capacity
    // overflow" in a worker).
    for (name, shape) in [
        ("wrap.npy", "(4611686018427387904, 64)"),
        ("big.npy", "(1099511627776, 64)"),
        ("short.npy", "(3, 2)"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, npy_bytes(shape, &[0u8; 16])).unwrap();
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(
            e.contains(name) && e.contains("truncated .npy data"),
            "{name}: {e}"
        );
    }
    let p = dir.path().join("ok.npy");
    std::fs::write(&p, npy_bytes("(2, 2)", &[0u8; 16])).unwrap();
    assert_eq!(load_matrix(&p).unwrap().rows, 2);
}
