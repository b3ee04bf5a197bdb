//! Figures: `training.png` (the loss and the k-NN top-1 per epoch, read from a run's
//! `log.txt`) and the 2-D embedding of labeled features.
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

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    points: &[(f64, f64)],
    colour: RGBColor,
    title: &str,
    text: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    if points.is_empty() {
        return Ok(());
    }
    let (x_max, y) =
        points.iter().fold((1.0f64, (f64::MAX, f64::MIN)), |(x, (lo, hi)), p| (x.max(p.0), (lo.min(p.1), hi.max(p.1))));
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
    mesh.x_labels(x_max as usize + 1).y_labels(6);
    mesh.draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(3)))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, colour.filled())))?;
    Ok(())
}

/// Draws the plot for the run whose `log.txt` is `log`.
pub fn plot_history(log: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    draw(&std::fs::read_to_string(log)?, out, font_available())
}

fn draw(log: &str, out: &Path, text: bool) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1000, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    panel(&left, &series(log, "train_loss", None), RGBColor(31, 119, 180), "DINO loss", text)?;
    panel(
        &right,
        &series(log, "knn_top1", Some("knn_top1_initial")),
        RGBColor(214, 39, 40),
        "teacher k-NN top-1 (%)",
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
        let log = "{\"epoch\":0,\"train_loss\":7.1,\"knn_top1\":60.5,\"knn_top1_initial\":50}\n{\"epoch\":1,\"train_loss\":6.5,\"knn_top1\":70.25}\n";
        let png = dir.path().join("training.png");
        let mut dark_pixels = Vec::new();
        for text in [false, font_available()] {
            draw(log, &png, text).unwrap();
            let img = image::open(&png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (1000, 400));
            let coloured = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
            assert!(coloured([31, 119, 180]) > 100, "the loss curve is drawn");
            assert!(coloured([214, 39, 40]) > 100, "the k-NN curve is drawn");
            dark_pixels.push(img.pixels().filter(|p| p.0.iter().all(|&v| v < 100)).count());
        }
        if font_available() {
            assert!(dark_pixels[1] > dark_pixels[0] + 500, "titles and labels are drawn: {dark_pixels:?}");
        }
    }
}
