//! Tensor-free vocabulary shared by every crate of the harness.
//!
//! This crate knows nothing about burn, polars or file formats. It holds the generic plugin
//! [`registry::Registry`], the [`scaling::ScalingRule`] that turns a preset name into blocks per
//! stage and widths, and the small strided-geometry helpers that models and counters share.
//!
//! **Invariant:** no dependency on burn or polars; it builds in seconds.
#![warn(missing_docs)]

pub mod fs;
pub mod registry;
pub mod rng;
pub mod scaling;
pub mod strides;
mod stunet_classes;
pub mod taxonomy;

pub use registry::{Registry, RegistryEntry, RegistryError};
pub use scaling::{ScalingEntry, ScalingRule};
