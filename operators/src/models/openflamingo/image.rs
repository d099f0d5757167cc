//! open_clip's image transform for the `openai` weights, as OpenFlamingo
//! applies it: `Resize(image_size, bicubic)` of the shorter side (PIL
//! resampling, [`resize_bicubic_pil`]), `CenterCrop(image_size)`, RGB,
//! `ToTensor` (`/ 255`), `Normalize(mean, std)`, all in f32 like torchvision.

use super::config::VisionConfig;
use crate::models::qwen2_5_vl::image::resize_bicubic_pil;
use image::RgbImage;

/// The `(width, height)` torchvision's `Resize(size)` gives an image of
/// `width x height`: the shorter side becomes `size`, the longer
/// `int(size * long / short)`.
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short.max(1) as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Preprocesses one RGB image to `3 x S x S` f32 values (channel-major),
/// `S` = `cfg.image_size`.
pub fn preprocess(img: &RgbImage, cfg: &VisionConfig) -> Vec<f32> {
    let s = cfg.image_size;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = resized_size(w, h, s);
    let resized;
    let img = if (nw, nh) == (w, h) {
        img
    } else {
        resized = resize_bicubic_pil(img, nw, nh);
        &resized
    };
    // torchvision's center_crop: int(round((side - crop) / 2.0)), half to even.
    let top = ((nh.saturating_sub(s)) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw.saturating_sub(s)) as f64 / 2.0).round_ties_even() as usize;
    let mut out = vec![0f32; 3 * s * s];
    for y in 0..s.min(nh) {
        for x in 0..s.min(nw) {
            let px = img.get_pixel((left + x) as u32, (top + y) as u32);
            for c in 0..3 {
                let v = f32::from(px[c]) / 255.0;
                out[(c * s + y) * s + x] = (v - cfg.mean[c]) / cfg.std[c];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shorter_side_becomes_the_target_and_the_longer_is_truncated() {
        assert_eq!(resized_size(72, 60, 56), (67, 56));
        assert_eq!(resized_size(50, 64, 56), (56, 71));
        assert_eq!(resized_size(56, 56, 56), (56, 56));
        assert_eq!(resized_size(640, 480, 224), (298, 224));
    }
}
