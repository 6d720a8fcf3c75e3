// Launcher of the mma.sync family: the instantiation table and the run-time switch over it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../attention/attention.h"
#include "../common/smem_opt_in.h"
#include "../quant/quantize.h"
#include "attention_kernel.cuh"

namespace comfy_sage {
namespace {

// Every compiled variant: X(Q·Kᵀ bits, head dim, P·V type, key mask). The output type (fp16/bf16) is a run-time
// switch in the epilogue, not a template axis. Key masks (a per-key bias, AttentionArgs::key_bias) are compiled
// for INT8 Q·Kᵀ. This is the one list of what gets compiled.
#define COMFY_SAGE_SM80_VARIANTS(X) \
  X(8, 64, kFp8, false)     \
  X(8, 64, kFp16, false)    \
  X(8, 64, kInt8, false)    \
  X(8, 128, kFp8, false)    \
  X(8, 128, kFp16, false)   \
  X(8, 128, kInt8, false)   \
  X(8, 256, kFp8, false)    \
  X(8, 256, kFp16, false)   \
  X(8, 256, kInt8, false)   \
  X(4, 64, kFp8, false)     \
  X(4, 64, kFp16, false)    \
  X(4, 128, kFp8, false)    \
  X(4, 128, kFp16, false)   \
  X(4, 256, kFp8, false)    \
  X(4, 256, kFp16, false)   \
  X(8, 64, kFp8, true)      \
  X(8, 64, kFp16, true)     \
  X(8, 64, kInt8, true)     \
  X(8, 128, kFp8, true)     \
  X(8, 128, kFp16, true)    \
  X(8, 128, kInt8, true)    \
  X(8, 256, kFp8, true)     \
  X(8, 256, kFp16, true)    \
  X(8, 256, kInt8, true)

template <int kQkBits, int kDim, PvType kPv, bool kKeyBias>
cudaError_t launch(const AttentionArgs& a, cudaStream_t stream) {
  using Tr = Sm80Traits<kQkBits, kDim, kPv, kKeyBias>;
  const cudaError_t err = allow_smem<sm80_attention_kernel<kQkBits, kDim, kPv, kKeyBias>>(Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(a.shape.padded_q / Tr::kBlockQ, a.shape.heads_q, a.shape.batch);
  sm80_attention_kernel<kQkBits, kDim, kPv, kKeyBias><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool sm80_runs_on_current_device() {
  // A host-side query (no launch, no sync): fails with cudaErrorNoKernelImageForDevice when this build has
  // neither SASS nor JIT-able PTX for the current GPU.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, sm80_attention_kernel<8, 128, PvType::kFp16>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // clear the (non-sticky) error for the next launch check
  return err == cudaSuccess;
}

cudaError_t run_sm80_attention(const AttentionArgs& a, cudaStream_t stream) {
  cudaError_t err = launch_quantize(a, stream);
  if (err != cudaSuccess || a.shape.seq_q == 0) return err;
  const bool key_bias = a.key_bias != nullptr;
#define COMFY_SAGE_DISPATCH(BITS, D, PV, KB)                                                       \
  if (a.qk_bits == BITS && a.shape.padded_dim == D && a.pv == PvType::PV && key_bias == KB) { \
    return launch<BITS, D, PvType::PV, KB>(a, stream);                                         \
  }
  COMFY_SAGE_SM80_VARIANTS(COMFY_SAGE_DISPATCH)
#undef COMFY_SAGE_DISPATCH
  return cudaErrorInvalidValue;
}

}  // namespace comfy_sage
