//! Volumes on disk → CPU arrays: NIfTI and MetaImage I/O, nnU-Net raw datasets, integrity checks.
//!
//! **Invariant:** no burn, no tensors: everything here is plain `Vec`s and file formats, so it
//! builds fast and is tested without a compute backend.
#![warn(missing_docs)]

pub mod augment;
pub mod cascade;
pub mod check;
pub mod convert;
pub mod dataset;
pub mod fingerprint;
pub mod loader;
mod metaimage;
pub mod metrics;
pub mod morphology;
mod nrrd;
pub mod nifti_io;
pub mod phantom;
pub mod plan;
pub mod plugins;
pub mod preprocess;
pub mod resample;
pub mod sampler;
pub mod splits;
pub mod surface;
pub mod surfels;
pub mod synthetic_ct;
pub mod totalseg;
