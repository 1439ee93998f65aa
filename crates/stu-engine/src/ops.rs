//! Building blocks that burn 0.22 lacks or implements slowly for 5-D volumes.

use burn::tensor::Tensor;
use burn::tensor::activation;

/// LeakyReLU with PyTorch's default slope, which STU-Net uses everywhere.
pub const LEAKY_SLOPE: f64 = 0.01;

/// Instance-norm epsilon (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;

/// `leaky_relu(x, 0.01)`.
pub fn leaky_relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::leaky_relu(x, LEAKY_SLOPE)
}

/// Instance normalisation of `[B, C, D, H, W]` with a per-channel affine, as
/// `torch.nn.InstanceNorm3d(C, affine=True)`: per-sample, per-channel statistics over the spatial
/// axes, biased variance, eps 1e-5.
///
/// The affine and the normalisation are folded into one scale and one shift per (sample,
/// channel), so the full-size tensor is touched by one multiply-add after the statistics.
pub fn instance_norm(x: Tensor<5>, weight: Tensor<1>, bias: Tensor<1>) -> Tensor<5> {
    let [b, c, d, h, w] = x.dims();
    let flat = x.reshape([b, c, d * h * w]);
    let (var, mean) = flat.clone().var_mean_bias(2);
    let scale = weight.reshape([1, c, 1]) / (var + NORM_EPS).sqrt();
    let shift = bias.reshape([1, c, 1]) - mean * scale.clone();
    (flat * scale + shift).reshape([b, c, d, h, w])
}

/// Nearest-neighbour upsampling of `[B, C, D, H, W]` by integer factors per axis: voxel
/// replication, exactly `F.interpolate(x, scale_factor=s, mode="nearest")` for integer `s`.
/// Differentiable (reshape and expand only); intermediates stay at rank ≤ 5 so every backend
/// runs it.
pub fn upsample_nearest(x: Tensor<5>, scale: [usize; 3]) -> Tensor<5> {
    let [b, c, d, h, w] = x.dims();
    let mut x = x;
    if scale[0] > 1 {
        let s = scale[0];
        x = x
            .reshape([b * c, d, 1, h * w])
            .expand([b * c, d, s, h * w])
            .reshape([b, c, d * s, h, w]);
    }
    let d = d * scale[0];
    if scale[1] > 1 {
        let s = scale[1];
        x = x
            .reshape([b * c * d, h, 1, w])
            .expand([b * c * d, h, s, w])
            .reshape([b, c, d, h * s, w]);
    }
    let h = h * scale[1];
    if scale[2] > 1 {
        let s = scale[2];
        x = x
            .reshape([b * c * d * h, w, 1])
            .expand([b * c * d * h, w, s])
            .reshape([b, c, d, h, w * s]);
    }
    x
}

/// Host copy of a float tensor as f32, row-major.
pub fn to_vec(x: Tensor<5>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("a float tensor converts to f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn dev() -> Device {
        crate::backend::Backend::default_compiled()
            .expect("a backend")
            .device()
            .expect("compiled")
    }

    #[test]
    fn upsample_replicates_voxels() {
        let x = Tensor::<5>::from_data(
            TensorData::new((0..8).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 2, 2, 2]),
            &dev(),
        );
        let y = upsample_nearest(x, [1, 2, 3]);
        assert_eq!(y.dims(), [1, 1, 2, 4, 6]);
        let v = to_vec(y);
        // y[0,0,i,j,k] = x[0,0,i,j/2,k/3]
        for i in 0..2 {
            for j in 0..4 {
                for k in 0..6 {
                    let want = (i * 4 + (j / 2) * 2 + k / 3) as f32;
                    assert_eq!(v[i * 24 + j * 6 + k], want, "at {i},{j},{k}");
                }
            }
        }
    }

    #[test]
    fn instance_norm_matches_the_definition() {
        let n = 2 * 3 * 4 * 4 * 4;
        let data: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32).sin() * 3.0 + 1.0).collect();
        let x = Tensor::<5>::from_data(TensorData::new(data.clone(), [2, 3, 4, 4, 4]), &dev());
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -0.5, 2.0], [3]), &dev());
        let b = Tensor::<1>::from_data(TensorData::new(vec![0.1f32, 0.2, -0.3], [3]), &dev());
        let y = to_vec(instance_norm(x, w, b));
        let (ws, bs) = ([1.5f64, -0.5, 2.0], [0.1f64, 0.2, -0.3]);
        for s in 0..2 {
            for c in 0..3 {
                let base = (s * 3 + c) * 64;
                let v: Vec<f64> = data[base..base + 64].iter().map(|&v| v as f64).collect();
                let mean = v.iter().sum::<f64>() / 64.0;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 64.0;
                for i in 0..64 {
                    let want = (v[i] - mean) / (var + 1e-5).sqrt() * ws[c] + bs[c];
                    assert!((y[base + i] as f64 - want).abs() < 1e-4, "{} vs {want}", y[base + i]);
                }
            }
        }
    }
}
