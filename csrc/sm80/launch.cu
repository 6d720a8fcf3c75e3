// Launcher of the mma.sync family: the instantiation table and the run-time switch over it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../attention/attention.h"
#include "../quant/quantize.h"
#include "attention_kernel.cuh"

namespace comfy_sage {
namespace {

// Every compiled variant: X(head dim, FP8 P·V, output type). The one list the build and the tests follow.
#define COMFY_SAGE_SM80_VARIANTS(X) \
  X(64, true, __half)               \
  X(64, true, __nv_bfloat16)        \
  X(64, false, __half)              \
  X(64, false, __nv_bfloat16)       \
  X(128, true, __half)              \
  X(128, true, __nv_bfloat16)       \
  X(128, false, __half)             \
  X(128, false, __nv_bfloat16)      \
  X(256, true, __half)              \
  X(256, true, __nv_bfloat16)       \
  X(256, false, __half)             \
  X(256, false, __nv_bfloat16)

template <int kDim, bool kPvFp8, typename OutT>
cudaError_t launch(const AttentionArgs& a, cudaStream_t stream) {
  using Tr = Sm80Traits<kDim, kPvFp8, OutT>;
  auto kernel = sm80_attention_kernel<kDim, kPvFp8, OutT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(a.shape.padded_q / Tr::kBlockQ, a.shape.heads_q, a.shape.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename OutT>
constexpr bool is_out(DType d) {
  return (d == DType::kBFloat16) == std::is_same_v<OutT, __nv_bfloat16>;
}

}  // namespace

cudaError_t run_sm80_attention(const AttentionArgs& a, cudaStream_t stream) {
  if (a.qk_bits != 8) return cudaErrorNotSupported;
  cudaError_t err = launch_quantize(a, stream);
  if (err != cudaSuccess || a.shape.seq_q == 0) return err;
#define COMFY_SAGE_DISPATCH(D, FP8, T) \
  if (a.shape.padded_dim == D && a.pv_fp8 == FP8 && is_out<T>(a.dtype)) return launch<D, FP8, T>(a, stream);
  COMFY_SAGE_SM80_VARIANTS(COMFY_SAGE_DISPATCH)
#undef COMFY_SAGE_DISPATCH
  return cudaErrorInvalidValue;
}

}  // namespace comfy_sage
