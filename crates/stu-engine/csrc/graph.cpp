// CUDA graphs for the inference forward (`torch.rs`, `graph`): one network forward at a fixed
// input shape is captured once and replayed for every later patch, so that the host launches
// one graph instead of ~1,200 ATen calls per STU-Net-B patch (the H200 profile had the GPU idle
// 27 % of a B patch, waiting on the host). Built by `build.rs` only against a libtorch with its
// CUDA library (and the CUDA runtime headers of the PyPI wheel, `xtask/libtorch.py`).
//
// The capture is libtorch's own (`at::cuda::CUDAGraph`, what `torch.cuda.graph` uses): it runs
// on a side stream, and the caching allocator serves the captured allocations from a private
// pool, one pool per device shared by every graph of the process (graphs replay one at a time on
// one stream, and each graph's input and output stay allocated while it lives, so one graph's
// intermediates may reuse another's).
#include "error.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/cuda/MemPool.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>

namespace {

struct Graph {
  at::cuda::CUDAGraph graph;
  // The stream that was current before the capture began; restored when it ends.
  std::optional<c10::cuda::CUDAStream> before;
  // Where the capture allocates (see `release_pool`).
  c10::DeviceIndex device = 0;
  at::cuda::MempoolId_t pool{0, 0};
};

// The pool every graph of the process captures into, one per device: a `MemPool` that is never
// destroyed, so the pool's use count never falls to 0. A bare `graph_pool_handle()` id is not
// enough: when the last graph using it is freed the allocator marks the pool freeable, and the
// next capture with that id fails (`createOrIncrefPool` asserts a live pool) — on the H200 of
// 2026-11-28 the f16 capture of `stu check-ops` failed that way after its f32 graph was freed.
at::cuda::MempoolId_t shared_pool(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, at::cuda::MemPool*> pools;
  std::lock_guard<std::mutex> lock(mutex);
  auto& pool = pools[device];
  if (!pool) {
    c10::cuda::CUDAGuard guard(device);
    pool = new at::cuda::MemPool();  // (leaked on purpose: it must outlive every graph)
  }
  return pool->id();
}

// Makes the stream current again that was before the capture (captured work does not run, so
// nothing on the side stream needs ordering; replays run on the current stream).
void restore(Graph* g) {
  if (!g->before) return;
  c10::cuda::setCurrentCUDAStream(*g->before);
  g->before.reset();
}

// After a capture that failed to end: `capture_end` throws at `cudaStreamEndCapture` (a capture
// invalidated by the forward, or a forward that panicked) before it tells the allocator to stop
// serving the stream from the shared pool, and while the allocator still records that capture,
// every later `capture_begin` into the pool fails ("already recording to mempool_id"). So it is
// told here; where `capture_end` got that far, the allocator says there is nothing to stop.
void release_pool(const Graph* g) {
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(g->device, g->pool);
  } catch (const std::exception&) {
  }
}

}  // namespace

extern "C" {

// A new graph on CUDA device `device`, its capture begun on a side stream after the device has
// finished the work queued so far (as `torch.cuda.graph` does). Every ATen call of this thread
// until `stu_graph_end` is captured, not run.
char* stu_graph_begin(int device, void** out) {
  Graph* g = nullptr;
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    g = new Graph();
    const auto current = c10::cuda::getCurrentCUDAStream();
    const auto side = c10::cuda::getStreamFromPool(false, current.device_index());
    c10::cuda::device_synchronize();
    g->before = current;
    g->device = current.device_index();
    g->pool = shared_pool(g->device);
    c10::cuda::setCurrentCUDAStream(side);
    // Thread-local mode: another thread's CUDA calls (data loading) do not break the capture.
    g->graph.capture_begin(g->pool, cudaStreamCaptureModeThreadLocal);
    *out = g;
    return nullptr;
  } catch (const std::exception& e) {
    if (g) {
      restore(g);
      // (`capture_begin` registers the capture with the allocator before it begins the
      // stream's capture, which may fail.)
      if (g->pool.first != 0 || g->pool.second != 0) release_pool(g);
      delete g;
    }
    return stu_error_message(e);
  }
}

// Ends the capture (also after a failed forward, so that the stream is usable again) and
// instantiates the graph. On an error the graph is freed and must not be used.
char* stu_graph_end(void* p) {
  auto* g = static_cast<Graph*>(p);
  try {
    g->graph.capture_end();
    restore(g);
    return nullptr;
  } catch (const std::exception& e) {
    restore(g);
    release_pool(g);
    delete g;
    return stu_error_message(e);
  }
}

// Runs the captured work again on the current stream: it reads the captured input's storage
// and writes the captured output's.
char* stu_graph_replay(void* p) {
  try {
    static_cast<Graph*>(p)->graph.replay();
    return nullptr;
  } catch (const std::exception& e) {
    return stu_error_message(e);
  }
}

void stu_graph_free(void* p) { delete static_cast<Graph*>(p); }

}  // extern "C"
