// Device memory for `stu predict`'s choice of where to sum the sliding window's logits
// (`stu_engine::backend::cuda_free_bytes`): what a new tensor can still get on a CUDA device,
// the driver's free memory plus what libtorch's caching allocator holds without using it.
// Built with `graph.cpp`, against a libtorch with its CUDA library.
#include "error.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <exception>

extern "C" {

// Writes the free and total bytes of CUDA device `device`; returns null or a malloc'd message.
char* stu_cuda_memory(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  try {
    const auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::CUDAGuard guard(index);
    size_t free_now = 0, total = 0;
    const cudaError_t e = cudaMemGetInfo(&free_now, &total);
    if (e != cudaSuccess) return strdup(cudaGetErrorString(e));
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const int64_t cached = stats.reserved_bytes[all].current - stats.allocated_bytes[all].current;
    *free_bytes = static_cast<uint64_t>(free_now) + static_cast<uint64_t>(cached > 0 ? cached : 0);
    *total_bytes = static_cast<uint64_t>(total);
    return nullptr;
  } catch (const std::exception& ex) {
    return stu_error_message(ex);
  }
}

}  // extern "C"
