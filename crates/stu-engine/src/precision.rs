//! Compute precision: f32, or bf16/f16 compute over f32 master weights (what PyTorch's autocast
//! gives nnU-Net), for backends whose kernels run half precision (libtorch on CUDA; flex's own
//! kernels are f32 only).

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Tensor};

use crate::model::SegNet;

/// Precision of the network's arithmetic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Weights and activations cast to bfloat16 for the forward (and so the backward);
    /// parameters, optimiser state and the loss stay f32.
    Bf16,
    /// As `Bf16` with IEEE half; training scales the loss dynamically (`train::GradScaler`), as
    /// PyTorch's autocast + `GradScaler` (nnU-Net's default) does.
    F16,
}

impl Precision {
    /// Name as written on the command line and in specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// The compute dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }


    /// Whether `backend` runs this precision: half precision needs half kernels, which flex's
    /// own (f32) kernels and ndarray lack.
    pub fn check(self, backend: crate::backend::Backend) -> Result<(), String> {
        use crate::backend::Backend as B;
        match (self, backend) {
            (Self::F32, _) => Ok(()),
            (_, B::Flex | B::Ndarray) => Err(format!("precision `{self}` needs a backend with half-precision kernels (tch-cuda, tch); `{backend}` computes in f32")),
            _ => Ok(()),
        }
    }

    /// A network that computes in this precision: for f32 `None` (use the network as it is),
    /// else a copy whose parameters are casts of `net`'s. Under autodiff the casts are nodes
    /// of the graph, so gradients reach `net`'s f32 parameters.
    pub fn cast_net(self, net: &dyn SegNet) -> Option<Box<dyn SegNet>> {
        (self != Self::F32).then(|| net.cast(self.dtype()))
    }

    /// The network to run inference with in this precision: [`Self::cast_net`]'s copy, and for
    /// f32 too a copy (`SegNet::cast`) whose convolution weights are laid out as the backend's
    /// convolutions read them (channels-last on libtorch, `ops::cast_conv_weight`; the same
    /// tensors elsewhere), so that no forward converts them again.
    pub fn inference_net(self, net: &dyn SegNet) -> Box<dyn SegNet> {
        net.cast(self.dtype())
    }

    /// `x` in the compute dtype.
    pub fn input<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        if self == Self::F32 { x } else { x.cast(self.dtype()) }
    }

    /// Logits back to f32 (losses, accumulation and argmax run in f32).
    pub fn output<const D: usize>(self, y: Tensor<D>) -> Tensor<D> {
        if self == Self::F32 { y } else { y.cast(DType::F32) }
    }

    /// Deep-supervision forward in this precision; outputs in f32.
    pub fn forward_ds(self, net: &dyn SegNet, half: Option<&dyn SegNet>, x: Tensor<5>) -> Vec<Tensor<5>> {
        self.forward_ds_for_loss(net, half, x).into_iter().map(|y| self.output(y)).collect()
    }

    /// [`Self::forward_ds`] with the outputs left in the compute type, for the training loss
    /// ([`crate::loss::deep_supervision`]), which computes in f32 from them without an f32 copy
    /// of the logits where it can.
    pub fn forward_ds_for_loss(self, net: &dyn SegNet, half: Option<&dyn SegNet>, x: Tensor<5>) -> Vec<Tensor<5>> {
        match half {
            Some(h) => h.forward_ds(self.input(x)),
            None => net.forward_ds(x),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" | "fp16" => Ok(Self::F16),
            _ => Err(format!("unknown precision `{s}`; expected f32, bf16 or f16")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert!("f8".parse::<Precision>().unwrap_err().contains("bf16"));
        let err = Precision::Bf16.check(crate::backend::Backend::Flex).unwrap_err();
        assert!(err.contains("`flex` computes in f32"), "{err}");
        assert!(Precision::F32.check(crate::backend::Backend::Flex).is_ok());
        assert!(Precision::Bf16.check(crate::backend::Backend::TchCuda).is_ok());
    }
}
