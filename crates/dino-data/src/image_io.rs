//! Decoding and listing image files.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::DataError;

/// File extensions treated as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff"];

/// Whether `path` has an image extension.
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Decodes any supported image to 8-bit RGB, as PIL's `convert("RGB")` does: grayscale is
/// replicated, palettes expanded, alpha dropped, 16-bit scaled to 8-bit. The format is read
/// from the content, not the extension.
pub fn load_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let decode = |reason: String| DataError::Decode { path: path.into(), reason };
    let reader = image::ImageReader::open(path)
        .map_err(|source| DataError::Io { path: path.into(), source })?
        .with_guessed_format()
        .map_err(|source| DataError::Io { path: path.into(), source })?;
    if reader.format().is_none() {
        return Err(decode("not a known image format".into()));
    }
    let image = reader.decode().map_err(|e| decode(e.to_string()))?;
    Ok(image.to_rgb8())
}

/// Every image file under `dir`, recursively, in sorted path order.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry = entry.map_err(|e| DataError::Io {
            path: e.path().unwrap_or(dir).into(),
            source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("filesystem loop")),
        })?;
        if entry.file_type().is_file() && is_image_file(entry.path()) {
            paths.push(entry.into_path());
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(DataError::NoImages { path: dir.into() });
    }
    Ok(paths)
}

/// Image paths from a text file, one per line; blank lines and `#` comments are skipped and
/// relative paths are taken relative to the list's directory.
pub fn read_image_list(list: &Path) -> Result<Vec<PathBuf>, DataError> {
    let text = std::fs::read_to_string(list).map_err(|source| DataError::Io { path: list.into(), source })?;
    let base = list.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| base.join(l)).collect();
    if paths.is_empty() {
        return Err(DataError::NoImages { path: list.into() });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

    #[test]
    fn every_pixel_format_becomes_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        GrayImage::from_pixel(3, 2, Luma([7])).save(&gray).unwrap();
        assert_eq!(load_rgb(&gray).unwrap().get_pixel(0, 0).0, [7, 7, 7]);
        let rgba = dir.path().join("a.png");
        RgbaImage::from_pixel(3, 2, Rgba([1, 2, 3, 0])).save(&rgba).unwrap();
        assert_eq!(load_rgb(&rgba).unwrap().get_pixel(2, 1).0, [1, 2, 3]);
        let deep = dir.path().join("d.png");
        ImageBuffer::<Luma<u16>, _>::from_pixel(2, 2, Luma([65535u16])).save(&deep).unwrap();
        assert_eq!(load_rgb(&deep).unwrap().get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.png");
        std::fs::write(&text, "hello").unwrap();
        let err = load_rgb(&text).unwrap_err().to_string();
        assert!(err.contains("notes.png") && err.contains("cannot decode"), "{err}");
        let missing = dir.path().join("missing.jpg");
        assert!(load_rgb(&missing).unwrap_err().to_string().contains("missing.jpg"));
        assert!(matches!(list_images(dir.path()), Ok(v) if v.len() == 1));
        let empty = tempfile::tempdir().unwrap();
        assert!(list_images(empty.path()).unwrap_err().to_string().contains("no images"));
    }

    #[test]
    fn lists_resolve_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# comment\na.png\n\n/abs/b.jpg\n").unwrap();
        let paths = read_image_list(&list).unwrap();
        assert_eq!(paths, vec![dir.path().join("a.png"), PathBuf::from("/abs/b.jpg")]);
    }
}
