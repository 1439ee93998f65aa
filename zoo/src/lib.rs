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

#[cfg(test)]
mod tests;
