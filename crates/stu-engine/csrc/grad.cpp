// Vector-Jacobian products through a libtorch autograd graph, with the output gradient given.
// tch 0.22 exposes only `run_backward`, which seeds every root with ones; asking for
// ∂(y·g)/∂x that way costs a multiply, a sum and a second multiply over y per op, and an extra
// tensor of y's size. Built by `build.rs` with the `tch` feature, against the same libtorch.
#include "error.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <set>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The number of chunks a row of n voxels is split into for chunks of about `chunk` voxels
// (the caller's choice, `torch.rs`): the largest divisor of n not above n / chunk (1 for short
// rows). ATen's batch-norm kernels give each plane one thread block, so a 128³ row of 2 M
// voxels would be read by one block while most of the GPU idles.
int64_t split_count(int64_t n, int64_t chunk) {
  int64_t k = n / chunk;
  while (k > 1 && n % k != 0) --k;
  return std::max<int64_t>(k, 1);
}

// Each row of `rows` ([P, R]) repeated k times in place: [P, R·k], the parameters per chunk.
at::Tensor per_chunk(const at::Tensor& rows, int64_t k) {
  if (k == 1) return rows;
  const auto p = rows.size(0), r = rows.size(1);
  return rows.unsqueeze(2).expand({p, r, k}).reshape({p, r * k});
}

// InstanceNorm3d(affine) of an NCDHW tensor with every (sample, channel) row split into
// chunks of about `chunk` voxels (`split_count`) for ATen's batch-norm kernels, which then run with one thread block
// per chunk instead of per row:
// - forward: per-chunk mean and variance (`batch_norm_update_stats`, f32 for half input on
//   CUDA), combined exactly into the row's (mean of the chunk variances plus the variance of
//   the chunk means, equal counts), then the affine normalisation as an evaluation-mode batch
//   norm over the chunks with each row's statistics and parameters repeated per chunk;
// - backward: per-chunk Σdy and Σdy·x̂ (`native_batch_norm_backward`'s weight and bias
//   gradients over the chunks), summed per row, then the input gradient
//   (dy − Σdy/N − x̂·Σ(dy·x̂)/N)·w·invstd per element (`batch_norm_backward_elemt` on CUDA; the
//   same formula in f32 ATen ops elsewhere, which has no kernel for it).
// Saves the input and three vectors per row, as batch norm does; the output is a fresh
// tensor (not a view), so the residual add and the activation may run in place on it.
struct SplitNorm : public torch::autograd::Function<SplitNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, int64_t chunk) {
    const auto xs = x.contiguous();
    const int64_t bs = xs.size(0), c = xs.size(1), r = bs * c, n = xs.numel() / r, k = split_count(n, chunk), m = n / k;
    const auto xc = xs.view({1, r * k, m});
    const auto st = at::batch_norm_update_stats(xc, c10::nullopt, c10::nullopt, 0.0);
    const auto mc = std::get<0>(st).to(at::kFloat).view({r, k});
    const auto vc = std::get<1>(st).to(at::kFloat).view({r, k});
    const auto between = at::var_mean(mc, at::IntArrayRef{1}, /*unbiased=*/false, /*keepdim=*/false);
    const auto mean = std::get<1>(between);
    const auto var = vc.mean(1).add_(std::get<0>(between));
    const auto wr = w.to(at::kFloat).repeat({bs}), br = b.to(at::kFloat).repeat({bs});
    const auto p = per_chunk(at::stack({mean, var, wr, br}), k);
    auto y = at::empty_like(xs);
    auto yc = y.view({1, r * k, m});
    auto f32 = xs.options().dtype(at::kFloat);
    auto save_mean = at::empty({0}, f32), save_invstd = at::empty({0}, f32);
    at::native_batch_norm_out(yc, save_mean, save_invstd, xc, p[2], p[3], p[0], p[1], /*training=*/false, 0.0, eps);
    ctx->save_for_backward({xs, wr, mean, var.add(eps).rsqrt_()});
    ctx->saved_data["k"] = k;
    ctx->saved_data["w_type"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["b_type"] = static_cast<int64_t>(b.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &wr = saved[1], &mean = saved[2], &invstd = saved[3];
    auto dy = grads[0].contiguous();
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    const int64_t bs = x.size(0), c = x.size(1), r = bs * c, n = x.numel() / r, k = ctx->saved_data["k"].toInt(), m = n / k;
    const auto xc = x.view({1, r * k, m}), dyc = dy.view({1, r * k, m});
    const auto p = per_chunk(at::stack({mean, invstd, wr}), k);
    // Weight gradient per chunk: Σdy·(x − mean)·invstd; bias gradient: Σdy.
    const auto red = at::native_batch_norm_backward(dyc, xc, p[2], c10::nullopt, c10::nullopt, p[0], p[1], /*train=*/true, 0.0, {false, true, true});
    const auto dw = std::get<1>(red).to(at::kFloat).view({r, k}).sum(1);
    const auto db = std::get<2>(red).to(at::kFloat).view({r, k}).sum(1);
    const auto sum_dy_xmu = dw / invstd;
    at::Tensor dx;
    if (x.is_cuda()) {
      const auto q = per_chunk(at::stack({db, sum_dy_xmu}), k);
      const auto count = at::full({1}, n, x.options().dtype(at::kInt));
      dx = at::batch_norm_backward_elemt(dyc, xc, p[0], p[1], p[2], q[0], q[1], count).view(x.sizes());
    } else {
      const auto col = [](const at::Tensor& t) { return t.view({1, -1, 1}); };
      const auto xr = x.view({1, r, n}).to(at::kFloat), dr = dy.view({1, r, n}).to(at::kFloat);
      const double inv_n = 1.0 / static_cast<double>(n);
      dx = ((dr - col(db * inv_n)) - (xr - col(mean)) * col(invstd * invstd * sum_dy_xmu * inv_n)) * col(invstd * wr);
      dx = dx.to(x.scalar_type()).view(x.sizes());
    }
    const auto w_type = static_cast<at::ScalarType>(ctx->saved_data["w_type"].toInt());
    const auto b_type = static_cast<at::ScalarType>(ctx->saved_data["b_type"].toInt());
    return {dx, dw.view({bs, c}).sum(0).to(w_type), db.view({bs, c}).sum(0).to(b_type), at::Tensor(), at::Tensor()};
  }
};

// InstanceNorm3d(affine) of a channels-last [N, C, D, H, W] tensor as ATen's batch norm of
// each one-sample slice (batch norm over one sample is instance norm; its channels-last kernels
// read the slice as it is), every sample's output written into its slice of one output tensor:
// the per-sample outputs are not concatenated after, a copy of the whole activation less per
// norm (B's training step on the H200, 2026-11-28: 88 concatenations, 1.4 ms, forward and
// backward; H's activations are 9× as large). The backward runs batch norm's per sample, its
// input gradients copied into their slices (what the concatenation's backward did), the weight
// and bias gradients summed over the samples. Saves the input and the per-sample statistics, as
// the per-sample batch norms did; the output is a fresh tensor (not a view), so the residual add
// and the activation may run in place on it.
struct SampleNorm : public torch::autograd::Function<SampleNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
    const int64_t n = x.size(0);
    auto y = at::empty_like(x);
    // The statistics in the accumulation type (f32 for half inputs, as batch norm keeps them).
    const auto acc = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    std::vector<at::Tensor> means, invstds;
    for (int64_t i = 0; i < n; ++i) {
      auto mean = at::empty({0}, acc);
      auto invstd = at::empty({0}, acc);
      auto yi = y.narrow(0, i, 1);
      at::native_batch_norm_out(yi, mean, invstd, x.narrow(0, i, 1), w, b, c10::nullopt, c10::nullopt, /*training=*/true, 0.0, eps);
      means.push_back(mean);
      invstds.push_back(invstd);
    }
    ctx->save_for_backward({x, w, at::stack(means), at::stack(invstds)});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["b_type"] = static_cast<int64_t>(b.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &mean = saved[2], &invstd = saved[3];
    auto dy = grads[0];
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    dy = dy.contiguous(x.suggest_memory_format());
    const double eps = ctx->saved_data["eps"].toDouble();
    auto dx = at::empty_like(x);
    at::Tensor dw, db;
    for (int64_t i = 0; i < x.size(0); ++i) {
      const auto r = at::native_batch_norm_backward(dy.narrow(0, i, 1), x.narrow(0, i, 1), w, c10::nullopt, c10::nullopt, mean[i], invstd[i],
                                                    /*train=*/true, eps, {true, true, true});
      dx.narrow(0, i, 1).copy_(std::get<0>(r));
      dw = i == 0 ? std::get<1>(r) : dw.add_(std::get<1>(r));
      db = i == 0 ? std::get<2>(r) : db.add_(std::get<2>(r));
    }
    const auto b_type = static_cast<at::ScalarType>(ctx->saved_data["b_type"].toInt());
    return {dx, dw.to(w.scalar_type()), db.to(b_type), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `outputs[i]` (n_inputs of them) receives a new `at::Tensor*`: the gradient of
// sum(y · grad) with respect to `inputs[i]`. Returns null, or a malloc'd error message.
char* stu_vjp(at::Tensor* y, at::Tensor* grad, at::Tensor** inputs, int n_inputs, at::Tensor** outputs) {
  try {
    std::vector<at::Tensor> xs;
    xs.reserve(n_inputs);
    for (int i = 0; i < n_inputs; ++i) xs.push_back(*inputs[i]);
    auto gs = torch::autograd::grad({*y}, xs, {*grad}, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/false);
    for (int i = 0; i < n_inputs; ++i) outputs[i] = new at::Tensor(gs[i]);
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

// libtorch's (Kineto) profiler on the calling thread, as `torch.profiler.profile` in Python:
// every ATen op from here on (and, with `cuda`, every CUDA kernel, memcpy and runtime call) until
// `stu_profile_stop` writes a Chrome trace to `path`. Both return null or a malloc'd message.
char* stu_profile_start(int cuda) {
  try {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> acts{ActivityType::CPU};
    if (cuda) acts.insert(ActivityType::CUDA);
    torch::profiler::impl::ProfilerConfig cfg(torch::profiler::impl::ProfilerState::KINETO, /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

char* stu_profile_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) return strdup("the profiler was not running");
    result->save(path);
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

// The joint L2 norm of `n` tensors, as `clip_grad_norm_` computes it with `foreach`: one
// `_foreach_norm` (a few kernels for all of them) and the norm of those norms. `*out` receives
// a new 1-element tensor on their device.
char* stu_foreach_norm(at::Tensor** ts, int n, at::Tensor** out) {
  try {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> v;
    v.reserve(n);
    for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
    auto norms = at::_foreach_norm(v, 2);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2).reshape({1}));
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

// One step of `torch.optim.SGD(lr, momentum=mu, dampening=0, nesterov=True, weight_decay=wd)`
// with `foreach=True` over `n` parameters, after multiplying every gradient by `coef` (a
// 1-element tensor on their device, e.g. the clip coefficient; may be null) and by `mul`:
//   d = g·coef·mul + wd·p;  b = μ·b + d (b = d on the first step);  p' = p − lr·(d + μ·b).
// `bufs[i]` is null where parameter i has no momentum buffer yet. Gradients and parameters
// are read, never written: `out_params[i]` receives a new tensor. Existing buffers are updated
// in place and `out_bufs[i]` receives a handle to each buffer (new ones are copies of d).
char* stu_foreach_sgd(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs, int n, at::Tensor* coef, double mul,
                      double lr, double mu, double wd, at::Tensor** out_params, at::Tensor** out_bufs) {
  try {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> p, g;
    p.reserve(n);
    g.reserve(n);
    for (int i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
    }
    auto d = coef ? at::_foreach_mul(g, coef->reshape({})) : at::_foreach_mul(g, at::Scalar(mul));
    if (coef && mul != 1.0) at::_foreach_mul_(d, at::Scalar(mul));
    if (wd != 0.0) at::_foreach_add_(d, p, wd);
    std::vector<at::Tensor> old_b, old_d, all_b;
    all_b.reserve(n);
    for (int i = 0; i < n; ++i) {
      if (bufs[i]) {
        old_b.push_back(*bufs[i]);
        old_d.push_back(d[i]);
        all_b.push_back(*bufs[i]);
      } else {
        all_b.push_back(d[i].clone());
      }
    }
    if (!old_b.empty()) {
      at::_foreach_mul_(old_b, mu);
      at::_foreach_add_(old_b, old_d);
    }
    at::_foreach_add_(d, all_b, mu);
    auto np = at::_foreach_add(p, d, -lr);
    for (int i = 0; i < n; ++i) {
      out_params[i] = new at::Tensor(np[i]);
      out_bufs[i] = new at::Tensor(all_b[i]);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

// `*out` receives a new tensor: `SampleNorm` of the channels-last `x` with affine parameters
// `w`, `b` (`[C]`), recorded for autograd when grad mode is on and an input requires a gradient.
char* stu_sample_norm(at::Tensor* x, at::Tensor* w, at::Tensor* b, double eps, at::Tensor** out) {
  try {
    *out = new at::Tensor(SampleNorm::apply(*x, *w, *b, eps));
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

// `*out` receives a new tensor: `SplitNorm` of the NCDHW `x` with affine parameters `w`, `b`
// (`[C]`) and chunks of about `chunk` voxels, recorded for autograd when grad mode is on and
// an input requires a gradient.
char* stu_split_norm(at::Tensor* x, at::Tensor* w, at::Tensor* b, double eps, int64_t chunk, at::Tensor** out) {
  try {
    *out = new at::Tensor(SplitNorm::apply(*x, *w, *b, eps, chunk));
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

}
