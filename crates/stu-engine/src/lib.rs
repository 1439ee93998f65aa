//! The only crate of the harness that touches burn.
//!
//! It owns the model-plugin contract ([`model::ModelEntry`], [`model::SegNet`]), checkpoint
//! reading and writing ([`checkpoint`]), backend selection ([`backend`]) and the tensor
//! operations burn lacks ([`ops`]). Models themselves live in the `zoo` crate.
//!
//! **Invariants:** models never name a backend; pickle files are parsed, never executed.
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod dist;
pub mod graph;
pub mod ext;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod precision;
pub mod schedule;
#[cfg(feature = "tch")]
pub mod torch;
pub mod train;

pub use burn;
pub use burn::tensor::{Device, Tensor, TensorData};
