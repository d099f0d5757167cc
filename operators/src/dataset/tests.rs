use super::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ann(
    qid: u64,
    image_id: u64,
    answers: &[&str],
    mc: Option<&str>,
    question: Option<&str>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "question_id": qid,
        "image_id": image_id,
        "question_type": "what",
        "answer_type": "other",
        "answers": answers.iter().enumerate().map(|(i, a)| serde_json::json!({
            "answer": a, "answer_confidence": "yes", "answer_id": i + 1
        })).collect::<Vec<_>>(),
    });
    if let Some(mc) = mc {
        v["multiple_choice_answer"] = mc.into();
    }
    if let Some(q) = question {
        v["question"] = q.into();
    }
    v
}

fn merged_cfg(dir: &tempfile::TempDir, anns: Vec<serde_json::Value>) -> DatasetConfig {
    let p = write(
        dir,
        "merged.json",
        &serde_json::json!({"info": {}, "annotations": anns}).to_string(),
    );
    DatasetConfig::new(
        DatasetKind::Vqav2Local,
        DatasetSplit::Train,
        None,
        p,
        dir.path().join("imgs"),
    )
}

#[test]
fn fixture_loads_sorted_with_questions_joined() {
    let q = fixture("vqa_eval/questions.json");
    let a = fixture("vqa_eval/annotations.json");
    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        Some(q.clone()),
        a.clone(),
        "/data/coco".into(),
    );
    let ds = VqaDataset::load(&cfg).unwrap();
    assert_eq!(ds.len(), 300);
    assert_eq!(ds.kind(), DatasetKind::OkvqaLocal);

    let qv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&q).unwrap()).unwrap();
    let av: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&a).unwrap()).unwrap();
    let qtext: HashMap<u64, String> = qv["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["question_id"].as_u64().unwrap(),
                x["question"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut anns: Vec<&serde_json::Value> = av["annotations"].as_array().unwrap().iter().collect();
    anns.sort_by_key(|x| x["question_id"].as_u64().unwrap());
    for (i, (item, raw)) in ds.items().iter().zip(&anns).enumerate() {
        assert_eq!(item.index, i as u64);
        assert_eq!(ds.get(i as u64).unwrap(), item);
        assert_eq!(item.question_id, raw["question_id"].as_u64().unwrap());
        assert_eq!(item.image_id, raw["image_id"].as_u64().unwrap());
        assert_eq!(item.question, qtext[&item.question_id]);
        let answers: Vec<String> = raw["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["answer"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(item.answers, answers);
        assert_eq!(item.answers.len(), 10);
        assert_eq!(
            item.icd_answer,
            raw["multiple_choice_answer"].as_str().unwrap()
        );
        assert_eq!(
            item.image_path,
            PathBuf::from(format!(
                "/data/coco/COCO_train2014_{:012}.jpg",
                item.image_id
            ))
        );
        assert_eq!(ds.index_of_question_id(item.question_id), Some(i as u64));
    }
    assert_eq!(ds.items()[0].question_id, 700000);
    assert_eq!(
        ds.items()[0].image_path,
        PathBuf::from("/data/coco/COCO_train2014_000000003433.jpg")
    );
    assert_eq!(ds.index_of_question_id(1), None);
    let err = ds.get(300).unwrap_err();
    assert!(matches!(
        err,
        DatasetError::IndexOutOfRange {
            index: 300,
            len: 300
        }
    ));
    assert!(err.to_string().contains("300"));
}

#[test]
fn index_is_position_after_stable_sort_by_question_id() {
    let d = tempfile::tempdir().unwrap();
    let anns = vec![
        ann(30, 3, &["c"], Some("c"), Some("q30")),
        ann(10, 1, &["a"], Some("a"), Some("q10")),
        ann(20, 2, &["b1"], Some("b1"), Some("q20 first")),
        ann(5, 9, &["z"], Some("z"), Some("q5")),
        ann(20, 4, &["b2"], Some("b2"), Some("q20 second")),
    ];
    let ds = VqaDataset::load(&merged_cfg(&d, anns)).unwrap();
    let got: Vec<(u64, u64, &str)> = ds
        .items()
        .iter()
        .map(|i| (i.index, i.question_id, i.question.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 5, "q5"),
            (1, 10, "q10"),
            (2, 20, "q20 first"),
            (3, 20, "q20 second"),
            (4, 30, "q30")
        ]
    );
    assert_eq!(ds.index_of_question_id(20), Some(2));
    assert_eq!(ds.index_of_question_id(30), Some(4));
    assert_eq!(ds.index_of_question_id(31), None);
}

#[test]
fn icd_answer_falls_back_to_most_common_first_seen() {
    let d = tempfile::tempdir().unwrap();
    let anns = vec![
        // tie 2-2 between "cat" and "dog": "dog" is seen first
        ann(1, 1, &["dog", "cat", "cat", "dog", "bird"], None, Some("q")),
        ann(2, 1, &["x", "y", "y"], None, Some("q")),
        ann(3, 1, &[], None, Some("q")),
        ann(4, 1, &["x", "y", "y"], Some("given"), Some("q")),
    ];
    let ds = VqaDataset::load(&merged_cfg(&d, anns)).unwrap();
    let got: Vec<&str> = ds.items().iter().map(|i| i.icd_answer.as_str()).collect();
    assert_eq!(got, vec!["dog", "y", "", "given"]);
    assert_eq!(most_common_answer(&["a".to_string(), "b".to_string()]), "a");
    assert_eq!(
        most_common_answer(&["b", "a", "a", "b"].map(String::from)),
        "b"
    );
}

#[test]
fn merged_vqav2_format_and_plain_string_answers() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "m.json",
        r#"{"annotations": [{"question_id": 7, "image_id": 42, "question": "what?", "answers": ["yes", {"answer": "no", "raw_answer": "No"}], "multiple_choice_answer": null}]}"#,
    );
    let cfg = DatasetConfig::new(
        DatasetKind::Vqav2Local,
        DatasetSplit::Validation,
        None,
        p,
        "r".into(),
    );
    let ds = VqaDataset::load(&cfg).unwrap();
    let it = ds.get(0).unwrap();
    assert_eq!(it.question, "what?");
    assert_eq!(it.answers, vec!["yes", "no"]);
    assert_eq!(it.icd_answer, "yes");
    assert_eq!(
        it.image_path,
        Path::new("r").join("COCO_val2014_000000000042.jpg")
    );
}

#[test]
fn missing_question_text_errors_name_the_question_id() {
    let d = tempfile::tempdir().unwrap();
    let err = VqaDataset::load(&merged_cfg(
        &d,
        vec![
            ann(1, 1, &["a"], None, Some("q")),
            ann(77, 1, &["a"], None, None),
        ],
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::NoQuestionText {
                question_id: 77,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("77"));

    let qp = write(
        &d,
        "q.json",
        r#"{"questions": [{"image_id": 1, "question": "from file", "question_id": 1}]}"#,
    );
    let ap = write(&d, "a.json", &serde_json::json!({"annotations": [ann(1, 1, &["a"], None, Some("own")), ann(88, 1, &["a"], None, None)]}).to_string());
    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        Some(qp.clone()),
        ap,
        "r".into(),
    );
    let err = VqaDataset::load(&cfg).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::MissingQuestion {
                question_id: 88,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("88") && err.to_string().contains("q.json"),
        "{err}"
    );

    // The questions file wins over an annotation's own question (as the original merge).
    let ap = write(
        &d,
        "a2.json",
        &serde_json::json!({"annotations": [ann(1, 1, &["a"], None, Some("own"))]}).to_string(),
    );
    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        Some(qp),
        ap,
        "r".into(),
    );
    assert_eq!(
        VqaDataset::load(&cfg).unwrap().get(0).unwrap().question,
        "from file"
    );
}

#[test]
fn malformed_json_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "bad_ann.json",
        "{\"annotations\": [\n{\"question_id\": 1, \"image_id\": 2,\n \"answers\": [}]}",
    );
    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        None,
        p,
        "r".into(),
    );
    let err = VqaDataset::load(&cfg).unwrap_err();
    let DatasetError::Json { line, column, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*line, 3);
    assert!(*column > 0);
    let msg = err.to_string();
    assert!(
        msg.contains("bad_ann.json") && msg.contains("line 3"),
        "{msg}"
    );

    let p = write(
        &d,
        "bad_type.json",
        "{\"annotations\": [{\"question_id\": \"x\", \"image_id\": 2}]}",
    );
    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        None,
        p,
        "r".into(),
    );
    assert!(matches!(
        VqaDataset::load(&cfg).unwrap_err(),
        DatasetError::Json { line: 1, .. }
    ));

    let cfg = DatasetConfig::new(
        DatasetKind::OkvqaLocal,
        DatasetSplit::Train,
        None,
        d.path().join("nope.json"),
        "r".into(),
    );
    let err = VqaDataset::load(&cfg).unwrap_err();
    assert!(matches!(err, DatasetError::Io { .. }) && err.to_string().contains("nope.json"));
}

#[test]
fn image_pattern_formatting() {
    let p = ImagePattern::parse(DEFAULT_IMAGE_PATTERN).unwrap();
    assert_eq!(p.format(9, 1), "COCO_train2014_000000000009.jpg");
    assert_eq!(
        p.format(1234567890123, 1),
        "COCO_train2014_1234567890123.jpg"
    );
    let p = ImagePattern::parse("{image_id}/{question_id:08d}_{image_id:5d}.png").unwrap();
    assert_eq!(p.format(42, 7), "42/00000007_   42.png");
    let p = ImagePattern::parse("{{x}}{image_id:d}").unwrap();
    assert_eq!(p.format(3, 0), "{x}3");
    for bad in [
        "{image}",
        "{image_id",
        "a}b",
        "{image_id:x}",
        "{image_id:012f}",
    ] {
        let err = ImagePattern::parse(bad).unwrap_err();
        assert!(matches!(err, DatasetError::BadImagePattern { .. }), "{bad}");
    }
    assert_eq!(
        DatasetSplit::Validation.default_image_pattern(),
        DEFAULT_VAL_IMAGE_PATTERN
    );

    let d = tempfile::tempdir().unwrap();
    let mut cfg = merged_cfg(&d, vec![ann(5, 11, &["a"], None, Some("q"))]);
    cfg.image_pattern = "img_{question_id}_{image_id:04d}.jpg".into();
    let ds = VqaDataset::load(&cfg).unwrap();
    assert_eq!(
        ds.get(0).unwrap().image_path,
        d.path().join("imgs").join("img_5_0011.jpg")
    );
    cfg.image_pattern = "{nope}".into();
    assert!(matches!(
        VqaDataset::load(&cfg).unwrap_err(),
        DatasetError::BadImagePattern { .. }
    ));
}

#[test]
fn dataset_kind_names() {
    assert_eq!(
        "okvqa_local".parse::<DatasetKind>().unwrap(),
        DatasetKind::OkvqaLocal
    );
    assert_eq!(
        "VQAv2_local".parse::<DatasetKind>().unwrap(),
        DatasetKind::Vqav2Local
    );
    assert_eq!(DatasetKind::Vqav2Local.to_string(), "vqav2_local");
    assert!(matches!(
        "coco".parse::<DatasetKind>(),
        Err(DatasetError::UnknownKind { .. })
    ));
}

fn save_rgb(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save(path)
        .unwrap();
}

#[test]
fn missing_image_and_decode_errors() {
    let d = tempfile::tempdir().unwrap();
    let cfg = merged_cfg(&d, vec![ann(5, 11, &["a"], None, Some("q"))]);
    let ds = VqaDataset::load(&cfg).unwrap();
    let cache = ImageCache::new(16);
    let err = ds.load_image(0, &cache).unwrap_err();
    match &err {
        DatasetError::MissingImage { path, index } => {
            assert_eq!(path, &d.path().join("imgs/COCO_train2014_000000000011.jpg"));
            assert_eq!(*index, Some(0));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("COCO_train2014_000000000011.jpg")
            && err.to_string().contains("index 0")
    );
    assert!(matches!(
        cache.get(&d.path().join("x.png")),
        Err(DatasetError::MissingImage { index: None, .. })
    ));

    std::fs::create_dir_all(d.path().join("imgs")).unwrap();
    let img = d.path().join("imgs/COCO_train2014_000000000011.jpg");
    std::fs::write(&img, b"not an image at all").unwrap();
    let err = ds.load_image(0, &cache).unwrap_err();
    assert!(
        matches!(&err, DatasetError::ImageDecode { path, .. } if path == &img),
        "{err:?}"
    );

    // A real JPEG (content sniffed, not the extension).
    image::RgbImage::from_pixel(8, 6, image::Rgb([200, 100, 50]))
        .save_with_format(&img, image::ImageFormat::Jpeg)
        .unwrap();
    let got = ds.load_image(0, &cache).unwrap();
    assert_eq!(got.dimensions(), (8, 6));
    assert!(ds.load_image(1, &cache).is_err());
}

#[test]
fn oversized_images_are_refused_by_the_limits() {
    // A 12000 x 12000 PNG of a few hundred KB: 432 MB decoded under the
    // old image-crate defaults; the default limits refuse it by its side.
    let d = tempfile::tempdir().unwrap();
    let cfg = merged_cfg(&d, vec![ann(5, 11, &["a"], None, Some("q"))]);
    let ds = VqaDataset::load(&cfg).unwrap();
    std::fs::create_dir_all(d.path().join("imgs")).unwrap();
    let img = d.path().join("imgs/COCO_train2014_000000000011.jpg");
    std::fs::write(&img, crate::image_decode::tests::big_png(12000, 12000)).unwrap();
    let cache = ImageCache::new(16);
    let err = ds.load_image(0, &cache).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, DatasetError::ImageTooLarge { path, .. } if path == &img),
        "{msg}"
    );
    assert!(
        msg.contains("COCO_train2014_000000000011.jpg") && msg.contains("8192"),
        "{msg}"
    );
    // The caller's limits apply: a small image over a tiny allocation cap.
    image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
        .save_with_format(&img, image::ImageFormat::Png)
        .unwrap();
    let tiny = crate::image_decode::ImageLimits {
        max_side: 8192,
        max_alloc_bytes: 1024,
    };
    let cache = ImageCache::new(16).with_limits(tiny);
    assert!(matches!(
        ds.load_image(0, &cache),
        Err(DatasetError::ImageTooLarge { .. })
    ));
    assert_eq!(
        ds.load_image(0, &ImageCache::new(16)).unwrap().dimensions(),
        (64, 64)
    );
}

#[test]
fn rgba_and_grey_convert_like_pil() {
    let d = tempfile::tempdir().unwrap();
    let rgba = d.path().join("a.png");
    image::RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 0]))
        .save(&rgba)
        .unwrap();
    let grey = d.path().join("g.png");
    image::GrayImage::from_pixel(3, 1, image::Luma([77]))
        .save(&grey)
        .unwrap();
    let la = d.path().join("la.png");
    image::GrayAlphaImage::from_pixel(1, 1, image::LumaA([5, 9]))
        .save(&la)
        .unwrap();
    let cache = ImageCache::new(1);
    assert_eq!(
        cache.get(&rgba).unwrap().get_pixel(1, 1),
        &image::Rgb([10, 20, 30])
    );
    assert_eq!(
        cache.get(&grey).unwrap().get_pixel(2, 0),
        &image::Rgb([77, 77, 77])
    );
    assert_eq!(
        cache.get(&la).unwrap().get_pixel(0, 0),
        &image::Rgb([5, 5, 5])
    );
}

#[test]
fn cache_eviction_is_lru_and_bounded() {
    let d = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..5)
        .map(|i| {
            let p = d.path().join(format!("{i}.png"));
            save_rgb(&p, 10, 10); // 300 bytes each
            p
        })
        .collect();
    let cache = ImageCache::with_capacity_bytes(950); // room for 3
    for p in &paths[..3] {
        cache.get(p).unwrap();
    }
    assert_eq!(cache.len(), 3);
    assert_eq!(cache.used_bytes(), 900);
    let a = cache.get(&paths[0]).unwrap(); // hit: 0 becomes most recent
    assert!(Arc::ptr_eq(&a, &cache.get(&paths[0]).unwrap()));
    cache.get(&paths[3]).unwrap(); // evicts 1 (least recent)
    assert!(cache.contains(&paths[0]) && !cache.contains(&paths[1]));
    assert!(cache.contains(&paths[2]) && cache.contains(&paths[3]));
    cache.get(&paths[4]).unwrap(); // evicts 2
    assert!(!cache.contains(&paths[2]));
    assert_eq!(cache.len(), 3);
    assert!(cache.used_bytes() <= cache.capacity_bytes());

    // Bigger than the whole capacity: returned, not kept.
    let big = d.path().join("big.png");
    save_rgb(&big, 20, 20);
    assert_eq!(cache.get(&big).unwrap().dimensions(), (20, 20));
    assert!(!cache.contains(&big));
    assert_eq!(cache.len(), 3);

    // Concurrent use stays within the bound.
    std::thread::scope(|s| {
        for t in 0..4 {
            let cache = &cache;
            let paths = &paths;
            s.spawn(move || {
                for k in 0..50 {
                    let img = cache.get(&paths[(t + k) % 5]).unwrap();
                    assert_eq!(img.dimensions(), (10, 10));
                    assert!(cache.used_bytes() <= 950);
                }
            });
        }
    });
    assert_eq!(cache.len(), 3);
    assert_eq!(ImageCache::new(2).capacity_bytes(), 2 << 20);
}

#[test]
fn shared_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ImageCache>();
    assert_send_sync::<VqaDataset>();
    assert_send_sync::<DatasetError>();
}
