//! Datasets in miniature that the CLI tests of every device build: a clip, a Revisited-style
//! retrieval set and a Copydays-style copy-detection set.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use dino_data::load_rgb;
use image::{Rgb, RgbImage};

/// A moving square as an animated GIF (3 frames, 80 ms each) and as a folder of PNG frames.
pub fn write_clip(dir: &Path) {
    use image::codecs::gif::{GifEncoder, Repeat};
    let frame = |i: u32| {
        RgbImage::from_fn(40, 32, |x, y| {
            let inside = x >= 6 + 8 * i && x < 18 + 8 * i && (10..22).contains(&y);
            if inside { Rgb([240, 200, 40]) } else { Rgb([20, 40, 90]) }
        })
    };
    let mut gif = GifEncoder::new(std::fs::File::create(dir.join("clip.gif")).unwrap());
    gif.set_repeat(Repeat::Infinite).unwrap();
    std::fs::create_dir_all(dir.join("frames")).unwrap();
    for i in 0..3 {
        let rgba = image::DynamicImage::ImageRgb8(frame(i)).to_rgba8();
        gif.encode_frame(image::Frame::from_parts(rgba, 0, 0, image::Delay::from_numer_denom_ms(80, 1))).unwrap();
        frame(i).save(dir.join(format!("frames/{i:03}.png"))).unwrap();
    }
}

/// A Revisited-style dataset of six patterned images and two queries, each an exact copy of a
/// database image, with its gnd_tiny.pkl: query 0's positives are images 0 (easy) and 1 (hard),
/// image 2 is junk; query 1's only positive is image 3 (hard).
pub fn write_revisited(root: &Path) -> PathBuf {
    use serde_pickle::{HashableValue, Value};
    let dir = root.join("tiny");
    std::fs::create_dir_all(dir.join("jpg")).unwrap();
    for i in 0..6u32 {
        let img = RgbImage::from_fn(48 + 4 * i, 40, |x, y| {
            Rgb([((x * (i + 1) * 7) % 255) as u8, ((y * (6 - i) * 5) % 255) as u8, ((x + y) * 3 * i % 255) as u8])
        });
        img.save(dir.join(format!("jpg/db{i}.jpg"))).unwrap();
    }
    std::fs::copy(dir.join("jpg/db0.jpg"), dir.join("jpg/q0.jpg")).unwrap();
    std::fs::copy(dir.join("jpg/db3.jpg"), dir.join("jpg/q1.jpg")).unwrap();
    let s = |x: &str| Value::String(x.into());
    let ints = |v: &[i64]| Value::List(v.iter().map(|&i| Value::I64(i)).collect());
    let query = |easy: &[i64], hard: &[i64], junk: &[i64]| {
        let mut d = std::collections::BTreeMap::new();
        d.insert(HashableValue::String("bbx".into()), Value::List(vec![Value::F64(0.0); 4]));
        d.insert(HashableValue::String("easy".into()), ints(easy));
        d.insert(HashableValue::String("hard".into()), ints(hard));
        d.insert(HashableValue::String("junk".into()), ints(junk));
        Value::Dict(d)
    };
    let mut top = std::collections::BTreeMap::new();
    top.insert(HashableValue::String("imlist".into()), Value::List((0..6).map(|i| s(&format!("db{i}"))).collect()));
    top.insert(HashableValue::String("qimlist".into()), Value::List(vec![s("q0"), s("q1")]));
    top.insert(HashableValue::String("gnd".into()), Value::List(vec![query(&[0], &[1], &[2]), query(&[], &[3], &[])]));
    let bytes = serde_pickle::value_to_vec(&Value::Dict(top), Default::default()).unwrap();
    std::fs::write(dir.join("gnd_tiny.pkl"), bytes).unwrap();
    dir
}

/// Copydays in miniature from the four fixture photographs: original/ (names 200000 to 200300),
/// strong/ (rotated, cropped and overlaid copies, one per photograph: 2000xx finds 200000),
/// jpegqual/10/, crops/50/, and folders of distractors and of whitening images.
pub fn write_copydays(root: &Path) -> PathBuf {
    use image::imageops;
    let dir = root.join("copydays");
    let photos = dino_fixtures::sandbox::repo_root().join("fixtures/images/photos");
    let save_jpeg = |img: &RgbImage, path: PathBuf, quality: u8| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut out = std::fs::File::create(path).unwrap();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
    };
    for (i, name) in ["astronaut", "chelsea", "coffee", "rocket"].iter().enumerate() {
        let img = load_rgb(&photos.join(format!("{name}.jpg")), &Default::default()).unwrap();
        let id = 200000 + 100 * i;
        let (w, h) = img.dimensions();
        save_jpeg(&img, dir.join(format!("original/{id}.jpg")), 95);
        save_jpeg(&img, dir.join(format!("jpegqual/10/{id}.jpg")), 10);
        let crop = imageops::crop_imm(&img, w / 4, h / 4, w / 2 + w % 2, h / 2).to_image();
        save_jpeg(&crop, dir.join(format!("crops/50/{id}.jpg")), 95);
        let mut strong = imageops::rotate90(&imageops::crop_imm(&img, 0, 0, w * 4 / 5, h).to_image());
        for y in 4..14 {
            for x in 4..30 {
                strong.put_pixel(x, y, Rgb([255, 255, 0]));
            }
        }
        save_jpeg(&strong, dir.join(format!("strong/{}.jpg", id + 7)), 50);
        let flipped = imageops::flip_horizontal(&img);
        save_jpeg(&flipped, root.join(format!("whiten/{name}.jpg")), 90);
        save_jpeg(&imageops::flip_vertical(&img), root.join(format!("whiten/{name}-v.jpg")), 90);
        save_jpeg(&imageops::rotate180(&flipped), root.join(format!("distract/{name}.jpg")), 90);
    }
    dir
}
