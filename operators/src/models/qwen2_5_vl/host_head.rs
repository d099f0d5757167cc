//! The token embedding and the LM head of [`TextModel`](super::text::TextModel)
//! loaded for the host kernels (ndarray backend).
//!
//! The head is packed for `host::lm_head` while it is read, a few rows at a
//! time, so the checkpoint's matrix and the packed one never coexist; a bf16
//! head stays bf16 (the kernel widens it in registers). A tied checkpoint
//! holds the matrix once: the embedding rows are then gathered from the
//! packed head. An untied embedding is held as stored (bf16 or f32) and
//! gathered row by row.

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::host;
use super::host_bf16;
use super::text::{HeadLayout, TensorSource, TextError};

/// Checkpoint name of an untied LM head.
const LM_HEAD: &str = "lm_head.weight";

/// The embedding table, the packed head and their layout, as
/// `TextModel::load` stores them on the host.
pub(crate) type HostHead<B> = (Param<Tensor<B, 2>>, Param<Tensor<B, 2>>, HeadLayout);

/// Loads the embedding `emb_key` [v, d] and the head for the host kernels.
/// With `tie`, a stored `lm_head.weight` equal to the embedding is dropped
/// (the matrix is held once); a different one is used as the head, as
/// before.
pub(crate) fn load<B: Backend>(
    src: &dyn TensorSource,
    emb_key: &str,
    tie: bool,
    v: usize,
    d: usize,
    device: &B::Device,
) -> Result<HostHead<B>, TextError> {
    let separate = src.contains(LM_HEAD) && !(tie && same_matrix(src, emb_key, v, d)?);
    let head_key = if separate { LM_HEAD } else { emb_key };
    let packed = packed_head::<B>(src, head_key, v, d, device)?;
    let (table, layout) = if separate {
        (table::<B>(src, emb_key, v, d, device)?, HeadLayout::Packed)
    } else {
        (
            Tensor::from_data(TensorData::new(Vec::<f32>::new(), [0, d]), device),
            HeadLayout::PackedTied,
        )
    };
    Ok((
        Param::from_tensor(table),
        Param::from_tensor(packed),
        layout,
    ))
}

/// Whether the stored head equals the embedding (compared in the stored
/// words when both are bf16).
fn same_matrix(
    src: &dyn TensorSource,
    emb_key: &str,
    v: usize,
    d: usize,
) -> Result<bool, TextError> {
    if let (Some(a), Some(b)) = (
        src.tensor_bf16(emb_key, &[v, d])?,
        src.tensor_bf16(LM_HEAD, &[v, d])?,
    ) {
        return Ok(a == b);
    }
    Ok(src.tensor_f32(emb_key, &[v, d])? == src.tensor_f32(LM_HEAD, &[v, d])?)
}

/// The matrix `key` [v, d] packed by `host::pack_lm_head`: bf16 words
/// packed while they are read, or f32 values.
fn packed_head<B: Backend>(
    src: &dyn TensorSource,
    key: &str,
    v: usize,
    d: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2>, TextError> {
    let mut buf: Option<(Vec<u16>, [usize; 2])> = None;
    let streamed = src.bf16_rows(key, [v, d], &mut |first, rows| {
        let (out, _) = buf.get_or_insert_with(|| host::packed_head_buffer::<u16>(v, d));
        host::pack_head_rows(out, first, rows, d);
    })?;
    if streamed {
        let (words, shape) = buf.unwrap_or_else(|| host::packed_head_buffer::<u16>(v, d));
        return host_bf16::bf16_tensor::<B, 2>(words, shape).ok_or_else(|| internal(key));
    }
    let w = src.tensor_f32(key, &[v, d])?;
    let (packed, shape) = host::pack_lm_head(&w, v, d);
    drop(w);
    Ok(Tensor::from_data(TensorData::new(packed, shape), device))
}

/// The embedding table `key` [v, d] as stored (bf16 words or f32).
fn table<B: Backend>(
    src: &dyn TensorSource,
    key: &str,
    v: usize,
    d: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2>, TextError> {
    if let Some(words) = src.tensor_bf16(key, &[v, d])? {
        return host_bf16::bf16_tensor::<B, 2>(words, [v, d]).ok_or_else(|| internal(key));
    }
    let w = src.tensor_f32(key, &[v, d])?;
    Ok(Tensor::from_data(TensorData::new(w, [v, d]), device))
}

fn internal(key: &str) -> TextError {
    TextError::Weight {
        key: key.to_string(),
        message: "internal: a bf16 matrix could not be held on the host backend".into(),
    }
}
