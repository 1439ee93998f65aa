//! End-to-end tests: one binary (each extra test binary re-links the whole harness).

mod bench_cli;
mod cascade;
mod checkpoints;
mod dataset;
mod nnformer;
mod nnunet_cli;
mod parity;
mod plainconv;
mod predict;
mod recipe;
mod resenc;
mod preprocess;
mod specs;
mod swinunetr;
mod train;
mod two_d;
mod unetr;
mod zoo_cli;
