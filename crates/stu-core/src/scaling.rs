//! Scaling rules: how a model family grows in depth and width.
//!
//! STU-Net scales "compound": blocks per stage and base width grow together, and the stage widths
//! are `base × [1, 2, 4, 8, 16, 16]` (the bottleneck keeps the stage-4 width). Presets register
//! an [`ScalingEntry`] beside their model; a spec can also give the numbers inline.

use serde::{Deserialize, Serialize};

use crate::registry::RegistryEntry;

/// Width multipliers of STU-Net's six stages.
pub const STUNET_WIDTH_MULTIPLIERS: [usize; 6] = [1, 2, 4, 8, 16, 16];

/// Residual blocks per encoder stage of nnU-Net's ResidualEncoderUNet in its ResEnc presets
/// (the planners' `UNet_blocks_per_stage_encoder`; deeper stages repeat the last).
pub const RESENC_BLOCKS: [usize; 13] = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6];

/// [`RESENC_BLOCKS`] of stage `s`.
pub fn resenc_blocks(s: usize) -> usize {
    RESENC_BLOCKS[s.min(RESENC_BLOCKS.len() - 1)]
}

/// Blocks per stage and base width; widths follow the family's multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingRule {
    /// Residual blocks in every encoder stage (the decoder mirrors it).
    pub blocks: usize,
    /// Width of stage 0.
    pub base_width: usize,
}

impl ScalingRule {
    /// Blocks for each of the six stages.
    pub fn depth(&self) -> [usize; 6] {
        [self.blocks; 6]
    }

    /// Channel widths of the six stages.
    pub fn widths(&self) -> [usize; 6] {
        STUNET_WIDTH_MULTIPLIERS.map(|m| m * self.base_width)
    }
}

/// A named preset of a model family, registered with `inventory::submit!`.
pub struct ScalingEntry {
    /// Registry id, `<family>-<preset>` (e.g. `stunet-b`).
    pub id: &'static str,
    /// The model family it scales (a model registry name).
    pub family: &'static str,
    /// Short preset name as the paper writes it ("B").
    pub label: &'static str,
    /// One-line description.
    pub summary: &'static str,
    /// The numbers.
    pub rule: ScalingRule,
    /// Where it was registered.
    pub module_path: &'static str,
}

inventory::collect!(ScalingEntry);

impl RegistryEntry for ScalingEntry {
    const KIND: &'static str = "scaling preset";
    fn name(&self) -> &'static str {
        self.id
    }
    fn module_path(&self) -> &'static str {
        self.module_path
    }
}

/// Every registered scaling preset, validated.
pub fn registry() -> &'static crate::Registry<ScalingEntry> {
    static REG: std::sync::OnceLock<crate::Registry<ScalingEntry>> = std::sync::OnceLock::new();
    REG.get_or_init(|| {
        crate::Registry::from_registrations(inventory::iter::<ScalingEntry>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_the_multipliers() {
        let b = ScalingRule { blocks: 1, base_width: 32 };
        assert_eq!(b.widths(), [32, 64, 128, 256, 512, 512]);
        assert_eq!(b.depth(), [1; 6]);
    }
}
