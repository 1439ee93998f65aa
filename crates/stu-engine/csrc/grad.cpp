// Vector-Jacobian products through a libtorch autograd graph, with the output gradient given.
// tch 0.22 exposes only `run_backward`, which seeds every root with ones; asking for
// ∂(y·g)/∂x that way costs a multiply, a sum and a second multiply over y per op, and an extra
// tensor of y's size. Built by `build.rs` with the `tch` feature, against the same libtorch.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <exception>
#include <set>
#include <vector>

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
    return strdup(e.what());
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
    return strdup(e.what());
  }
}

char* stu_profile_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) return strdup("the profiler was not running");
    result->save(path);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
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
    return strdup(e.what());
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
    return strdup(e.what());
  }
}

}
