// The epilogue both kernel families share: O / l (· δV per channel for FP8 and INT8 P·V) into the caller's output,
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

// A quad's 4 × 4 words w[i] (lane u holds word i of "row" u: 8-column tile 4j + i of O, columns 2u, 2u + 1)
// transposed in two butterfly stages, so that lane u ends up with tile 4j + u whole: w[i] = lane i's word u,
// 16 contiguous bytes of the output row. All 32 lanes must take part.
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int t) {
  const bool hi = t & 2, odd = t & 1;
  {  // lanes t and t ^ 2 swap the 2 × 2 blocks off the diagonal
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, hi ? w[0] : w[2], 2);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, hi ? w[1] : w[3], 2);
    const uint32_t n0 = hi ? r0 : w[0], n1 = hi ? r1 : w[1], n2 = hi ? w[2] : r0, n3 = hi ? w[3] : r1;
    w[0] = n0, w[1] = n1, w[2] = n2, w[3] = n3;
  }
  {  // lanes t and t ^ 1 transpose within the blocks
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, odd ? w[0] : w[1], 1);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, odd ? w[2] : w[3], 1);
    const uint32_t n0 = odd ? r0 : w[0], n1 = odd ? w[1] : r0, n2 = odd ? r1 : w[2], n3 = odd ? w[3] : r1;
    w[0] = n0, w[1] = n1, w[2] = n2, w[3] = n3;
  }
}

// `softmax.l` must hold whole-row sums (OnlineSoftmax::reduce_sums done); store_rows below does that first.
template <PvType kPv, int kTiles, bool kIntMax, int kOTiles>
__device__ __forceinline__ void write_rows(const AttentionArgs& a, const OnlineSoftmax<kTiles, kIntMax>& softmax,
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
  uint32_t bits[2][kOTiles];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) {
    const int col = n * 8 + 2 * t;
    float scale0 = 1.f, scale1 = 1.f;
    if constexpr (kPv != PvType::kFp16) {
      constexpr float kInvVMax = 1.f / (kPv == PvType::kInt8 ? kInt8Max : kFp8Max);
      scale0 = __ldg(v_amax + col) * kInvVMax;
      scale1 = __ldg(v_amax + col + 1) * kInvVMax;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float x0 = o[n][2 * half] * inv_l[half], x1 = o[n][2 * half + 1] * inv_l[half];
      if constexpr (kPv != PvType::kFp16) {
        x0 *= scale0;
        x1 *= scale1;
      }
      bits[half][n] = a.dtype == DType::kBFloat16 ? Elem<__nv_bfloat16>::from_float2(x0, x1)
                                                  : Elem<__half>::from_float2(x0, x1);
    }
  }
  // 16-byte stores: the quad trades words so that each lane holds 8 consecutive columns of a row, and a
  // warp's store fills 64 contiguous bytes of each of its 8 rows (4-byte stores filled 16). Every row start
  // is 16-byte aligned: the binding allocates the output contiguous and head_dim is a multiple of 8.
  static_assert(kOTiles % 4 == 0, "16-byte stores take O's 8-column tiles in fours");
#pragma unroll
  for (int j = 0; j < kOTiles / 4; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint32_t* tiles = bits[half] + 4 * j;
      uint32_t w[4] = {tiles[0], tiles[1], tiles[2], tiles[3]};
      quad_transpose(w, t);
      const int col = (4 * j + t) * 8;
      if (row0 + half * 8 < s.seq_q && col < s.head_dim) {
        *reinterpret_cast<uint4*>(out[half] + col) = make_uint4(w[0], w[1], w[2], w[3]);
      }
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

template <PvType kPv, int kTiles, bool kIntMax, int kOTiles>
__device__ __forceinline__ void store_rows(const AttentionArgs& a, OnlineSoftmax<kTiles, kIntMax>& softmax,
                                           const float (&o)[kOTiles][4], int row0, int b, int hq, int bhq,
                                           int bhkv, int t, float exp_offset) {
  softmax.reduce_sums();
  write_rows<kPv>(a, softmax, o, row0, b, hq, bhq, bhkv, t, exp_offset);
}

}  // namespace comfy_sage
