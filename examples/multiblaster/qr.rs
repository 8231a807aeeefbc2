//! The join link as a QR code, for the terminal welcome and the in-game HUD.
//!
//! A thin wrapper over the [`qrcode`] crate (built without its image and SVG renderers): the
//! terminal text comes from its Unicode renderer, and the window draws the module matrix itself
//! (see `hud.rs`), so no image crate is pulled in for a few hundred squares.

use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, EcLevel, QrCode};

/// A QR code of a join link.
pub struct Qr(QrCode);

/// Encodes `data` at error correction level L (a link on a screen is not damaged, and the lowest
/// level keeps the code small enough to scan from a terminal); `None` if it does not fit.
pub fn encode(data: &[u8]) -> Option<Qr> {
    QrCode::with_error_correction_level(data, EcLevel::L).ok().map(Qr)
}

impl Qr {
    /// The code as text, two modules per character cell, with the standard quiet zone.
    ///
    /// Dark modules are spaces and light ones are blocks, because terminals are usually light
    /// text on a dark background: what the camera sees is then dark modules on a light field,
    /// as the standard wants.
    pub fn to_terminal(&self) -> String {
        self.0.render::<Dense1x2>().dark_color(Dense1x2::Light).light_color(Dense1x2::Dark).quiet_zone(true).build()
    }

    /// The number of modules on a side (without a quiet zone).
    pub fn width(&self) -> usize {
        self.0.width()
    }

    /// The modules row by row, top left first; `true` is dark.
    pub fn modules(&self) -> Vec<bool> {
        self.0.to_colors().into_iter().map(|c| c == Color::Dark).collect()
    }
}
