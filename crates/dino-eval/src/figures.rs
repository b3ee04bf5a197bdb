//! Figures: `training.png` (the loss and the k-NN top-1 per epoch, read from a run's
//! `log.txt`), the 2-D embedding of labeled features, and retrieval contact sheets.
//!
//! Text (titles, axis labels, tick values) needs a TrueType font: plotters' `ab_glyph` renderer
//! draws it without a system font library, from the first font file found in `$DINO_FONT` or
//! [`FONT_FILES`]. Without one the panels are drawn with their grid and no text (the numbers
//! are in `log.txt` either way).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

/// Fonts looked for, in order, when `$DINO_FONT` names none (Debian/Ubuntu, Fedora, Arch paths).
pub const FONT_FILES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const FONT: &str = "sans-serif";

/// Registers a font once per process; false when none could be read.
fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let candidates = std::env::var("DINO_FONT").into_iter().chain(FONT_FILES.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the whole process, as `&'static` bytes.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// `(epochs done, value)` per log line; `initial`, when the first line has it, at 0 epochs.
fn series(log: &str, key: &str, initial: Option<&str>) -> Vec<(f64, f64)> {
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let start = initial.and_then(|k| lines.first()?[k].as_f64()).map(|v| (0.0, v));
    start.into_iter().chain(lines.iter().filter_map(|v| Some((v["epoch"].as_f64()? + 1.0, v[key].as_f64()?)))).collect()
}

/// One curve of a panel: points, colour, and a legend label (drawn when there is a font).
struct Curve<'a> {
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    label: &'a str,
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    curves: &[Curve<'_>],
    title: &str,
    text: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let all: Vec<(f64, f64)> = curves.iter().flat_map(|c| c.points.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (x_max, y) =
        all.iter().fold((1.0f64, (f64::MAX, f64::MIN)), |(x, (lo, hi)), p| (x.max(p.0), (lo.min(p.1), hi.max(p.1))));
    let pad = ((y.1 - y.0) * 0.1).max(1e-3);
    let mut builder = ChartBuilder::on(area);
    builder.margin(20);
    if text {
        builder.caption(title, (FONT, 22)).x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0.0..x_max, (y.0 - pad)..(y.1 + pad))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(240, 240, 240)).bold_line_style(RGBColor(215, 215, 215));
    if text {
        mesh.x_desc("epochs").label_style((FONT, 15)).x_label_formatter(&|x| format!("{x:.0}"));
    } else {
        mesh.disable_axes();
    }
    mesh.x_labels((x_max as usize + 1).min(12)).y_labels(6);
    mesh.draw()?;
    for curve in curves.iter().filter(|c| !c.points.is_empty()) {
        let colour = curve.colour;
        let series = chart.draw_series(LineSeries::new(curve.points.iter().copied(), colour.stroke_width(3)))?;
        if text && curves.len() > 1 {
            series
                .label(curve.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(3)));
        }
        chart.draw_series(curve.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
    }
    if text && curves.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 14))
            .draw()?;
    }
    Ok(())
}

/// Draws the plot for the run whose `log.txt` is `log`.
pub fn plot_history(log: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    draw(&std::fs::read_to_string(log)?, out, font_available())
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREY: RGBColor = RGBColor(127, 127, 127);
const PURPLE: RGBColor = RGBColor(148, 103, 189);

/// Six panels: the loss and the teacher's k-NN; then the health numbers of the collapse study
/// (teacher entropies against their ceiling ln K, the KL part of the loss, the center's norm,
/// the teacher's drift per epoch).
fn draw(log: &str, out: &Path, text: bool) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1500, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 3));
    let curve =
        |key: &str, initial: Option<&str>, colour, label| Curve { points: series(log, key, initial), colour, label };
    panel(&areas[0], &[curve("train_loss", None, BLUE, "loss")], "DINO loss", text)?;
    let knn = curve("knn_top1", Some("knn_top1_initial"), RED, "teacher");
    let pixels = curve("knn_top1_pixels", None, GREY, "raw pixels");
    let knn_title = "teacher k-NN top-1 (%)";
    if pixels.points.is_empty() {
        panel(&areas[1], &[knn], knn_title, text)?;
    } else {
        // The baseline is one number: draw it as a flat line across the run.
        let x_end = knn.points.last().map_or(1.0, |p| p.0);
        let level = pixels.points[0].1;
        let flat = Curve { points: vec![(0.0, level), (x_end, level)], ..pixels };
        panel(&areas[1], &[knn, flat], knn_title, text)?;
    }
    panel(
        &areas[2],
        &[
            curve("teacher_entropy", None, GREEN, "per image"),
            curve("teacher_batch_entropy", None, ORANGE, "batch mean"),
            curve("entropy_ceiling", None, GREY, "ln K"),
        ],
        "teacher entropy (nats)",
        text,
    )?;
    panel(&areas[3], &[curve("kl_divergence", None, PURPLE, "KL")], "KL(teacher || student)", text)?;
    panel(&areas[4], &[curve("center_norm", None, BLUE, "center")], "center norm", text)?;
    panel(
        &areas[5],
        &[curve("teacher_drift", None, RED, "teacher"), curve("student_drift", None, BLUE, "student")],
        "parameter change per epoch",
        text,
    )?;
    root.present()?;
    Ok(())
}

/// Ten distinguishable class colours (matplotlib's tab10); further classes reuse them.
const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A scatter plot of 2-D points coloured by label, with a legend of `class_names` and a title
/// (when a font is available).
pub fn plot_embedding(
    points: &[[f32; 2]],
    labels: &[u32],
    class_names: &[String],
    title: &str,
    out: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let text = font_available();
    let root = BitMapBackend::new(out, (900, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let range = |axis: usize| {
        let (lo, hi) = points.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| (lo.min(p[axis]), hi.max(p[axis])));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder.caption(title, (FONT, 22)).x_label_area_size(35).y_label_area_size(50);
    }
    let mut chart = builder.build_cartesian_2d(range(0), range(1))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(240, 240, 240));
    if text {
        mesh.x_desc("PC 1").y_desc("PC 2").label_style((FONT, 14));
    } else {
        mesh.disable_axes();
    }
    mesh.draw()?;
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    for class in 0..classes {
        let colour = TAB10[class % TAB10.len()];
        let series = chart.draw_series(
            points
                .iter()
                .zip(labels)
                .filter(|(_, l)| **l as usize == class)
                .map(|(p, _)| Circle::new((p[0], p[1]), 2, colour.mix(0.6).filled())),
        )?;
        if text {
            let name = class_names.get(class).cloned().unwrap_or_else(|| class.to_string());
            series.label(name).legend(move |(x, y)| Circle::new((x, y), 5, colour.filled()));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Side of a contact-sheet cell, and columns before a row wraps.
const THUMB: u32 = 160;
const SHEET_COLUMNS: u32 = 6;

/// One image of a contact sheet and its caption.
pub struct SheetImage<'a> {
    pub image: &'a image::RgbImage,
    pub caption: String,
}

/// A contact sheet: `query` framed in blue, then each neighbour in rank order, each scaled to fit
/// a 160 px cell, captioned underneath when a font is available, six to a row.
pub fn contact_sheet(
    query: SheetImage<'_>,
    neighbours: &[SheetImage<'_>],
    out: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let text = font_available();
    let (pad, caption) = (8u32, if text { 22u32 } else { 0 });
    let cells = 1 + neighbours.len() as u32;
    let (columns, rows) = (cells.min(SHEET_COLUMNS), cells.div_ceil(SHEET_COLUMNS));
    let (cell_w, cell_h) = (THUMB + pad, THUMB + caption + pad);
    let (width, height) = (pad + columns * cell_w, pad + rows * cell_h);
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let origin = |i: u32| (pad + (i % SHEET_COLUMNS) * cell_w, pad + (i / SHEET_COLUMNS) * cell_h);
    for (i, item) in std::iter::once(&query).chain(neighbours).enumerate() {
        let (x0, y0) = origin(i as u32);
        let frame = if i == 0 { image::Rgb([31, 119, 180]) } else { image::Rgb([200, 200, 200]) };
        let border = if i == 0 { 4 } else { 1 };
        for y in y0..y0 + THUMB {
            for x in x0..x0 + THUMB {
                let edge = x < x0 + border || y < y0 + border || x >= x0 + THUMB - border || y >= y0 + THUMB - border;
                canvas.put_pixel(x, y, if edge { frame } else { image::Rgb([240, 240, 240]) });
            }
        }
        let inner = THUMB - 2 * border;
        let (w, h) = item.image.dimensions();
        let scale = (inner as f32 / w.max(1) as f32).min(inner as f32 / h.max(1) as f32);
        let (tw, th) =
            (((w as f32 * scale).round() as u32).clamp(1, inner), ((h as f32 * scale).round() as u32).clamp(1, inner));
        let thumb = dino_data::resize_exact(item.image, tw, th, dino_data::Filter::Bilinear);
        image::imageops::replace(
            &mut canvas,
            &thumb,
            (x0 + border + (inner - tw) / 2) as i64,
            (y0 + border + (inner - th) / 2) as i64,
        );
    }
    if text {
        let (buffer_w, buffer_h) = canvas.dimensions();
        let mut raw = canvas.into_raw();
        {
            let root = BitMapBackend::with_buffer(&mut raw, (buffer_w, buffer_h)).into_drawing_area();
            let style = TextStyle::from((FONT, 15).into_font()).color(&BLACK);
            for (i, item) in std::iter::once(&query).chain(neighbours).enumerate() {
                let (x0, y0) = origin(i as u32);
                root.draw_text(&item.caption, &style, (x0 as i32 + 2, (y0 + THUMB + 4) as i32))?;
            }
            root.present()?;
        }
        canvas = image::RgbImage::from_raw(buffer_w, buffer_h, raw).expect("the buffer keeps its size");
    }
    canvas.save(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_embedding_in_class_colours() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("embedding.png");
        let points: Vec<[f32; 2]> =
            (0..60).map(|i| [(i % 3) as f32 * 5.0 + (i as f32 * 0.1).sin(), i as f32 * 0.1]).collect();
        let labels: Vec<u32> = (0..60).map(|i| i % 3).collect();
        plot_embedding(&points, &labels, &["a".into(), "b".into(), "c".into()], "test", &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 800));
        let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(non_white > 1000, "points drawn: {non_white}");
    }

    /// Both panels with and without text (the text only where this machine has a font).
    #[test]
    fn draws_both_panels() {
        let dir = tempfile::tempdir().unwrap();
        let health = |h: f64| {
            format!(
                "\"teacher_entropy\":{h},\"teacher_batch_entropy\":{},\"kl_divergence\":{},\"entropy_ceiling\":7.62,\"center_norm\":1.5,\"teacher_drift\":{},\"student_drift\":0.05",
                h + 1.0,
                h / 10.0,
                h / 100.0
            )
        };
        let log = format!(
            "{{\"epoch\":0,\"train_loss\":7.1,\"knn_top1\":60.5,\"knn_top1_initial\":50,\"knn_top1_pixels\":65,{}}}\n{{\"epoch\":1,\"train_loss\":6.5,\"knn_top1\":70.25,{}}}\n",
            health(6.0),
            health(5.0)
        );
        let log = log.as_str();
        let png = dir.path().join("training.png");
        let mut dark_pixels = Vec::new();
        for text in [false, font_available()] {
            draw(log, &png, text).unwrap();
            let img = image::open(&png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (1500, 800));
            let coloured = |c: [u8; 3], panel: (u32, u32)| {
                let (x0, y0) = (panel.0 * 500, panel.1 * 400);
                (x0..x0 + 500)
                    .flat_map(|x| (y0..y0 + 400).map(move |y| (x, y)))
                    .filter(|&(x, y)| img.get_pixel(x, y).0 == c)
                    .count()
            };
            assert!(coloured([31, 119, 180], (0, 0)) > 100, "the loss curve is drawn");
            assert!(coloured([214, 39, 40], (1, 0)) > 100, "the k-NN curve is drawn");
            assert!(coloured([127, 127, 127], (1, 0)) > 100, "the pixel baseline is drawn");
            assert!(coloured([44, 160, 44], (2, 0)) > 100, "the teacher entropy is drawn");
            assert!(coloured([148, 103, 189], (0, 1)) > 100, "the KL is drawn");
            assert!(coloured([214, 39, 40], (2, 1)) > 100, "the drift is drawn");
            dark_pixels.push(img.pixels().filter(|p| p.0.iter().all(|&v| v < 100)).count());
        }
        if font_available() {
            assert!(dark_pixels[1] > dark_pixels[0] + 500, "titles and labels are drawn: {dark_pixels:?}");
        }
    }
    #[test]
    fn a_contact_sheet_shows_the_query_framed_and_its_neighbours_in_rows_of_six() {
        let dir = tempfile::tempdir().unwrap();
        let red = image::RgbImage::from_pixel(40, 20, image::Rgb([230, 10, 10]));
        let green = image::RgbImage::from_pixel(10, 30, image::Rgb([10, 230, 10]));
        let neighbours: Vec<SheetImage> =
            (0..7).map(|i| SheetImage { image: &green, caption: format!("{} 0.{}", i + 1, 9 - i) }).collect();
        let png = dir.path().join("sheet.png");
        contact_sheet(SheetImage { image: &red, caption: "query".into() }, &neighbours, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        let caption = if font_available() { 22 } else { 0 };
        assert_eq!(img.dimensions(), (8 + 6 * 168, 8 + 2 * (168 + caption)));
        assert_eq!(img.get_pixel(8, 8).0, [31, 119, 180], "the query's frame");
        assert_eq!(img.get_pixel(8 + 80, 8 + 80).0, [230, 10, 10], "the query, centred in its cell");
        assert_eq!(img.get_pixel(8 + 168 + 80, 8 + 80).0, [10, 230, 10], "the first neighbour");
        let second_row = 8 + 168 + caption + 80;
        assert_eq!(img.get_pixel(8 + 80, second_row).0, [10, 230, 10], "the sixth neighbour wraps");
        assert_eq!(img.get_pixel(8 + 2 * 168 + 80, second_row).0, [255, 255, 255], "no eighth cell");
    }
}
