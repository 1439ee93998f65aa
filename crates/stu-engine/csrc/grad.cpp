// Vector-Jacobian products through a libtorch autograd graph, with the output gradient given.
// tch 0.22 exposes only `run_backward`, which seeds every root with ones; asking for
// ∂(y·g)/∂x that way costs a multiply, a sum and a second multiply over y per op, and an extra
// tensor of y's size. Built by `build.rs` with the `tch` feature, against the same libtorch.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/profiler_kineto.h>

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

}
