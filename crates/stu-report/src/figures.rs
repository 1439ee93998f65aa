//! The paper's figure types with plotters: bubble charts (Fig. 1), curves on a log x axis
//! (Fig. 4) and grouped bars (Fig. 5). Each draws PNG and SVG; ours and the paper's numbers sit
//! in two panels of one figure, because they come from different datasets.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

/// A labelled point.
#[derive(Debug, Clone)]
pub struct Bubble {
    /// Label.
    pub label: String,
    /// x (log axis).
    pub x: f64,
    /// y.
    pub y: f64,
    /// Area weight (e.g. MACs).
    pub area: f64,
}

/// A named line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// Axis numbers: whole numbers for percentages, three decimals for Dice in [0, 1].
fn tick(v: &f64) -> String {
    if v.abs() >= 10.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

fn e<T: std::fmt::Debug>(err: T) -> anyhow::Error {
    anyhow!("{err:?}")
}

/// Draws a figure of `size` as `path` (PNG) and beside it as SVG: the body runs once per
/// backend with the whole drawing area bound to the name.
macro_rules! png_and_svg {
    ($path:expr, $size:expr, |$a:ident| $body:block) => {{
        crate::register_font();
        {
            let $a = BitMapBackend::new($path, $size).into_drawing_area();
            $a.fill(&WHITE).map_err(e)?;
            $body
            $a.present().map_err(e)?;
        }
        let svg = $path.with_extension("svg");
        let $a = SVGBackend::new(&svg, $size).into_drawing_area();
        $a.fill(&WHITE).map_err(e)?;
        $body
        $a.present().map_err(e)?;
        Ok(())
    }};
}

/// Draws a two-panel figure (ours left, the paper's right) as `path` (PNG) and beside it as
/// SVG: the body runs once per backend with the panels bound to the two names.
macro_rules! two_panels {
    ($path:expr, |$l:ident, $r:ident| $body:block) => {
        png_and_svg!($path, (1100, 480), |area| {
            let ($l, $r) = area.split_horizontally(550);
            $body
        })
    };
}

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

fn bubble_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, xlabel: &str, ylabel: &str, pts: &[Bubble]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if pts.is_empty() {
        area.titled(&format!("{title}: no data"), ("sans-serif", 16)).map_err(e)?;
        return Ok(());
    }
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.x), b.max(p.x)));
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.y), b.max(p.y)));
    let pad = ((ymax - ymin) * 0.15).max(0.02 * ymax.abs().max(1e-3));
    let amax = pts.iter().map(|p| p.area).fold(0.0, f64::max).max(1e-12);
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((xmin / 2.0..xmax * 2.0).log_scale(), ymin - pad..ymax + pad)
        .map_err(e)?;
    ch.configure_mesh().x_labels(6).x_label_formatter(&|v| format!("{v:.3}")).y_label_formatter(&tick).x_desc(xlabel).y_desc(ylabel).draw().map_err(e)?;
    for (i, p) in pts.iter().enumerate() {
        let r = (28.0 * (p.area / amax).sqrt()).max(3.0) as i32;
        let c = COLORS[i % COLORS.len()];
        ch.draw_series(std::iter::once(Circle::new((p.x, p.y), r, c.mix(0.45).filled()))).map_err(e)?;
        ch.draw_series(std::iter::once(Text::new(p.label.clone(), (p.x, p.y), ("sans-serif", 12)))).map_err(e)?;
    }
    Ok(())
}

/// Fig. 1: Dice vs size, bubble area ∝ `area`; ours left, the paper's right.
pub fn bubbles(path: &Path, ours: &[Bubble], ours_x: &str, paper: &[Bubble], paper_x: &str) -> Result<()> {
    two_panels!(path, |l, r| {
        bubble_panel(&l, "this harness (area ∝ MACs)", ours_x, "mean Dice", ours)?;
        bubble_panel(&r, "paper, TotalSegmentator (area ∝ FLOPs)", paper_x, "mean DSC (%)", paper)?;
    })
}

fn curve_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if all.is_empty() {
        area.titled(&format!("{title}: no data"), ("sans-serif", 16)).map_err(e)?;
        return Ok(());
    }
    let (xmin, xmax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((ymax - ymin) * 0.1).max(0.01 * ymax.abs().max(1e-3));
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((xmin * 0.8..xmax * 1.25).log_scale(), ymin - pad..ymax + pad)
        .map_err(e)?;
    ch.configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&tick)
        .x_desc(xlabel)
        .y_desc(ylabel)
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        ch.draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2))).map_err(e)?.label(s.name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        ch.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(e)?;
    }
    ch.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(e)?;
    Ok(())
}

/// Fig. 4: Dice vs training fraction (log x); ours left, the paper's right.
pub fn curves(path: &Path, ours: &[Series], paper: &[Series], xlabel: &str) -> Result<()> {
    two_panels!(path, |l, r| {
        curve_panel(&l, "this harness", xlabel, "mean Dice", ours)?;
        curve_panel(&r, "paper, TotalSegmentator", xlabel, "mean DSC (%)", paper)?;
    })
}

/// Grouped bars, one series per colour; `spread[s][g]`, where given (non-empty), draws a
/// whisker of ± that much around series `s`'s bar of group `g` (a standard deviation over seeds).
fn bar_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, ylabel: &str, groups: &[String], series: &[(String, Vec<f64>)], spread: &[Vec<f64>]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if groups.is_empty() || series.is_empty() {
        area.titled(&format!("{title}: no data"), ("sans-serif", 16)).map_err(e)?;
        return Ok(());
    }
    let vals: Vec<f64> = series.iter().enumerate().flat_map(|(si, s)| s.1.iter().enumerate().map(move |(gi, v)| v + spread.get(si).and_then(|e| e.get(gi)).copied().unwrap_or(0.0))).filter(|v| v.is_finite()).collect();
    let ymax = vals.iter().copied().fold(0.0, f64::max) * 1.3 + 1e-9;
    let n = groups.len();
    let k = series.len();
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(e)?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .y_label_formatter(&tick)
        .x_label_formatter(&|x| {
            // Ticks at every half unit; the group names sit at the bar-group centres.
            let h = (x * 2.0).round() as i64;
            if h % 2 == 1 { groups.get((h / 2) as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .y_desc(ylabel)
        .draw()
        .map_err(e)?;
    for (si, (name, v)) in series.iter().enumerate() {
        let c = COLORS[si % COLORS.len()];
        let w = 0.8 / k as f64;
        ch.draw_series(v.iter().enumerate().filter(|(_, y)| y.is_finite()).map(|(gi, &y)| {
            let x0 = gi as f64 + 0.1 + si as f64 * w;
            Rectangle::new([(x0, 0.0), (x0 + w * 0.95, y)], c.filled())
        }))
        .map_err(e)?
        .label(name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        if let Some(err) = spread.get(si) {
            ch.draw_series(v.iter().zip(err).enumerate().filter(|(_, (y, d))| y.is_finite() && d.is_finite() && **d > 0.0).map(|(gi, (&y, &d))| {
                let xm = gi as f64 + 0.1 + si as f64 * w + w * 0.475;
                PathElement::new(vec![(xm, (y - d).max(0.0)), (xm, y + d)], BLACK.stroke_width(2))
            }))
            .map_err(e)?;
        }
    }
    ch.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(e)?;
    Ok(())
}

/// One panel of grouped bars (PNG at `path`, SVG beside it): a study of the user's own, with
/// no paper numbers to set beside it (one group per variant or point, one series per metric,
/// whiskers of ± `spread` where given).
pub fn bars_alone(path: &Path, title: &str, ylabel: &str, groups: &[String], series: &[(String, Vec<f64>)], spread: &[Vec<f64>]) -> Result<()> {
    // Room for each group's name under its bars (about 7 px a character at the axis font).
    let per_group = groups.iter().map(|g| 7 * g.chars().count() as u32 + 24).max().unwrap_or(0).max(160);
    let width = (per_group * groups.len() as u32 + 80).clamp(600, 3200);
    png_and_svg!(path, (width, 480), |area| {
        bar_panel(&area, title, ylabel, groups, series, spread)?;
    })
}

/// Fig. 5: per-group bars (experts vs universal); ours left, the paper's right.
pub fn bars(path: &Path, groups: &[String], ours: &[(String, Vec<f64>)], paper_groups: &[String], paper: &[(String, Vec<f64>)]) -> Result<()> {
    two_panels!(path, |l, r| {
        bar_panel(&l, "this harness", "mean Dice", groups, ours, &[])?;
        bar_panel(&r, "paper, TotalSegmentator (B)", "mean DSC (%)", paper_groups, paper, &[])?;
    })
}
