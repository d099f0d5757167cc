//! easy-VQA read straight from the published `easy_vqa-1.0` wheel (a zip
//! archive): questions `[question, answer, image_id]` and 64x64 PNG images.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use image::RgbImage;

use super::{io_err, DemoVlmError};
use crate::image_decode::ImageLimits;
use crate::models::qwen2_5_vl::image::decode_rgb;

/// One easy-VQA question.
#[derive(Debug, Clone, PartialEq)]
pub struct EasyVqaQuestion {
    /// Question text, e.g. "what color is the shape?".
    pub question: String,
    /// The single answer (one of 13 words).
    pub answer: String,
    /// easy-VQA image id within the split.
    pub image_id: u64,
}

/// One split of easy-VQA: questions in the package's order and the images
/// they use.
#[derive(Debug, Clone)]
pub struct EasyVqaSplit {
    /// Questions, in file order.
    pub questions: Vec<EasyVqaQuestion>,
    /// Decoded images by id.
    pub images: BTreeMap<u64, RgbImage>,
}

fn read_entry(
    zip: &mut zip::ZipArchive<std::fs::File>,
    wheel: &Path,
    name: &str,
) -> Result<Vec<u8>, DemoVlmError> {
    let mut f = zip.by_name(name).map_err(|e| DemoVlmError::Data {
        path: wheel.to_path_buf(),
        message: format!("no `{name}` in the archive ({e}); pass the easy_vqa-1.0 wheel"),
    })?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io_err(wheel))?;
    Ok(buf)
}

/// Reads split `split` ("train" or "test") from the wheel at `wheel`.
pub fn read_wheel_split(wheel: &Path, split: &str) -> Result<EasyVqaSplit, DemoVlmError> {
    let file = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| DemoVlmError::Data {
        path: wheel.to_path_buf(),
        message: format!("not a zip archive: {e}"),
    })?;
    let name = format!("easy_vqa/data/{split}/questions.json");
    let raw = read_entry(&mut zip, wheel, &name)?;
    let bad = |message: String| DemoVlmError::Data {
        path: wheel.join(&name),
        message,
    };
    let rows: Vec<(String, String, u64)> = serde_json::from_slice(&raw)
        .map_err(|e| bad(format!("expected [[question, answer, image_id], ...]: {e}")))?;
    let questions: Vec<EasyVqaQuestion> = rows
        .into_iter()
        .map(|(question, answer, image_id)| EasyVqaQuestion {
            question,
            answer,
            image_id,
        })
        .collect();
    let mut images = BTreeMap::new();
    for q in &questions {
        if images.contains_key(&q.image_id) {
            continue;
        }
        let png = format!("easy_vqa/data/{split}/images/{}.png", q.image_id);
        let bytes = read_entry(&mut zip, wheel, &png)?;
        let img = decode_rgb(&bytes, &ImageLimits::default()).map_err(|e| DemoVlmError::Data {
            path: wheel.join(&png),
            message: e.to_string(),
        })?;
        images.insert(q.image_id, img);
    }
    Ok(EasyVqaSplit { questions, images })
}
