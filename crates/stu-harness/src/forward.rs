//! `stu forward`, `stu export` and `stu inspect`: run or save a checkpoint's network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use stu_core::strides::Stride;
use stu_engine::backend::Backend;
use stu_engine::checkpoint::{NamedTensor, StateDict, write_safetensors};
use stu_engine::model::{LoadOptions, SegNet, load_checkpoint};
use stu_engine::{Device, Tensor, TensorData};

/// Where a checkpoint's strides come from.
#[derive(Debug, Clone, Default)]
pub enum StrideSource {
    /// The model's default (five isotropic halvings for STU-Net).
    #[default]
    Default,
    /// Given exactly, one per downsampling.
    Explicit(Vec<Stride>),
    /// From an nnU-Net plans file and configuration; cut or padded to the model's stages.
    Plans(PathBuf, String),
}

/// What to load.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Checkpoint file (`.model`, `.pth`, `.safetensors`).
    pub checkpoint: PathBuf,
    /// Model registry name; found from the keys when `None`.
    pub model: Option<String>,
    /// Strides.
    pub strides: StrideSource,
    /// Backend.
    pub backend: Backend,
}

/// Loads the network a checkpoint holds.
pub fn load(src: &ModelSource) -> Result<(Box<dyn SegNet>, Device)> {
    zoo::link();
    let device = src.backend.device()?;
    let strides = match &src.strides {
        StrideSource::Default => None,
        StrideSource::Explicit(s) => Some(s.clone()),
        // The model fits plan strides to its stage count by its own rule.
        StrideSource::Plans(path, conf) => Some(crate::plans::strides_from_plans(path, conf)?),
    };
    let from_plan = matches!(src.strides, StrideSource::Plans(..));
    let net = load_checkpoint(&src.checkpoint, src.model.as_deref(), &LoadOptions { strides, from_plan }, &device)?;
    Ok((net, device))
}

/// Reads the 5-D f32 tensor `key` from a safetensors file.
pub fn read_input(path: &Path, key: &str) -> Result<([usize; 5], Vec<f32>)> {
    let dict = StateDict::open(path)?;
    let shape = dict.shape(key)?.to_vec();
    let shape: [usize; 5] = shape
        .clone()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: `{key}` has shape {shape:?}; expected 5-D B×C×D×H×W", path.display()))?;
    let data = dict.read(key, &shape)?;
    Ok((shape, data))
}

/// Options of `stu forward`.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// The network.
    pub model: ModelSource,
    /// safetensors file with the input tensor.
    pub input: PathBuf,
    /// Name of the input tensor in it.
    pub input_key: String,
    /// safetensors file to write `output.0` … `output.N`.
    pub output: PathBuf,
    /// Arithmetic of the forward (outputs are written as f32).
    pub precision: stu_engine::precision::Precision,
}

/// Runs the network in deep-supervision mode and writes every output, full resolution first.
pub fn forward(opts: &ForwardOptions) -> Result<Vec<NamedTensor>> {
    opts.precision.check(opts.model.backend).map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
    let (shape, data) = read_input(&opts.input, &opts.input_key)?;
    let (net, device) = load(&opts.model)?;
    check_input(net.as_ref(), &opts.input, shape)?;
    let x = Tensor::<5>::from_data(TensorData::new(data, shape), &device);
    let half = opts.precision.cast_net(&*net);
    let outs: Vec<NamedTensor> = opts
        .precision
        .forward_ds(&*net, half.as_deref(), x)
        .into_iter()
        .enumerate()
        .map(|(i, t)| NamedTensor { name: format!("output.{i}"), shape: t.dims().to_vec(), data: stu_engine::ops::to_vec(t) })
        .collect();
    let meta = HashMap::from([
        ("model".to_string(), net.describe().to_string()),
        ("checkpoint".to_string(), opts.model.checkpoint.display().to_string()),
    ]);
    write_safetensors(&opts.output, &outs, Some(meta))
        .with_context(|| format!("{}: cannot write output", opts.output.display()))?;
    Ok(outs)
}

/// Rejects inputs the network cannot take, naming the file.
pub fn check_input(net: &dyn SegNet, path: &Path, shape: [usize; 5]) -> Result<()> {
    ensure!(
        shape[1] == net.in_channels(),
        "{}: input has {} channels, the model expects {}",
        path.display(),
        shape[1],
        net.in_channels()
    );
    ensure!(shape[0] >= 1, "{}: input batch is empty", path.display());
    stu_engine::model::check_patch(net, [shape[2], shape[3], shape[4]], "spatial shape").map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes a loaded network's weights to safetensors under unchanged state-dict keys.
pub fn export(src: &ModelSource, output: &Path) -> Result<usize> {
    let (net, _) = load(src)?;
    Ok(write_weights(&*net, output)?.len())
}

/// `net`'s state dict written to `output` as safetensors, its architecture in the metadata
/// (`model`); returns the tensors written.
fn write_weights(net: &dyn SegNet, output: &Path) -> Result<Vec<NamedTensor>> {
    let tensors = net.state_dict();
    let meta = HashMap::from([("model".to_string(), net.describe().to_string())]);
    write_safetensors(output, &tensors, Some(meta)).with_context(|| format!("{}: cannot write", output.display()))?;
    Ok(tensors)
}

/// A freshly initialised model (`seeded_init` with `seed`, as `stu train` starts from) written to
/// `output` as safetensors with the model's own state-dict keys: for smoke tests, and for
/// timing prediction without a trained model. Returns the parameter count.
pub fn init(model: &str, spec: &stu_engine::model::NetSpec, seed: u64, output: &Path) -> Result<usize> {
    zoo::link();
    let entry = stu_engine::model::registry().get(model)?;
    let device = Backend::Flex.device()?;
    let net = (entry.build)(spec, &device).map_err(|e| anyhow::anyhow!("model `{model}`: {e}"))?;
    let net = stu_engine::train::seeded_init(net, seed);
    Ok(write_weights(&*net, output)?.iter().map(|t| t.data.len()).sum())
}

/// What `stu inspect` prints: container, prefix, inferred architecture.
pub fn inspect(src: &ModelSource) -> Result<serde_json::Value> {
    let dict = StateDict::open(&src.checkpoint)?;
    let (format, tensors) = (dict.format(), dict.len());
    let (net, _) = load(src)?;
    let mut v = net.describe();
    v["checkpoint"] = serde_json::json!({
        "path": src.checkpoint,
        "format": format,
        "tensors_in_file": tensors,
    });
    Ok(v)
}
