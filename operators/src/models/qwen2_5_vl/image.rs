//! Qwen2-VL image preprocessing, as done by HF's `Qwen2VLImageProcessor`
//! (PIL backend): decode to RGB, `smart_resize`, PIL bicubic resize on
//! uint8, rescale by 1/255, CLIP normalisation, and patchify into rows of
//! `C x T x patch x patch` values in 2x2-merge-block-major order.
//!
//! The resize is a hand-written port of Pillow's `ImagingResample` for 8-bit
//! images rather than `fast_image_resize`: that crate follows Pillow-SIMD,
//! which stores the filter weights as `i16` with a per-image precision, while
//! Pillow (what HF uses) stores them as `i32` with 22 fractional bits. The
//! two differ by one 8-bit level on some pixels, and exact equality with
//! the reference processor is cheap to have (see the
//! `fast_image_resize_is_not_pillow_exact` test).
//!
//! Decoding uses the `image` crate. PNG decodes bit-identically to PIL; JPEG
//! does not: its decoder (zune-jpeg) differs from PIL's libjpeg-turbo by a
//! few 8-bit levels on some pixels (up to ~10 with chroma subsampling).

use super::config::PreprocessorConfig;
use crate::image_decode::{self, ImageDecodeError, ImageInput, ImageLimits};
use image::RgbImage;
use std::path::Path;

/// Errors while loading or preprocessing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read or decoded, or is over the decoding
    /// limits ([`crate::image_decode`]).
    #[error(transparent)]
    Load(#[from] ImageDecodeError),
    /// The image size cannot be brought into the processor's pixel bounds.
    #[error("invalid image size {height}x{width} (h x w): {message}")]
    InvalidSize {
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
        /// What is wrong.
        message: String,
    },
}

/// An image ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `n_patches x (channels * temporal_patch * patch * patch)` values,
    /// row-major (1176 columns for the published configuration).
    pub pixel_values: Vec<f32>,
    /// `[t, h, w]` patch grid (`t` = 1 for a still image).
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Number of patch rows in `pixel_values` (`t * h * w`).
    pub fn n_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of `<|image_pad|>` tokens this image becomes in the prompt
    /// (`t * h * w / merge^2`).
    pub fn n_tokens(&self, merge_size: usize) -> usize {
        self.n_patches() / (merge_size * merge_size)
    }
}

/// Decodes JPEG/PNG bytes into RGB within `limits`. Grey, grey+alpha,
/// palette and RGBA images are converted the way PIL's `convert("RGB")`
/// does: alpha is dropped (not composited) and grey is replicated. The
/// decoder is [`image_decode::decode_rgb`], shared with the dataset.
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    Ok(image_decode::decode_rgb(
        ImageInput::Bytes {
            bytes,
            name: "<bytes>",
        },
        limits,
    )?)
}

/// Reads and decodes an image file into RGB within `limits` (see
/// [`decode_rgb`]); errors name the file.
pub fn load_rgb(path: &Path, limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    Ok(image_decode::decode_rgb(ImageInput::File(path), limits)?)
}

/// Target `(height, width)` of Qwen2-VL's `smart_resize`: both sides
/// multiples of `factor`, pixel count within `[min_pixels, max_pixels]`,
/// aspect ratio kept as closely as possible. Follows the Python code's
/// float64 arithmetic and its `round` (half to even).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    let bad = |message: String| ImageError::InvalidSize {
        height,
        width,
        message,
    };
    if height == 0 || width == 0 || factor == 0 {
        return Err(bad("sides and factor must be positive".into()));
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > 200.0 {
        return Err(bad(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        )));
    }
    let mut h_bar = ((hf / ff).round_ties_even() * ff) as usize;
    let mut w_bar = ((wf / ff).round_ties_even() * ff) as usize;
    if h_bar * w_bar > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        h_bar = factor.max(((hf / beta / ff).floor() * ff) as usize);
        w_bar = factor.max(((wf / beta / ff).floor() * ff) as usize);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = ((hf * beta / ff).ceil() * ff) as usize;
        w_bar = ((wf * beta / ff).ceil() * ff) as usize;
    }
    Ok((h_bar, w_bar))
}

/// Fractional bits of Pillow's fixed-point filter weights for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first source index and fixed-point weights, as
/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` compute them.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C `(int)` truncation toward zero, then clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Rounds a fixed-point accumulator (which already holds the +0.5 bias)
/// to a clamped 8-bit value, as Pillow's `clip8`.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `out_w x out_h` exactly like Pillow's
/// `Image.resize((out_w, out_h), Image.BICUBIC)` on an 8-bit RGB image:
/// separable convolution (horizontal pass, then vertical), kernel support
/// widened by the downscale factor (antialiasing), 8-bit rounding and
/// clipping after each pass. A pass whose size does not change is skipped,
/// as in Pillow.
pub fn resize_bicubic_pil(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut data = src.as_raw().clone();
    let mut w = in_w;
    if out_w != in_w {
        let coeffs = coefficients(in_w, out_w);
        let mut out = vec![0u8; out_w * in_h * 3];
        for y in 0..in_h {
            let row = &data[y * in_w * 3..(y + 1) * in_w * 3];
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let acc = k.iter().enumerate().fold(half, |acc, (i, &kv)| {
                        acc + i32::from(row[(xmin + i) * 3 + c]) * kv
                    });
                    out[(y * out_w + xx) * 3 + c] = clip8(acc);
                }
            }
        }
        data = out;
        w = out_w;
    }
    if out_h != in_h {
        let coeffs = coefficients(in_h, out_h);
        let mut out = vec![0u8; w * out_h * 3];
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..w * 3 {
                let acc = k.iter().enumerate().fold(half, |acc, (i, &kv)| {
                    acc + i32::from(data[(ymin + i) * w * 3 + x]) * kv
                });
                out[yy * w * 3 + x] = clip8(acc);
            }
        }
        data = out;
    }
    // The buffer length is w * h * 3 by construction.
    RgbImage::from_raw(out_w as u32, out_h as u32, data)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// Full Qwen2-VL preprocessing of one RGB image with the settings of
/// `preprocessor_config.json`: smart_resize (factor = patch * merge), PIL
/// bicubic resize, `f32(f64(u8) * rescale_factor)`, `(x - mean) / std` in
/// f32, then patchify with the frame repeated `temporal_patch_size` times.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessorConfig) -> Result<ProcessedImage, ImageError> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let factor = cfg.patch_size * cfg.merge_size;
    let (rh, rw) = smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)?;
    let resized;
    let img = if (rh, rw) == (h, w) {
        img
    } else {
        resized = resize_bicubic_pil(img, rw, rh);
        &resized
    };
    // Normalised CHW planes.
    let mut planes = vec![0f32; 3 * rh * rw];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (f64::from(px[c]) * cfg.rescale_factor) as f32;
            planes[c * rh * rw + i] = (x - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    Ok(patchify(&planes, rh, rw, cfg))
}

/// Cuts normalised CHW planes (`3 x h x w`) into patch rows: rows ordered
/// by 2x2 merge block (row-major), then by patch inside the block
/// (row-major); each row holds channel x time x patch_y x patch_x.
fn patchify(planes: &[f32], h: usize, w: usize, cfg: &PreprocessorConfig) -> ProcessedImage {
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let row_len = 3 * t * p * p;
    let mut out = Vec::with_capacity(gh * gw * row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let y0 = (bh * m + mh) * p;
                    let x0 = (bw * m + mw) * p;
                    for c in 0..3 {
                        let plane = &planes[c * h * w..(c + 1) * h * w];
                        for _ in 0..t {
                            for py in 0..p {
                                let start = (y0 + py) * w + x0;
                                out.extend_from_slice(&plane[start..start + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    ProcessedImage {
        pixel_values: out,
        grid_thw: [1, gh, gw],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/qwen2_5_vl_tiny")
            .join(name)
    }

    fn cases_json() -> &'static serde_json::Value {
        static CASES: OnceLock<serde_json::Value> = OnceLock::new();
        CASES.get_or_init(|| {
            serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap()
        })
    }

    fn cases_bytes() -> &'static [u8] {
        static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
        BYTES.get_or_init(|| std::fs::read(fixture("cases.safetensors")).unwrap())
    }

    fn f32_tensor(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn i64_tensor(st: &SafeTensors, key: &str) -> Vec<i64> {
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn preprocessor() -> PreprocessorConfig {
        PreprocessorConfig::from_file(&fixture("preprocessor_config.json")).unwrap()
    }

    #[test]
    fn smart_resize_matches_readme() {
        let (min, max) = (3136, 200704);
        assert_eq!(smart_resize(64, 64, 28, min, max).unwrap(), (56, 56));
        // 350 / 28 = 12.5 rounds to 12 (half to even); 250 / 28 = 8.93 -> 9.
        assert_eq!(smart_resize(250, 350, 28, min, max).unwrap(), (252, 336));
        // Below min_pixels: scaled up with ceil.
        assert_eq!(smart_resize(24, 64, 28, min, max).unwrap(), (56, 112));
        // Above max_pixels: scaled down with floor.
        let (h, w) = smart_resize(1000, 1000, 28, min, max).unwrap();
        assert!(h * w <= max && h % 28 == 0 && w % 28 == 0, "{h}x{w}");
        assert_eq!((h, w), (448, 448));
        // 42 / 28 = 1.5 -> 2 (half to even), 14 / 28 = 0.5 -> 0 -> min path.
        assert_eq!(smart_resize(42, 42, 28, 0, max).unwrap(), (56, 56));
        assert_eq!(smart_resize(480, 640, 28, min, max).unwrap(), (364, 504));
        assert_eq!(smart_resize(13, 900, 28, min, max).unwrap(), (28, 476));
        assert!(smart_resize(1, 300, 28, min, max).is_err());
        assert!(smart_resize(0, 10, 28, min, max).is_err());
    }

    #[test]
    fn pixel_values_match_fixture() {
        let st = SafeTensors::deserialize(cases_bytes()).unwrap();
        let cfg = preprocessor();
        for case in cases_json()["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let (shape, want) = f32_tensor(&st, &format!("{name}.pixel_values"));
            let grids = i64_tensor(&st, &format!("{name}.image_grid_thw"));
            let mut got = Vec::new();
            for (i, file) in case["images"].as_array().unwrap().iter().enumerate() {
                let img =
                    load_rgb(&fixture(file.as_str().unwrap()), &ImageLimits::default()).unwrap();
                let p = preprocess(&img, &cfg).unwrap();
                let want_grid: Vec<usize> = grids[i * 3..i * 3 + 3]
                    .iter()
                    .map(|&x| x as usize)
                    .collect();
                assert_eq!(p.grid_thw.to_vec(), want_grid, "{name} image {i}");
                assert_eq!(p.pixel_values.len(), p.n_patches() * 1176);
                got.extend(p.pixel_values);
            }
            assert_eq!(shape, vec![got.len() / 1176, 1176], "{name}");
            let mut worst = 0f32;
            let mut n_exact = 0usize;
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = (g - w).abs();
                assert!(d <= 0.015, "{name} element {j}: got {g}, want {w}");
                worst = worst.max(d);
                n_exact += usize::from(d == 0.0);
            }
            // The port is exact: every value equals the reference.
            assert_eq!(n_exact, want.len(), "{name}: max diff {worst}");
        }
    }

    /// Records why the resize is hand-written: fast_image_resize's
    /// CatmullRom (Pillow-SIMD arithmetic) is not bit-identical to Pillow
    /// (on this image: 1826 of 254016 values differ, by up to 4 levels).
    /// If this ever fails, fast_image_resize became exact and could be used.
    #[test]
    fn fast_image_resize_is_not_pillow_exact() {
        use fast_image_resize as fr;
        let img = load_rgb(
            &fixture("images/tiled_350x250.png"),
            &ImageLimits::default(),
        )
        .unwrap();
        let ours = resize_bicubic_pil(&img, 336, 252);
        let src = fr::images::Image::from_vec_u8(
            img.width(),
            img.height(),
            img.as_raw().clone(),
            fr::PixelType::U8x3,
        )
        .unwrap();
        let mut dst = fr::images::Image::new(336, 252, fr::PixelType::U8x3);
        let opts = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
        fr::Resizer::new().resize(&src, &mut dst, &opts).unwrap();
        let max = ours
            .as_raw()
            .iter()
            .zip(dst.buffer())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .max()
            .unwrap();
        assert!(max > 1, "max difference {max}");
    }

    #[test]
    fn converts_other_color_types_like_pil() {
        // RGBA: alpha dropped, not composited.
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([10, 20, 30, 0]));
        rgba.put_pixel(1, 0, image::Rgba([200, 100, 50, 128]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba8(rgba)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&png, &ImageLimits::default()).unwrap();
        assert_eq!(rgb.as_raw(), &vec![10, 20, 30, 200, 100, 50]);
        // Grey: replicated.
        let grey = image::GrayImage::from_raw(2, 1, vec![7, 250]).unwrap();
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(grey)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&png, &ImageLimits::default()).unwrap();
        assert_eq!(rgb.as_raw(), &vec![7, 7, 7, 250, 250, 250]);
    }

    #[test]
    fn unreadable_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.png");
        let msg = load_rgb(&missing, &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope.png"), "{msg}");
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, b"not an image").unwrap();
        let msg = load_rgb(&garbage, &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("garbage.jpg"), "{msg}");
    }

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 77]));
        assert_eq!(resize_bicubic_pil(&img, 5, 4), img);
        let flat = RgbImage::from_pixel(9, 7, image::Rgb([13, 200, 255]));
        let up = resize_bicubic_pil(&flat, 20, 3);
        assert!(up.pixels().all(|p| p.0 == [13, 200, 255]));
    }

    fn pil_fixture(name: &str) -> RgbImage {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/pil_resize")
            .join(name);
        load_rgb(&path, &ImageLimits::default()).unwrap()
    }

    #[test]
    fn resize_matches_pillow_exactly() {
        let src = pil_fixture("src_rgb.png");
        for (w, h) in [(7, 5), (13, 30), (40, 11), (101, 67), (56, 56), (3, 90)] {
            let want = pil_fixture(&format!("resize_{w}x{h}.png"));
            let got = resize_bicubic_pil(&src, w, h);
            assert_eq!(got.dimensions(), want.dimensions());
            assert!(got == want, "resize to {w}x{h} differs from Pillow");
        }
    }

    #[test]
    fn converts_like_pil_convert_rgb() {
        for name in ["rgba", "pal", "la"] {
            let got = pil_fixture(&format!("src_{name}.png"));
            let want = pil_fixture(&format!("conv_{name}.png"));
            assert!(
                got == want,
                "{name} -> RGB differs from PIL convert(\"RGB\")"
            );
        }
    }
}
