//! The one image decoder of leverflow: dataset images ([`crate::dataset`])
//! and the Qwen2.5-VL processor ([`crate::models::qwen2_5_vl::image`]) both decode
//! through [`decode_rgb`], with explicit [`ImageLimits`].
//!
//! Images come from other people. A small compressed file can claim a huge
//! canvas (a 420 KB PNG of 12000 × 12000 pixels needs 432 MB decoded), so
//! decoding is bounded by a maximum side and a maximum allocation, enforced
//! by the `image` crate's [`image::Limits`] before the pixel buffer is
//! allocated. The decoded image is converted to 8-bit RGB like PIL's
//! `Image.open(p).convert("RGB")` (alpha dropped, grey replicated; the format
//! is sniffed from the content).

use std::fmt;
use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};

use image::RgbImage;

/// Limits of one image decode. The default is 8192 pixels per side and
/// 256 MiB of decoder allocation per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width and height accepted, in pixels.
    pub max_side: u32,
    /// Largest allocation of the decoder for one image (the decoded
    /// buffer included), in bytes.
    pub max_alloc_bytes: u64,
}

impl ImageLimits {
    /// Default largest side (8192 pixels).
    pub const DEFAULT_MAX_SIDE: u32 = 8192;
    /// Default largest decoder allocation (256 MiB).
    pub const DEFAULT_MAX_ALLOC_BYTES: u64 = 256 << 20;

    fn to_image_limits(self) -> image::Limits {
        let mut l = image::Limits::default();
        l.max_image_width = Some(self.max_side);
        l.max_image_height = Some(self.max_side);
        l.max_alloc = Some(self.max_alloc_bytes);
        l
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_side: Self::DEFAULT_MAX_SIDE,
            max_alloc_bytes: Self::DEFAULT_MAX_ALLOC_BYTES,
        }
    }
}

impl fmt::Display for ImageLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at most {} pixels per side and {} bytes of decoding memory",
            self.max_side, self.max_alloc_bytes
        )
    }
}

/// What to decode: a file, or encoded bytes with a name for messages.
#[derive(Debug, Clone, Copy)]
pub enum ImageInput<'a> {
    /// A JPEG/PNG file.
    File(&'a Path),
    /// Encoded JPEG/PNG bytes; `name` stands for them in errors.
    Bytes {
        /// the encoded image
        bytes: &'a [u8],
        /// what to call them in errors (e.g. `<bytes>`)
        name: &'a str,
    },
}

/// Errors of [`decode_rgb`]; each names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageDecodeError {
    /// The image file does not exist.
    #[error("image {} not found", .path.display())]
    NotFound {
        /// The image path.
        path: PathBuf,
    },
    /// The image file could not be read.
    #[error("cannot read image {}: {source}", .path.display())]
    Io {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a decodable image.
    #[error("cannot decode image {origin}: {message}")]
    Decode {
        /// File name, or the name given with the bytes.
        origin: String,
        /// The decoder's message.
        message: String,
    },
    /// The image is larger than the limits allow.
    #[error("image {origin} is over the decoding limits ({limits}): {message}")]
    TooLarge {
        /// File name, or the name given with the bytes.
        origin: String,
        /// The limits in force.
        limits: ImageLimits,
        /// The decoder's message (which limit).
        message: String,
    },
}

/// Decodes an image into 8-bit RGB within `limits` (see the module
/// documentation). This is the only place leverflow decodes images.
pub fn decode_rgb(
    input: ImageInput<'_>,
    limits: &ImageLimits,
) -> Result<RgbImage, ImageDecodeError> {
    match input {
        ImageInput::File(path) => {
            let io_err = |source: std::io::Error| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    ImageDecodeError::NotFound {
                        path: path.to_path_buf(),
                    }
                } else {
                    ImageDecodeError::Io {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            };
            let reader = image::ImageReader::open(path)
                .map_err(io_err)?
                .with_guessed_format()
                .map_err(io_err)?;
            decode_reader(reader, &path.display().to_string(), limits)
        }
        ImageInput::Bytes { bytes, name } => {
            let reader = image::ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| ImageDecodeError::Decode {
                    origin: name.to_string(),
                    message: e.to_string(),
                })?;
            decode_reader(reader, name, limits)
        }
    }
}

fn decode_reader<R: BufRead + Seek>(
    mut reader: image::ImageReader<R>,
    origin: &str,
    limits: &ImageLimits,
) -> Result<RgbImage, ImageDecodeError> {
    reader.limits(limits.to_image_limits());
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageDecodeError::TooLarge {
            origin: origin.to_string(),
            limits: *limits,
            message: l.to_string(),
        },
        other => ImageDecodeError::Decode {
            origin: origin.to_string(),
            message: other.to_string(),
        },
    })?;
    Ok(match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A PNG of `w` × `h` grey pixels, all zero: tiny on disk, whatever
    /// the canvas (PNG rows of zeros deflate ~1000:1).
    pub(crate) fn big_png(w: u32, h: u32) -> Vec<u8> {
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
                std::io::Write::write_all(&mut stream, &row).unwrap();
            }
            stream.finish().unwrap();
        }
        out
    }

    #[test]
    fn huge_canvas_is_refused_before_decoding() {
        // 12000 x 12000: today's image defaults (512 MiB) let it through
        // (432 MB of RGB); the default limits refuse it by its side.
        let png = big_png(12000, 12000);
        assert!(png.len() < 1 << 20, "{}", png.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.png");
        std::fs::write(&path, &png).unwrap();
        let e = decode_rgb(ImageInput::File(&path), &ImageLimits::default()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageDecodeError::TooLarge { .. }), "{msg}");
        assert!(msg.contains("bomb.png") && msg.contains("8192"), "{msg}");
        let e = decode_rgb(
            ImageInput::Bytes {
                bytes: &png,
                name: "<bytes>",
            },
            &ImageLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ImageDecodeError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn allocation_limit_is_the_callers() {
        let png = big_png(3000, 3000);
        let ok = decode_rgb(
            ImageInput::Bytes {
                bytes: &png,
                name: "a.png",
            },
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(ok.dimensions(), (3000, 3000));
        let small = ImageLimits {
            max_side: 8192,
            max_alloc_bytes: 1 << 20,
        };
        let e = decode_rgb(
            ImageInput::Bytes {
                bytes: &png,
                name: "a.png",
            },
            &small,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ImageDecodeError::TooLarge { .. }) && msg.contains("1048576"),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.png");
        let e = decode_rgb(ImageInput::File(&missing), &ImageLimits::default()).unwrap_err();
        assert!(matches!(e, ImageDecodeError::NotFound { .. }), "{e}");
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, b"not an image").unwrap();
        let e = decode_rgb(ImageInput::File(&garbage), &ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("garbage.jpg"), "{e}");
    }
}
