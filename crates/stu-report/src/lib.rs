//! Figures and tables from training logs and run records.
//!
//! Text is drawn with DejaVu Sans shipped in `assets/` (Bitstream Vera licence, see
//! `assets/DejaVu-LICENSE`) through plotters' `ab_glyph` backend, so no system font is needed.
#![warn(missing_docs)]

pub mod curves;
pub mod figures;
pub mod overlay;
#[cfg(feature = "tables")]
pub mod tables;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font as plotters' `sans-serif` (idempotent).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}
