//! M-RoPE position ids of a prompt (HF `get_rope_index`, image part).
//!
//! Qwen2.5-VL gives every token three positions (temporal, height, width).
//! Text tokens use the running index on all three rows; the tokens of an
//! image get `start` (t), `start + row` (h) and `start + col` (w) on the
//! merged patch grid, and the text after the image resumes at
//! `start + max(merged_h, merged_w)`. The difference between the largest
//! position + 1 and the token count (`rope_delta`) shifts the positions of
//! generated tokens.

/// Errors when the ids and the image grids do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum RopeIndexError {
    /// More images in the ids than grids given.
    #[error("image {index} (vision start at token {position}) has no grid: only {available} grids given")]
    MissingGrid {
        /// 0-based image number.
        index: usize,
        /// Token index of its `<|vision_start|>`.
        position: usize,
        /// Number of grids given.
        available: usize,
    },
    /// An image's token run is shorter than its grid requires.
    #[error(
        "image {index} starting at token {position} needs {expected} image tokens, found {found}"
    )]
    ShortImage {
        /// 0-based image number.
        index: usize,
        /// Token index of its first image token.
        position: usize,
        /// `t * h * w / merge^2`.
        expected: usize,
        /// Contiguous image tokens present.
        found: usize,
    },
    /// A grid is not divisible by the merge size.
    #[error("image {index}: grid {grid:?} is not divisible by spatial merge {merge}")]
    BadGrid {
        /// 0-based image number.
        index: usize,
        /// The `[t, h, w]` grid.
        grid: [usize; 3],
        /// Merge size.
        merge: usize,
    },
    /// Fewer images in the ids than grids given.
    #[error("{given} image grids given but the ids hold {found} images")]
    UnusedGrids {
        /// Grids given.
        given: usize,
        /// Images found.
        found: usize,
    },
}

/// Position ids `[t, h, w]` (one entry per token) and the rope delta of one
/// unpadded prompt.
///
/// Images are counted as HF does: a `<|vision_start|>` directly followed by
/// an image token; image `i` takes `image_grid_thw[i]` and its tokens are the
/// run starting at the first image token after the previous image. Video
/// tokens (no grids are taken for them here) are positioned like text.
/// `rope_delta = max(position) + 1 - input_ids.len()`.
pub fn mrope_position_ids(
    input_ids: &[u32],
    image_grid_thw: &[[usize; 3]],
    spatial_merge: usize,
    image_token_id: u32,
    vision_start_token_id: u32,
) -> Result<([Vec<i64>; 3], i64), RopeIndexError> {
    let n = input_ids.len();
    let image_starts: Vec<usize> = input_ids
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] == vision_start_token_id && w[1] == image_token_id)
        .map(|(i, _)| i)
        .collect();
    if image_starts.len() < image_grid_thw.len() {
        return Err(RopeIndexError::UnusedGrids {
            given: image_grid_thw.len(),
            found: image_starts.len(),
        });
    }
    let mut pos: [Vec<i64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    // Next position to hand out (= max so far + 1, or 0 at the start).
    let mut next: i64 = 0;
    let mut st = 0usize;
    let push_text = |pos: &mut [Vec<i64>; 3], next: &mut i64, len: usize| {
        for k in 0..len as i64 {
            for row in pos.iter_mut() {
                row.push(*next + k);
            }
        }
        *next += len as i64;
    };
    for (index, &vs) in image_starts.iter().enumerate() {
        let grid = *image_grid_thw
            .get(index)
            .ok_or(RopeIndexError::MissingGrid {
                index,
                position: vs,
                available: image_grid_thw.len(),
            })?;
        let [t, h, w] = grid;
        if spatial_merge == 0 || h % spatial_merge != 0 || w % spatial_merge != 0 {
            return Err(RopeIndexError::BadGrid {
                index,
                grid,
                merge: spatial_merge,
            });
        }
        let (gh, gw) = (h / spatial_merge, w / spatial_merge);
        // First image token at or after `st` (HF: `input_tokens.index(image_token_id, st)`).
        let ed = (st..n)
            .find(|&i| input_ids[i] == image_token_id)
            .unwrap_or(n);
        let expected = t * gh * gw;
        let found = input_ids[ed..]
            .iter()
            .take(expected)
            .take_while(|&&id| id == image_token_id)
            .count();
        if found < expected {
            return Err(RopeIndexError::ShortImage {
                index,
                position: ed,
                expected,
                found,
            });
        }
        push_text(&mut pos, &mut next, ed - st);
        let start = next;
        for _ in 0..t {
            for r in 0..gh as i64 {
                for c in 0..gw as i64 {
                    // Still images: the temporal index is 0 for every frame.
                    pos[0].push(start);
                    pos[1].push(start + r);
                    pos[2].push(start + c);
                }
            }
        }
        if expected > 0 {
            next = start + gh.max(gw) as i64;
        }
        st = ed + expected;
    }
    push_text(&mut pos, &mut next, n - st);
    let max = pos
        .iter()
        .flat_map(|r| r.iter())
        .copied()
        .max()
        .unwrap_or(-1);
    Ok((pos, max + 1 - n as i64))
}

/// Left-pads per-row position ids into the batch layout `[3][B][L]`
/// (flattened row-major), with 0 at padded positions, as HF returns them
/// for a left-padded batch. `seq_len` must be at least the longest row.
pub fn pad_position_ids(rows: &[&[Vec<i64>; 3]], seq_len: usize) -> Vec<i64> {
    let b = rows.len();
    let mut out = vec![0i64; 3 * b * seq_len];
    for (bi, row) in rows.iter().enumerate() {
        for (axis, values) in row.iter().enumerate() {
            let len = values.len().min(seq_len);
            let base = (axis * b + bi) * seq_len + seq_len - len;
            out[base..base + len].copy_from_slice(&values[values.len() - len..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;
    use std::path::Path;

    const IMAGE: u32 = 151655;
    const VSTART: u32 = 151652;

    fn i64_tensor(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<i64>) {
        let t = st.tensor(key).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    #[test]
    fn matches_fixture_position_ids_and_deltas() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny");
        let bytes = std::fs::read(dir.join("cases.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let (shape, ids) = i64_tensor(&st, &format!("{name}.input_ids"));
            let (_, mask) = i64_tensor(&st, &format!("{name}.attention_mask"));
            let (pshape, want_pos) = i64_tensor(&st, &format!("{name}.position_ids"));
            let (_, want_delta) = i64_tensor(&st, &format!("{name}.rope_deltas"));
            let (_, grids) = i64_tensor(&st, &format!("{name}.image_grid_thw"));
            let grids: Vec<[usize; 3]> = grids
                .chunks_exact(3)
                .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
                .collect();
            let (b, l) = (shape[0], shape[1]);
            assert_eq!(pshape, vec![3, b, l]);
            let mut rows = Vec::new();
            let mut grid_at = 0;
            for bi in 0..b {
                let row: Vec<u32> = (0..l)
                    .filter(|&j| mask[bi * l + j] == 1)
                    .map(|j| ids[bi * l + j] as u32)
                    .collect();
                let n_img = row.windows(2).filter(|w| w == &[VSTART, IMAGE]).count();
                let g = &grids[grid_at..grid_at + n_img];
                grid_at += n_img;
                let (pos, delta) = mrope_position_ids(&row, g, 2, IMAGE, VSTART).unwrap();
                assert_eq!(delta, want_delta[bi], "{name} row {bi}");
                rows.push(pos);
            }
            assert_eq!(grid_at, grids.len());
            let refs: Vec<&[Vec<i64>; 3]> = rows.iter().collect();
            assert_eq!(pad_position_ids(&refs, l), want_pos, "{name}");
        }
    }

    #[test]
    fn text_only_and_layout() {
        let (pos, delta) = mrope_position_ids(&[1, 2, 3], &[], 2, IMAGE, VSTART).unwrap();
        assert_eq!(pos[0], vec![0, 1, 2]);
        assert_eq!(pos[2], vec![0, 1, 2]);
        assert_eq!(delta, 0);
        // text, vision_start, 2x3 merged image (grid 4x6), vision_end, text
        let mut ids = vec![7, VSTART];
        ids.extend(std::iter::repeat_n(IMAGE, 6));
        ids.extend([VSTART + 1, 9]);
        let (pos, delta) = mrope_position_ids(&ids, &[[1, 4, 6]], 2, IMAGE, VSTART).unwrap();
        assert_eq!(pos[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(pos[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(pos[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(delta, 7 - 10);
        let padded = pad_position_ids(&[&pos], 12);
        assert_eq!(&padded[..4], &[0, 0, 0, 1]);
        assert_eq!(padded.len(), 36);
    }

    #[test]
    fn grid_mismatches_are_errors() {
        let mut ids = vec![VSTART];
        ids.extend(std::iter::repeat_n(IMAGE, 3));
        let e = mrope_position_ids(&ids, &[[1, 4, 4]], 2, IMAGE, VSTART).unwrap_err();
        assert!(
            matches!(
                e,
                RopeIndexError::ShortImage {
                    expected: 4,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
        let e = mrope_position_ids(&ids, &[], 2, IMAGE, VSTART).unwrap_err();
        assert!(matches!(e, RopeIndexError::MissingGrid { .. }), "{e}");
        let e = mrope_position_ids(&[1, 2], &[[1, 2, 2]], 2, IMAGE, VSTART).unwrap_err();
        assert!(matches!(e, RopeIndexError::UnusedGrids { .. }), "{e}");
        let e = mrope_position_ids(&ids, &[[1, 3, 2]], 2, IMAGE, VSTART).unwrap_err();
        assert!(matches!(e, RopeIndexError::BadGrid { .. }), "{e}");
    }
}
