// The epilogue both kernel families share: O / l (· δV per channel for FP8 P·V) into the caller's output,
// rows that saw no key written as 0, and the optional LSE. A lane holds rows `row0` and `row0 + 8` and, of
// every 8-column tile of O, columns 2t and 2t+1 (the m16n8 and wgmma m64nN accumulator layouts alike).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/constants.cuh"
#include "../common/vec.cuh"
#include "params.h"
#include "softmax.cuh"

namespace comfy_sage {

// `softmax.l` must hold whole-row sums (OnlineSoftmax::reduce_sums done); store_rows below does that first.
template <bool kPvFp8, int kTiles, int kOTiles>
__device__ __forceinline__ void write_rows(const AttentionArgs& a, const OnlineSoftmax<kTiles>& softmax,
                                           const float (&o)[kOTiles][4], int row0, int b, int hq, int bhq,
                                           int bhkv, int t, float exp_offset) {
  const Shape& s = a.shape;
  const float* v_amax = a.buf.v_amax + static_cast<int64_t>(bhkv) * s.padded_dim;
  float inv_l[2];
  uint16_t* out[2];  // fp16 and bf16 are both 2 bytes: one pointer, the conversion chosen at run time
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    inv_l[half] = softmax.l[half] > 0.f ? __frcp_rn(softmax.l[half]) : 0.f;
    out[half] = static_cast<uint16_t*>(a.out.ptr) + b * a.out.batch_stride + hq * a.out.head_stride +
                static_cast<int64_t>(row0 + half * 8) * a.out.token_stride;
  }
  // Column pair by column pair, both rows: no branch around a column (the V scales of all padded_dim channels
  // exist), and the scales read through the read-only path, so the compiler may load them ahead of the
  // stores instead of one memory latency per column (6 µs of a wgmma tile's 82 at Flux 1024²).
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) {
    const int col = n * 8 + 2 * t;
    float scale0 = 1.f, scale1 = 1.f;
    if constexpr (kPvFp8) {
      scale0 = __ldg(v_amax + col) * (1.f / kFp8Max);
      scale1 = __ldg(v_amax + col + 1) * (1.f / kFp8Max);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float x0 = o[n][2 * half] * inv_l[half], x1 = o[n][2 * half + 1] * inv_l[half];
      if constexpr (kPvFp8) {
        x0 *= scale0;
        x1 *= scale1;
      }
      const uint32_t bits = a.dtype == DType::kBFloat16 ? Elem<__nv_bfloat16>::from_float2(x0, x1)
                                                         : Elem<__half>::from_float2(x0, x1);
      if (row0 + half * 8 < s.seq_q && col < s.head_dim) *reinterpret_cast<uint32_t*>(out[half] + col) = bits;
    }
  }
  if (a.lse != nullptr && t == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + half * 8;
      if (row >= s.seq_q) continue;
      float lse = softmax.lse(half, exp_offset);
      lse += a.buf.q_dot_kmean[static_cast<int64_t>(bhq) * s.seq_q + row] * a.sm_scale;
      a.lse[static_cast<int64_t>(bhq) * s.seq_q + row] = lse;
    }
  }
}

template <bool kPvFp8, int kTiles, int kOTiles>
__device__ __forceinline__ void store_rows(const AttentionArgs& a, OnlineSoftmax<kTiles>& softmax,
                                           const float (&o)[kOTiles][4], int row0, int b, int hq, int bhq,
                                           int bhkv, int t, float exp_offset) {
  softmax.reduce_sums();
  write_rows<kPvFp8>(a, softmax, o, row0, b, hq, bhq, bhkv, t, exp_offset);
}

}  // namespace comfy_sage
