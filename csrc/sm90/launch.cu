// Launcher of the wgmma family (sm_90a only): TMA descriptors, the variant table and the run-time switch.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../attention/attention.h"
#include "../common/smem_opt_in.h"
#include "../quant/quantize.h"
#include "attention_kernel.cuh"

namespace comfy_sage {
namespace {

// Every compiled variant: X(head dim, P·V type, key mask), with INT8 Q·Kᵀ; fp16/bf16 output is a run-time
// switch.
#define COMFY_SAGE_SM90_VARIANTS(X) \
  X(64, kFp8, false)                \
  X(128, kFp8, false)               \
  X(64, kInt8, false)               \
  X(128, kInt8, false)              \
  X(64, kFp8, true)                 \
  X(128, kFp8, true)                \
  X(64, kInt8, true)                \
  X(128, kInt8, true)

// cuTensorMapEncodeTiled from the driver the CUDA runtime already loaded (no link against libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      ptr = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// A 3-D byte tensor [outer][rows][inner] (inner contiguous) read in boxes of box_inner × box_rows × 1, with
// the shared-memory swizzle the wgmma descriptors expect (box_inner bytes: 64 or 128). Out-of-range
// elements of a box read as zero.
bool encode_bytes_3d(CUtensorMap* map, const void* ptr, uint64_t inner, uint64_t rows, uint64_t outer,
                     uint32_t box_inner, uint32_t box_rows) {
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return false;
  const cuuint64_t dims[3] = {inner, rows, outer};
  const cuuint64_t strides[2] = {inner, inner * rows};  // bytes, of dims 1 and 2
  const cuuint32_t box[3] = {box_inner, box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapSwizzle swizzle = box_inner == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  return fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(ptr), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// SMs of the current device (0 if unknown: then no tile is split).
int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return sms;
}

template <int kDim, PvType kPv, bool kKeyBias>
cudaError_t launch(const AttentionArgs& a, cudaStream_t stream) {
  using Tr = Sm90Traits<kDim, kPv, kKeyBias>;
  const Shape& s = a.shape;
  Sm90Params p{};
  p.args = a;
  const uint64_t bh_q = static_cast<uint64_t>(s.batch) * s.heads_q, bh_kv = static_cast<uint64_t>(s.batch) * s.heads_kv;
  if (!encode_bytes_3d(&p.q_map, a.buf.q, kDim, s.padded_q, bh_q, kDim, Tr::kBlockQ) ||
      !encode_bytes_3d(&p.k_map, a.buf.k, kDim, s.padded_kv, bh_kv, kDim, Tr::kBlockK) ||
      !encode_bytes_3d(&p.v_map, a.buf.v, s.padded_kv, kDim, bh_kv, Tr::kBlockK, kDim)) {
    return cudaErrorInvalidValue;
  }
  p.split = sm90_split(s, a.causal, sm_count());
  if (p.split.split_tiles > 0) {  // checked before either launch
    if (a.split_partials == nullptr || a.num_split_counters < p.split.split_tiles * Tr::kConsumers) {
      return cudaErrorInvalidValue;  // the caller sized the buffers with sm90_split_buffers
    }
    if (p.split.ctas() > INT32_MAX) return cudaErrorInvalidConfiguration;
  }
  if (p.split.split_from > 0) {  // the whole tiles (all of them, when none is split)
    const dim3 grid(s.padded_q / Tr::kBlockQ, s.heads_q, s.batch);
    cudaError_t err = allow_smem<sm90_attention_kernel<kDim, kPv, false, kKeyBias>>(Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
    sm90_attention_kernel<kDim, kPv, false, kKeyBias><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess || p.split.split_tiles == 0) return err;
  }
  cudaError_t err = allow_smem<sm90_attention_kernel<kDim, kPv, true, kKeyBias>>(Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  // The split tiles, as the plain kernel's dependent when it ran (Sm90Split).
  p.split.first_cta = p.split.split_from;
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(p.split.ctas() - p.split.first_cta));
  config.blockDim = dim3(Tr::kThreads);
  config.dynamicSmemBytes = Tr::kSmemBytes;
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = p.split.first_cta > 0 ? 1 : 0;
  return cudaLaunchKernelEx(&config, sm90_attention_kernel<kDim, kPv, true, kKeyBias>, p);
}

}  // namespace

bool sm90_runs_on_current_device() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0 || encode_tiled() == nullptr) return false;  // sm_90a code runs on 9.0 only
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, sm90_attention_kernel<128, PvType::kFp8, false>);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess;
}

void sm90_split_buffers(const Shape& s, bool causal, int64_t* partial_floats, int* counters) {
  const Sm90Split plan = sm90_split(s, causal, sm_count());
  *partial_floats =
      static_cast<int64_t>(plan.split_tiles) * plan.splits * sm90_block_q(s.padded_dim, s.key_mask) * (s.padded_dim + 2);
  *counters = plan.split_tiles * sm90_consumers(s.padded_dim, s.key_mask);  // one per tile and consumer warpgroup
}

cudaError_t run_sm90_attention(const AttentionArgs& a, cudaStream_t stream) {
  if (a.qk_bits != 8 || a.pv == PvType::kFp16 || a.shape.block_k != kSm90BlockK) return cudaErrorInvalidValue;
  cudaError_t err = launch_quantize(a, stream);
  if (err != cudaSuccess || a.shape.seq_q == 0) return err;
  const bool key_bias = a.key_bias != nullptr;
#define COMFY_SAGE_DISPATCH(D, PV, KB)                                              \
  if (a.shape.padded_dim == D && a.pv == PvType::PV && key_bias == KB) {           \
    return launch<D, PvType::PV, KB>(a, stream);                                   \
  }
  COMFY_SAGE_SM90_VARIANTS(COMFY_SAGE_DISPATCH)
#undef COMFY_SAGE_DISPATCH
  return cudaErrorInvalidValue;
}

}  // namespace comfy_sage
