//! A corpus of the image files an unchecked folder holds: broken, odd and hostile ones beside
//! good ones, each with what a reader must do with it (decode it to given pixels, or skip it for
//! a given reason). The loader's tests and the CLI's tests share it.
//!
//! Everything is made here except a CMYK JPEG, which no Rust encoder writes
//! (`fixtures/images/cmyk.jpg`, see its README).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba};

/// What a reader must do with a file of the corpus.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Decode it to a `width` x `height` RGB image whose pixel at `at` is within 40 of `rgb` per
    /// channel (JPEG is lossy).
    Used { width: u32, height: u32, at: (u32, u32), rgb: [u8; 3] },
    /// Skip it; the reason's text (`SkipReason`'s `Display`).
    Skipped(&'static str),
}

/// One file of the corpus.
#[derive(Debug, Clone)]
pub struct Case {
    /// What kind of file it is, for messages.
    pub kind: &'static str,
    pub path: PathBuf,
    pub expect: Expect,
}

const RED: [u8; 3] = [220, 30, 30];
const BLUE: [u8; 3] = [30, 30, 220];

/// `width` x `height`, red left half and blue right half.
fn halves(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, _| Rgb(if x < width / 2 { RED } else { BLUE }))
}

fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95).encode_image(img).expect("encode JPEG");
    bytes
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).expect("encode PNG");
    bytes.into_inner()
}

/// A JPEG with an EXIF APP1 segment saying "rotate 90 degrees clockwise to view" (orientation 6).
fn exif_rotated_jpeg(img: &RgbImage) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec(); // big-endian TIFF header, IFD at offset 8
    tiff.extend([0, 1]); // one entry
    tiff.extend([0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]); // Orientation, SHORT, 1 value: 6
    tiff.extend([0, 0, 0, 0]); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let plain = jpeg_bytes(img);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend([0xff, 0xe1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend(&plain[2..]);
    out
}

/// A PNG whose header declares `width` x `height`, with `zeros` bytes of (compressed) pixel
/// data: with a large size and few bytes, a decompression bomb.
fn declared_png(width: u32, height: u32, zeros: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut writer = png::Encoder::new(&mut bytes, width, height).write_header().expect("write a PNG header");
    if zeros > 0 {
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        zlib.write_all(&vec![0; zeros]).expect("compress");
        writer.write_chunk(png::chunk::IDAT, &zlib.finish().expect("compress")).expect("IDAT");
    }
    drop(writer); // writes IEND
    bytes
}

fn palette_png(path: &Path) {
    let mut encoder = png::Encoder::new(fs::File::create(path).expect("create"), 4, 2);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(RED.iter().chain(&BLUE).copied().collect::<Vec<u8>>());
    let mut writer = encoder.write_header().expect("PNG header");
    writer.write_image_data(&[0, 0, 1, 1, 0, 0, 1, 1]).expect("PNG data");
}

/// A 4x2 palette PNG whose PLTE chunk holds 5 bytes, not a multiple of 3 (the chunk CRCs are
/// right): the fuzz tests found that png 0.18.1 panics on it (image-rs/image-png#694).
fn short_palette_png() -> Vec<u8> {
    use crate::fuzz::{PngChunk, PngFile};
    let kind = |name: &[u8; 4]| u32::from_be_bytes(*name);
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    zlib.write_all(&[0, 0, 0, 1, 1, 0, 0, 0, 1, 1]).expect("compress");
    let chunks = vec![
        PngChunk { kind: kind(b"IHDR"), data: vec![0, 0, 0, 4, 0, 0, 0, 2, 8, 3, 0, 0, 0] },
        PngChunk { kind: kind(b"PLTE"), data: vec![220, 30, 30, 30, 220] },
        PngChunk { kind: kind(b"IDAT"), data: zlib.finish().expect("compress") },
        PngChunk { kind: kind(b"IEND"), data: Vec::new() },
    ];
    PngFile { chunks }.bytes()
}

/// Writes the corpus into `dir` (which must exist) and returns its cases: 25 kinds of file, and 5
/// more on Unix: a file without read permission (read anyway when the tests run as root: then
/// it is expected to be used), links that dangle or loop, and a file name that is not UTF-8.
pub fn write_corpus(dir: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |kind, name: &str, bytes: &[u8], expect| {
        let path = dir.join(name);
        fs::write(&path, bytes).expect("write a corpus file");
        cases.push(Case { kind, path, expect });
    };
    let used = |width, height, at, rgb| Expect::Used { width, height, at, rgb };
    let good = halves(8, 6);

    add("good PNG", "good.png", &png_bytes(&good), used(8, 6, (6, 1), BLUE));
    add("good JPEG", "good.jpg", &jpeg_bytes(&good), used(8, 6, (1, 1), RED));
    add("PNG named .jpg", "png-inside.jpg", &png_bytes(&good), used(8, 6, (1, 4), RED));
    let full = jpeg_bytes(&halves(64, 48));
    add("truncated JPEG", "truncated.jpg", &full[..full.len() / 3], Expect::Skipped("corrupt or truncated"));
    let full = png_bytes(&RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8 * 3, y as u8 * 5, (x ^ y) as u8])));
    add("truncated PNG", "truncated.png", &full[..full.len() / 2], Expect::Skipped("corrupt or truncated"));
    let mut flipped = png_bytes(&good);
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    add("PNG with a corrupt chunk", "bad-crc.png", &flipped, Expect::Skipped("corrupt or truncated"));
    add("zero-byte PNG", "empty.png", b"", Expect::Skipped("empty"));
    add("zero-byte JPEG", "empty.jpg", b"", Expect::Skipped("empty"));
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    add("random bytes named .png", "noise.png", &noise, Expect::Skipped("not an image"));
    add(
        "text named .jpg",
        "notes.jpg",
        b"these are not the pixels you are looking for\n",
        Expect::Skipped("not an image"),
    );
    add("a header alone", "header-only.png", &declared_png(8, 6, 0), Expect::Skipped("corrupt or truncated"));
    add(
        "decompression bomb (PNG declaring 100000x100000)",
        "bomb.png",
        &declared_png(100_000, 100_000, 1 << 20),
        Expect::Skipped("over the decoding limits"),
    );
    let cmyk =
        fs::read(crate::sandbox::repo_root().join("fixtures/images/cmyk.jpg")).expect("fixtures/images/cmyk.jpg");
    add("CMYK JPEG", "cmyk.jpg", &cmyk, used(8, 6, (1, 2), [255, 0, 0]));
    let mut deep = Vec::new();
    let img16 =
        ImageBuffer::<Rgb<u16>, _>::from_fn(3, 2, |x, _| Rgb(if x == 0 { [65535, 0, 0] } else { [0, 0, 65535] }));
    image::DynamicImage::ImageRgb16(img16)
        .write_to(&mut std::io::Cursor::new(&mut deep), image::ImageFormat::Png)
        .expect("16-bit PNG");
    add("16-bit PNG", "deep.png", &deep, used(3, 2, (0, 1), [255, 0, 0]));
    let gray = ImageBuffer::<Luma<u8>, _>::from_pixel(5, 4, Luma([77]));
    let mut bytes = Vec::new();
    gray.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).expect("gray PNG");
    add("grayscale PNG", "gray.png", &bytes, used(5, 4, (2, 2), [77, 77, 77]));
    let mut bytes = Vec::new();
    ImageBuffer::<LumaA<u8>, _>::from_pixel(2, 2, LumaA([200, 10]))
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .expect("gray+alpha PNG");
    add("grayscale PNG with alpha", "gray-alpha.png", &bytes, used(2, 2, (1, 1), [200, 200, 200]));
    let mut bytes = Vec::new();
    ImageBuffer::<Rgba<u8>, _>::from_pixel(4, 3, Rgba([10, 200, 30, 0]))
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .expect("RGBA PNG");
    add("RGBA PNG (transparent)", "rgba.png", &bytes, used(4, 3, (3, 2), [10, 200, 30]));
    add("1x1 px PNG", "one-pixel.png", &png_bytes(&RgbImage::from_pixel(1, 1, Rgb(BLUE))), used(1, 1, (0, 0), BLUE));
    add("3x2 px PNG", "three-by-two.png", &png_bytes(&halves(3, 2)), used(3, 2, (2, 1), BLUE));
    let mut bytes = Vec::new();
    halves(8, 6).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Bmp).expect("BMP");
    add("BMP", "good.bmp", &bytes, used(8, 6, (1, 1), RED));
    let mut bytes = Vec::new();
    halves(8, 6).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Gif).expect("GIF");
    add("GIF", "good.gif", &bytes, used(8, 6, (7, 5), BLUE));
    // Stored 8 wide and 4 high, red on the left; upright it is 4 wide and 8 high, red on top.
    add("EXIF-rotated JPEG (orientation 6)", "rotated.jpg", &exif_rotated_jpeg(&halves(8, 4)), used(4, 8, (2, 1), RED));
    add(
        "palette PNG with a 5-byte palette (png 0.18.1 panics on it)",
        "short-palette.png",
        &short_palette_png(),
        Expect::Skipped("corrupt or truncated"),
    );
    // Found by the fuzz tests: GIF89a, a logical screen 0 px wide and 6 high, one 8x6 frame.
    let zero_wide_gif = [
        71, 73, 70, 56, 57, 97, 0, 0, 6, 0, 128, 0, 0, 0, 0, 0, 0, 0, 0, 33, 249, 4, 8, 0, 0, 0, 0, 44, 0, 0, 0, 0, 8,
        0, 6, 0, 128, 30, 30, 220, 220, 30, 30, 2, 11, 140, 3, 9, 135, 202, 186, 14, 124, 78, 170, 2, 0, 59,
    ];
    add("GIF declaring a 0 px wide screen", "zero-wide.gif", &zero_wide_gif, Expect::Skipped("corrupt or truncated"));
    palette_png(&dir.join("palette.png"));
    cases.push(Case { kind: "palette PNG", path: dir.join("palette.png"), expect: used(4, 2, (3, 0), BLUE) });
    #[cfg(unix)]
    cases.extend(unix_cases(dir, &png_bytes(&good)));
    cases
}

#[cfg(unix)]
fn unix_cases(dir: &Path, good_png: &[u8]) -> Vec<Case> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};
    let mut cases = Vec::new();
    let locked = dir.join("no-permission.png");
    fs::write(&locked, good_png).expect("write");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).expect("chmod 000");
    // Root reads it whatever its mode says.
    let expect = match fs::File::open(&locked) {
        Ok(_) => Expect::Used { width: 8, height: 6, at: (6, 1), rgb: BLUE },
        Err(_) => Expect::Skipped("unreadable"),
    };
    cases.push(Case { kind: "file without read permission", path: locked, expect });
    symlink(dir.join("no-such-file.png"), dir.join("dangling.png")).expect("symlink");
    cases.push(Case { kind: "dangling link", path: dir.join("dangling.png"), expect: Expect::Skipped("unreadable") });
    symlink(dir.join("self.png"), dir.join("self.png")).expect("symlink");
    cases.push(Case { kind: "link to itself", path: dir.join("self.png"), expect: Expect::Skipped("unreadable") });
    fs::create_dir_all(dir.join("sub")).expect("mkdir");
    symlink(dir, dir.join("sub/loop")).expect("symlink");
    cases.push(Case {
        kind: "directory link loop",
        path: dir.join("sub/loop"),
        expect: Expect::Skipped("filesystem loop"),
    });
    let odd = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9-latin1.png"));
    let mut file = fs::File::create(&odd).expect("a non-UTF-8 file name");
    file.write_all(good_png).expect("write");
    cases.push(Case {
        kind: "non-UTF-8 file name",
        path: odd,
        expect: Expect::Used { width: 8, height: 6, at: (1, 1), rgb: RED },
    });
    cases
}
