//! What can run: one module per model, each registering itself with `inventory`.
//!
//! Adding a model is one file here plus its `mod` line; nothing else lists models. The harness
//! reaches models through `stu_engine::model::registry()`, never by importing them.
//!
//! Linking: `inventory` entries live in this crate's object files, so a binary must reference the
//! crate (the harness calls [`link`]) for the linker to keep them.

pub mod nnformer;
pub mod parts;
pub mod plainconv;
pub mod resenc;
pub mod stunet;
pub mod swinunetr;
pub mod unetr;

/// Called once by binaries and tests so the linker keeps this crate's registrations.
pub fn link() {}

/// Small valid size options for every registered model (3 classes, two downsamplings, a 32³
/// input): for tests and `stu check-ops`.
pub fn small_options() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("stunet", json!({"depth": [1, 1, 1], "dims": [4, 8, 8]})),
        ("nnunet-plainconv", json!({"base_width": 4, "max_width": 16})),
        ("nnunet-resenc", json!({"base_width": 4, "max_width": 16})),
        ("unetr", json!({"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4})),
        ("swinunetr", json!({"feature_size": 12})),
        ("nnformer", json!({"crop_size": [32, 32, 32], "embedding_dim": 12, "num_heads": [1, 2, 4, 8]})),
    ]
}

#[cfg(test)]
mod tests;
