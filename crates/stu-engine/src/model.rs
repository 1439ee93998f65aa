//! The model-plugin contract: what the harness can do with any segmentation network.
//!
//! A model registers a [`ModelEntry`] with `inventory::submit!` next to its code in `zoo/`. The
//! entry erases the model's concrete type behind [`SegNet`] at the job boundary (load, forward,
//! export); inside, everything is the model's own typed burn module.

use burn::tensor::{Device, Tensor};
use stu_core::strides::Stride;
use stu_core::{Registry, RegistryEntry};

use crate::checkpoint::{CheckpointError, NamedTensor, StateDict};

/// What the harness needs from a 3-D segmentation network.
pub trait SegNet: Send {
    /// Registry name of the model family.
    fn family(&self) -> &'static str;
    /// Input channels it was built for.
    fn in_channels(&self) -> usize;
    /// Output classes, background included.
    fn num_classes(&self) -> usize;
    /// Per-axis number each spatial input extent must be divisible by.
    fn input_divisor(&self) -> Stride;
    /// The one input extent a network built for a fixed input takes (UNETR's position
    /// embeddings, nnFormer's crop); `None` for any multiple of [`SegNet::input_divisor`].
    fn fixed_input(&self) -> Option<Stride> {
        None
    }
    /// Deep-supervision forward: logits at every supervised resolution, full resolution first.
    ///
    /// # Shapes
    /// `x`: `[B, in_channels, D, H, W]`; output `i`: `[B, num_classes, D/s_i, H/s_i, W/s_i]`.
    fn forward_ds(&self, x: Tensor<5>) -> Vec<Tensor<5>>;
    /// Inference forward: full-resolution logits only, `[B, num_classes, D, H, W]`.
    fn forward(&self, x: Tensor<5>) -> Tensor<5>;
    /// Weights under the reference implementation's state-dict keys, in its order.
    fn state_dict(&self) -> Vec<NamedTensor>;
    /// Number of parameters.
    fn num_params(&self) -> usize;
    /// The architecture as JSON (for `stu inspect` and run records).
    fn describe(&self) -> serde_json::Value;

    // Training hooks: burn's `Module` methods are generic, so the erased model forwards them.
    // A model implements all four with [`crate::segnet_training_hooks!`].

    /// Gradients of `loss` for this model's parameters.
    fn gradients(&self, loss: Tensor<1>) -> burn::optim::GradientsParams;
    /// Every float parameter: burn module path, id and shape, in visit order.
    fn params(&self) -> Vec<crate::train::ParamInfo>;
    /// Replaces each parameter `p` by `f(path, p, grad)` (flattened, without autodiff; the
    /// gradient removed from `grads`, `None` when it has none); requires-grad is kept.
    fn update(self: Box<Self>, grads: &mut burn::optim::GradientsParams, f: &mut crate::train::UpdateFn<'_>) -> Box<dyn SegNet>;
    /// A copy without autodiff for validation and inference.
    fn valid(&self) -> Box<dyn SegNet>;
    /// A copy whose float parameters are `dtype` casts of these (differentiable: under
    /// autodiff the gradients flow back to this network's parameters).
    fn cast(&self, dtype: burn::tensor::DType) -> Box<dyn SegNet>;
    /// Whether, under half precision, the rank-1 parameters may stay f32 (not cast each step):
    /// true for a model whose rank-1 parameters are only convolution biases and instance-norm
    /// affine parameters, which the libtorch operators take in f32 (see
    /// [`crate::train::cast_params`]).
    fn vectors_stay_f32(&self) -> bool {
        false
    }
    /// How each parameter of a freshly built network is drawn ([`crate::train::seeded_init`]),
    /// as its builder declared it; `None` (or empty) for a network read from a checkpoint.
    fn init_rules(&self) -> Option<&crate::train::InitRules> {
        None
    }
}

/// Implements [`SegNet`]'s training hooks for a type that is a burn `Module`; expand inside
/// `impl SegNet for T { … }`.
#[macro_export]
macro_rules! segnet_training_hooks {
    () => {
        fn gradients(&self, loss: $crate::Tensor<1>) -> $crate::burn::optim::GradientsParams {
            $crate::burn::optim::GradientsParams::from_grads(loss.backward(), self)
        }
        fn params(&self) -> Vec<$crate::train::ParamInfo> {
            $crate::train::param_infos(self)
        }
        fn update(
            self: Box<Self>,
            grads: &mut $crate::burn::optim::GradientsParams,
            f: &mut $crate::train::UpdateFn<'_>,
        ) -> Box<dyn $crate::model::SegNet> {
            Box::new($crate::train::map_params(*self, grads, f))
        }
        fn valid(&self) -> Box<dyn $crate::model::SegNet> {
            Box::new($crate::burn::module::Module::valid(self))
        }
        fn cast(&self, dtype: $crate::burn::tensor::DType) -> Box<dyn $crate::model::SegNet> {
            Box::new($crate::train::cast_params(self.clone(), dtype, $crate::model::SegNet::vectors_stay_f32(self)))
        }
    };
}

/// What a fresh network is built from: the task (channels, classes, strides from the plan) and
/// the model's own size options (for STU-Net `{"preset": "stunet-b"}`, `{"blocks": 1,
/// "base_width": 8}` or explicit `{"depth": [...], "dims": [...]}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes, background included.
    pub num_classes: usize,
    /// Downsampling strides from the plan (without stage 0's `[1,1,1]`).
    pub strides: Vec<Stride>,
    /// Model-specific size options.
    pub options: serde_json::Value,
}

/// Options a checkpoint does not carry.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Downsampling strides (from a flag or a plan); the model's default when `None`.
    pub strides: Option<Vec<Stride>>,
    /// The strides come from a plan: fit them to the model's stage count by the model's rule
    /// (STU-Net: keep the first stages − 1, pad with `[1,1,1]`) instead of requiring an exact
    /// count.
    pub from_plan: bool,
}

/// One size preset of a model, with its exact counts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresetSummary {
    /// Registry id of the preset (`stunet-b`).
    pub name: String,
    /// Model family.
    pub model: &'static str,
    /// Preset label as the paper writes it.
    pub preset: &'static str,
    /// Blocks per stage.
    pub blocks: Vec<usize>,
    /// Widths per stage.
    pub widths: Vec<usize>,
    /// Parameters with 1 input channel and 105 classes.
    pub params: u64,
    /// Tensors in the state dict.
    pub state_dict_tensors: usize,
    /// Multiply-accumulates at 1×1×128³ (1 channel, 105 classes), the model's reference counting
    /// rule (for STU-Net: isotropic strides, bias included, as the README's "FLOPs").
    pub macs_128: u64,
    /// Further counts under other rules, named.
    pub macs_128_variants: std::collections::BTreeMap<&'static str, u64>,
}

/// [`ModelEntry::load`]: a model from checkpoint tensors.
pub type LoadFn = fn(&StateDict, &LoadOptions, &Device) -> Result<Box<dyn SegNet>, CheckpointError>;
/// [`ModelEntry::build`]: a freshly initialised model.
pub type BuildFn = fn(&NetSpec, &Device) -> Result<Box<dyn SegNet>, String>;

/// A registered model.
pub struct ModelEntry {
    /// Registry id.
    pub name: &'static str,
    /// One line for `stu zoo`.
    pub summary: &'static str,
    /// Where it was registered.
    pub module_path: &'static str,
    /// Revision of what training makes of this model (its initialisation, its operators'
    /// gradients), bumped by a fix that changes it: part of the ids of study points, so a point
    /// trained before the fix runs again; 0 adds nothing to them.
    pub revision: u32,
    /// A key every checkpoint of this model has, used to find the weights inside a container.
    pub anchor_key: &'static str,
    /// Size presets with their counts.
    pub presets: fn() -> Vec<PresetSummary>,
    /// Builds the model from checkpoint tensors, inferring the architecture from their shapes.
    pub load: LoadFn,
    /// Builds a freshly initialised model; the error names the offending option.
    pub build: BuildFn,
    /// Resolves the architecture `build` would make without allocating it (spec validation,
    /// before any data exist): the error names the offending option. `in_channels`,
    /// `num_classes` and `strides` may be placeholders, so only what the options decide alone
    /// is checked (unknown keys, types, lists of unequal length, values out of range). Returns
    /// what the options alone say of the network's inputs.
    pub check: fn(&NetSpec) -> Result<InputRule, String>,
}

/// What a network's size options alone say of the inputs it takes, before a plan gives its
/// strides (spec validation holds `train.patch_size` to it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputRule {
    /// Its one input size ([`SegNet::fixed_input`]), if it has one.
    pub fixed: Option<Stride>,
    /// A divisor of every input extent whatever the strides ([`SegNet::input_divisor`] where
    /// the options fix it: SwinUNETR's 32); `None` where the strides decide.
    pub divisor: Option<Stride>,
}

impl InputRule {
    /// A network built for `fixed` inputs only.
    pub fn fixed(fixed: Stride) -> Self {
        Self { fixed: Some(fixed), divisor: None }
    }

    /// A network whose input extents must be multiples of `divisor`.
    pub fn divisor(divisor: Stride) -> Self {
        Self { fixed: None, divisor: Some(divisor) }
    }
}

/// Whether `net` takes inputs of spatial extent `patch`: a multiple of its input divisor, and
/// its one input size if it has one. The error names the extent as `what` (a training or
/// prediction `patch`, an `input`), says which rule it breaks and what would fit.
pub fn check_patch(net: &dyn SegNet, patch: [usize; 3], what: &str) -> Result<(), String> {
    if let Some(f) = net.fixed_input().filter(|&f| f != patch) {
        return Err(format!("{what} {patch:?}: `{}` was built for {f:?} inputs only (its size options); use that size, or build it for this one", net.family()));
    }
    let div = net.input_divisor();
    if (0..3).any(|a| patch[a] == 0 || !patch[a].is_multiple_of(div[a])) {
        return Err(format!("{what} {patch:?} is not divisible by the network's strides product {div:?}"));
    }
    Ok(())
}

inventory::collect!(ModelEntry);

impl RegistryEntry for ModelEntry {
    const KIND: &'static str = "model";
    fn name(&self) -> &'static str {
        self.name
    }
    fn module_path(&self) -> &'static str {
        self.module_path
    }
}

/// Every registered model, validated once.
pub fn registry() -> &'static Registry<ModelEntry> {
    static REG: std::sync::OnceLock<Registry<ModelEntry>> = std::sync::OnceLock::new();
    REG.get_or_init(|| {
        Registry::from_registrations(inventory::iter::<ModelEntry>())
    })
}

/// Opens a checkpoint and builds whichever registered model it holds (or `model`, if given).
/// When several models' anchor keys are in the file (nnU-Net's ResidualEncoderUNet has every
/// key PlainConvUNet's anchor names, and a longer one of its own), the longest anchor wins.
pub fn load_checkpoint(
    path: &std::path::Path,
    model: Option<&str>,
    options: &LoadOptions,
    device: &Device,
) -> Result<Box<dyn SegNet>, LoadError> {
    let dict = StateDict::open(path)?;
    let entry = match model {
        Some(name) => registry().get(name)?,
        None => registry()
            .iter()
            .filter(|e| dict.keys().any(|k| k.ends_with(e.anchor_key)))
            .max_by_key(|e| e.anchor_key.len())
            .ok_or_else(|| LoadError::UnknownModel {
                path: path.to_path_buf(),
                models: registry().names().collect::<Vec<_>>().join(", "),
            })?,
    };
    let dict = dict.select_model(entry.anchor_key)?;
    // A 2-D network (nnU-Net's `2d`: `Conv2d` weights) computes slice by slice; a plan that
    // downsamples across slices is a 3-D one, which it cannot have been trained for.
    if let Some(s) = options.strides.as_ref().filter(|s| dict.is_2d() && s.iter().any(|s| s[0] != 1)) {
        return Err(CheckpointError::Architecture {
            path: path.to_path_buf(),
            reason: format!("a 2-D network (4-D convolution weights) with a 3-D plan's strides {s:?}; predict it with its `2d` configuration"),
        }
        .into());
    }
    Ok((entry.load)(&dict, options, device)?)
}

/// Errors of [`load_checkpoint`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is unreadable or does not fit the model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `--model` names nothing registered.
    #[error(transparent)]
    Registry(#[from] stu_core::RegistryError),
    /// No registered model recognises the keys.
    #[error("{path}: no registered model recognises its keys (models: {models})")]
    UnknownModel {
        /// The file.
        path: std::path::PathBuf,
        /// Registered models.
        models: String,
    },
}
