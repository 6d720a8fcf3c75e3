// A caller's key mask as the attention kernels take it (params.h AttentionArgs::key_bias), in one launch: the
// specification, and the implementation on the CPU, is comfy_sage/ops.py key_bias_reference. Per row: the
// log2-domain bias of each key (bool: 0 or −inf; additive: −inf stays −inf, other values × log2 e, clamped at
// kFiniteBiasFloor, NaN kept), −inf past seq_kv up to the row's width, then one flag per kSm80BlockK keys (1
// where any of their values is not 0) and zeros up to a multiple of 4 flags.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/constants.cuh"
#include "attention.h"

namespace comfy_sage {
namespace {

constexpr int kKeyBiasWarps = 8;  // warps a CTA; each converts one flag's kSm80BlockK keys

template <typename T>
__device__ __forceinline__ float bias_of(T value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? 0.f : -kInf;
  } else {
    float x;
    if constexpr (std::is_same_v<T, __half>) {
      x = __half2float(value);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      x = __bfloat162float(value);
    } else {
      x = static_cast<float>(value);  // float, or double rounded to nearest as torch's .float() does
    }
    if (x == -kInf) return x;
    const float scaled = x * kLog2e;
    return scaled < kFiniteBiasFloor ? kFiniteBiasFloor : scaled;  // NaN compares false and stays NaN
  }
}

template <typename T>
__global__ void __launch_bounds__(kKeyBiasWarps * kWarpSize)
    key_bias_kernel(const T* mask, int64_t row_stride, int64_t key_stride, int seq_kv, int width, int row_length,
                    float* out) {
  static_assert(kSm80BlockK == 2 * kWarpSize, "a warp converts one flag's keys, two per lane");
  const int row = blockIdx.y, lane = threadIdx.x % kWarpSize;
  const int flag = blockIdx.x * kKeyBiasWarps + threadIdx.x / kWarpSize, key0 = flag * kSm80BlockK;
  float* const out_row = out + static_cast<int64_t>(row) * row_length;
  if (key0 < width) {
    bool any = false;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + half * kWarpSize + lane;
      const float bias = key < seq_kv ? bias_of(mask[row * row_stride + key * key_stride]) : -kInf;
      out_row[key] = bias;
      any |= bias != 0.f;  // NaN too
    }
    any = __any_sync(0xffffffffu, any);
    if (lane == 0) out_row[width + flag] = any ? 1.f : 0.f;
  }
  // The flags' padding (row_length − width − width / kSm80BlockK of them, at most 3).
  const int pad = width + width / kSm80BlockK + static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (blockIdx.x == 0 && pad < row_length) out_row[pad] = 0.f;
}

template <typename T>
cudaError_t launch(const void* mask, const KeyBiasArgs& a, cudaStream_t stream) {
  const int flags = a.width / kSm80BlockK;
  const dim3 grid((flags + kKeyBiasWarps - 1) / kKeyBiasWarps, a.rows);
  key_bias_kernel<T><<<grid, kKeyBiasWarps * kWarpSize, 0, stream>>>(
      static_cast<const T*>(mask), a.row_stride, a.key_stride, a.seq_kv, a.width, a.row_length, a.out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_key_bias(const void* mask, MaskType type, const KeyBiasArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.rows > kMaxGridYZ || args.width <= 0 || args.width % kKeyBiasAlign) {
    return cudaErrorInvalidValue;
  }
  switch (type) {
    case MaskType::kBool: return launch<bool>(mask, args, stream);
    case MaskType::kFloat16: return launch<__half>(mask, args, stream);
    case MaskType::kBFloat16: return launch<__nv_bfloat16>(mask, args, stream);
    case MaskType::kFloat32: return launch<float>(mask, args, stream);
    case MaskType::kFloat64: return launch<double>(mask, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace comfy_sage
