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
}
