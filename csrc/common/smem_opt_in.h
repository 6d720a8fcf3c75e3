// Host side of a launch: a kernel's dynamic shared-memory opt-in, once per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace comfy_sage {

// Lets `kKernel` use `bytes` of dynamic shared memory on the current device. The attribute stays set, so
// the call is made once per device (devices 0-63; others every time): otherwise it is host time per launch.
template <auto kKernel>
cudaError_t allow_smem(int bytes) {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

}  // namespace comfy_sage
