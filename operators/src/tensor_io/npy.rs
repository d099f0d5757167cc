//! `.npy` reader (format versions 1-3): little-endian f32 / f16 / f64 arrays in
//! C order.

use std::path::Path;

use super::{map_file, TensorIoError};

fn err(path: &Path, msg: impl Into<String>) -> TensorIoError {
    TensorIoError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Value of `'key': value` in the header dict (text up to the next top-level
/// comma or closing brace; tuples kept whole).
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}'");
    let pat2 = format!("\"{key}\"");
    let i = header.find(&pat1).or_else(|| header.find(&pat2))?;
    let rest = &header[i + pat1.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (j, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..j].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

/// Reads an `.npy` file into (shape, row-major f32 values).
pub fn load(path: &Path) -> Result<(Vec<usize>, Vec<f32>), TensorIoError> {
    let mmap = map_file(path)?;
    let b = &mmap[..];
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(err(path, "not an .npy file (bad magic)"));
    }
    // Header length and start; `hstart + hlen` cannot overflow (a u32 plus 12).
    let (hlen, hstart) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err(err(path, "truncated .npy header"));
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(err(path, format!("unsupported .npy version {v}"))),
    };
    if b.len() < hstart + hlen {
        return Err(err(path, "truncated .npy header"));
    }
    let header = String::from_utf8_lossy(&b[hstart..hstart + hlen]).into_owned();
    let descr = header_field(&header, "descr")
        .ok_or_else(|| err(path, "npy header has no 'descr'"))?
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    let fortran = header_field(&header, "fortran_order").unwrap_or("False");
    if fortran == "True" {
        return Err(err(
            path,
            "Fortran-order .npy arrays are not supported (save in C order)",
        ));
    }
    let shape_s =
        header_field(&header, "shape").ok_or_else(|| err(path, "npy header has no 'shape'"))?;
    let shape: Vec<usize> = shape_s
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| err(path, format!("bad shape {shape_s}")))
        })
        .collect::<Result<_, _>>()?;
    // Checked: a shape such as (2^62, 64) must not wrap to a small count.
    let numel = shape.iter().try_fold(1usize, |acc, &s| acc.checked_mul(s));
    let es = match descr.as_str() {
        "<f4" | "=f4" => 4,
        "<f2" | "=f2" => 2,
        "<f8" | "=f8" => 8,
        other => {
            return Err(err(
                path,
                format!("unsupported .npy dtype {other} (expected little-endian f4, f2 or f8)"),
            ))
        }
    };
    let data = &b[hstart + hlen..];
    let need = numel.and_then(|n| n.checked_mul(es));
    let Some(need) = need.filter(|&need| need <= data.len()) else {
        return Err(err(
            path,
            format!(
                "truncated .npy data: shape {shape:?} of {descr} needs {} bytes, the file holds {} after its header",
                need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                data.len()
            ),
        ));
    };
    let data = &data[..need];
    let out: Vec<f32> = match es {
        4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        2 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
    };
    Ok((shape, out))
}
