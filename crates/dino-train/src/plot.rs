//! `training.png`: the loss (left) and the k-NN top-1 (right) per epoch, read from `log.txt`.
//!
//! Drawn with plotters' bitmap backend and no text (its text needs system fonts): vertical grid
//! lines mark the epochs, horizontal ones quarter each panel's range; the numbers are in
//! `log.txt`.

use std::path::Path;

use plotters::prelude::*;

fn series(log: &str, key: &str) -> Vec<(f64, f64)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| Some((v["epoch"].as_f64()?, v[key].as_f64()?)))
        .collect()
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    points: &[(f64, f64)],
    colour: RGBColor,
) -> Result<(), Box<dyn std::error::Error>> {
    if points.is_empty() {
        return Ok(());
    }
    let (x_max, y) =
        points.iter().fold((1.0f64, (f64::MAX, f64::MIN)), |(x, (lo, hi)), p| (x.max(p.0), (lo.min(p.1), hi.max(p.1))));
    let pad = ((y.1 - y.0) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(area).margin(20).build_cartesian_2d(0.0..x_max, (y.0 - pad)..(y.1 + pad))?;
    // Grid by hand (plotters' mesh needs fonts for its labels): a line per epoch, five levels.
    let grey = RGBColor(220, 220, 220);
    let (y_lo, y_hi) = (y.0 - pad, y.1 + pad);
    for e in 0..=x_max as usize {
        chart.draw_series(LineSeries::new([(e as f64, y_lo), (e as f64, y_hi)], grey))?;
    }
    for i in 0..=4 {
        let level = y_lo + (y_hi - y_lo) * i as f64 / 4.0;
        chart.draw_series(LineSeries::new([(0.0, level), (x_max, level)], grey))?;
    }
    chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(3)))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, colour.filled())))?;
    Ok(())
}

/// Draws the plot for the run whose `log.txt` is `log`.
pub fn plot_history(log: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(log)?;
    let root = BitMapBackend::new(out, (1000, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    panel(&left, &series(&text, "train_loss"), RGBColor(31, 119, 180))?;
    panel(&right, &series(&text, "knn_top1"), RGBColor(214, 39, 40))?;
    root.present()?;
    Ok(())
}
