//! The training-progress figure (nnU-Net's `progress.png`): losses and pseudo Dice per epoch.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// Per-epoch series; NaN marks a missing value (no validation).
#[derive(Debug, Clone, Default)]
pub struct TrainingCurves {
    /// Epoch numbers.
    pub epochs: Vec<f64>,
    /// Mean training loss.
    pub train_loss: Vec<f64>,
    /// Mean validation loss.
    pub val_loss: Vec<f64>,
    /// Mean foreground pseudo Dice.
    pub pseudo_dice: Vec<f64>,
    /// Its EMA.
    pub ema_dice: Vec<f64>,
}

fn finite(xs: &[f64], ys: &[f64]) -> Vec<(f64, f64)> {
    xs.iter().zip(ys).filter(|(_, y)| y.is_finite()).map(|(x, y)| (*x, *y)).collect()
}

/// Draws `path` (PNG, 1000×500) and the same chart as SVG beside it.
pub fn draw(c: &TrainingCurves, path: &Path) -> Result<()> {
    crate::register_font();
    let png = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    plot(c, &png)?;
    png.present().map_err(|e| anyhow!("{e}"))?;
    drop(png);
    let svg_path = path.with_extension("svg");
    let svg = SVGBackend::new(&svg_path, (1000, 500)).into_drawing_area();
    plot(c, &svg)?;
    svg.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn plot<DB: DrawingBackend>(c: &TrainingCurves, area: &DrawingArea<DB, plotters::coord::Shift>) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = area.split_horizontally(500);
    let last = c.epochs.last().copied().unwrap_or(0.0).max(1.0);
    let losses: Vec<f64> = c.train_loss.iter().chain(&c.val_loss).copied().filter(|v| v.is_finite()).collect();
    let (lo, hi) = losses.iter().fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let (lo, hi) = if losses.is_empty() { (-1.0, 1.0) } else { (lo - 0.05 * (hi - lo).max(1e-3), hi + 0.05 * (hi - lo).max(1e-3)) };
    let mut ch = ChartBuilder::on(&left)
        .caption("loss (CE + soft Dice; lower is better)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..last, lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    ch.configure_mesh().x_desc("epoch").draw().map_err(|e| anyhow!("{e}"))?;
    for (name, ys, color) in [("train", &c.train_loss, BLUE), ("validation", &c.val_loss, RED)] {
        ch.draw_series(LineSeries::new(finite(&c.epochs, ys), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    ch.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow!("{e}"))?;
    let mut ch = ChartBuilder::on(&right)
        .caption("pseudo Dice (foreground mean)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..last, 0f64..1f64)
        .map_err(|e| anyhow!("{e}"))?;
    ch.configure_mesh().x_desc("epoch").draw().map_err(|e| anyhow!("{e}"))?;
    for (name, ys, color) in [("pseudo Dice", &c.pseudo_dice, GREEN), ("EMA", &c.ema_dice, BLACK)] {
        ch.draw_series(LineSeries::new(finite(&c.epochs, ys), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    ch.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_png_and_svg() {
        let dir = std::env::temp_dir().join(format!("stu-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = TrainingCurves {
            epochs: vec![0.0, 1.0, 2.0],
            train_loss: vec![0.5, 0.1, -0.3],
            val_loss: vec![f64::NAN, 0.2, -0.2],
            pseudo_dice: vec![0.1, 0.5, 0.7],
            ema_dice: vec![0.1, 0.14, 0.2],
        };
        let p = dir.join("progress.png");
        draw(&c, &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
        let svg = std::fs::read_to_string(p.with_extension("svg")).unwrap();
        assert!(svg.contains("pseudo Dice"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
