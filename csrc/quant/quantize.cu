// Fused quantization of Q, K and V for the attention kernels: one read of each input.
//
//   1. kv_stats:  Σ_tokens K per channel (K smoothing's mean) and, for FP8/INT8 P·V, max_tokens |V| per channel.
//                 Up to 64 CTAs per head; the sum of their parts is taken in a fixed order, so a call's output
//                 does not change from one run to the next (params.h kv_stats_parts).
//   2. quant_kv:  per K block of kBlockK tokens: K' = K − k̄ to INT8 with one scale per token group
//                 {t : (t mod 8) / 2 = j} (4 per block); V to FP8 e4m3 or INT8 per channel, written transposed
//                 (token index contiguous) with the tokens of each 16-group permuted (see "The 8-bit V layout"), or
//                 V to FP16 row-major. Padded tokens and channels are written as zeros.
//                 (kBlockK is the attention kernel's K block: 64 for mma.sync, 128 for wgmma.)
//   3. quant_q:   per warp slice of kWarpQ rows: Q to INT8 with one scale per row group {r : r mod 8 = g},
//                 sm_scale·log2(e) folded into the scale; optionally q·k̄ per row for the LSE.
// For INT8, 2 and 3 are one launch (quant_kvq: they do not depend on each other), so the quantization is a
// memset and two launches; each launch costs host time and a gap on the GPU, which show at image sizes.
// Where K/V are one wgmma K block (cross attention over a short text), quant_kvq alone: its K/V CTA takes
// the head's statistics over its own tokens (launch_quantize).
// Rounding matches comfy_sage/reference/quant.py: x_q = rint(x · (127 / amax)), scale = amax / 127.
#include <cuda_runtime.h>

#include <type_traits>

#include "../attention/params.h"
#include "../common/constants.cuh"
#include "../common/ptx.cuh"
#include "../common/vec.cuh"
#include "quantize.h"

namespace comfy_sage {
namespace {

constexpr int kThreads = 256;

// qmax / amax, kept finite: below amax ≈ 1e-36 the quotient overflows, and 0 · inf would turn zeros into NaN.
__device__ __forceinline__ float inv_scale(float amax, float qmax) {
  return amax > 0.f ? fminf(qmax / amax, kFloatMax) : 0.f;
}

template <int kQMax>
__device__ __forceinline__ int quantize(float x, float inv) {
  return max(-kQMax, min(kQMax, __float2int_rn(x * inv)));
}

// rint(x · inv) as INT8 in the low byte of the returned word, for |x · inv| ≤ 127: kRoundingBias added to the
// rounded product (ties to even, as __float2int_rn); its low byte is 0. Two FMA-pipe instructions where a
// conversion takes the special-function unit; no clamp, since every caller's inv is 127 / amax of the very
// values it quantizes (finite inputs).
__device__ __forceinline__ uint32_t int8_in_low_byte(float x, float inv) {
  return __float_as_uint(__fadd_rn(__fmul_rn(x, inv), kRoundingBias));
}
// The low bytes of four words as one (the first in the lowest byte).
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// Eight values as INT8 (8 bytes) or INT4 (4 bytes: value 2j in the low nibble of byte j, 2j+1 in the high).
template <int kBits>
__device__ __forceinline__ void store_packed(int8_t* dst, const float (&x)[8], float inv) {
  if constexpr (kBits == 8) {
    uint32_t q[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) q[e] = int8_in_low_byte(x[e], inv);
    *reinterpret_cast<uint2*>(dst) =
        make_uint2(pack_low_bytes(q[0], q[1], q[2], q[3]), pack_low_bytes(q[4], q[5], q[6], q[7]));
  } else {
    uint32_t w = 0u;
#pragma unroll
    for (int e = 0; e < 8; ++e) w |= static_cast<uint32_t>(quantize<7>(x[e], inv) & 0xf) << (4 * e);
    *reinterpret_cast<uint32_t*>(dst) = w;
  }
}

template <int kBits>
constexpr float qmax() {
  return kBits == 8 ? kInt8Max : kInt4Max;
}

// The 8-bit V layout (FP8 and INT8 alike): within each group of 16 tokens, position 4q + k (k = 0..3) holds token 2q, 2q+1, 8+2q,
// 9+2q. The 8-bit A fragment of lane (g, t) covers k = 4t..4t+3 (and 16 + that); the S accumulator it comes
// from holds keys 2t, 2t+1, 8+2t, 9+2t of each 16. So those registers are the A operand as they are, with
// no shuffles (mma.sync m16n8k32 and wgmma m64nNk32 alike).

constexpr uint4 kZero16 = {0u, 0u, 0u, 0u};  // eight zeros in fp16 and in bf16

template <typename T>
__global__ void __launch_bounds__(kThreads) kv_stats_kernel(AttentionArgs a) {
  const Shape& s = a.shape;
  const int tokens_per_part = kv_stats_tokens_per_part(s.seq_kv);  // gridDim.x parts (kv_stats_parts)
  const int bh = blockIdx.y, b = bh / s.heads_kv, h = bh % s.heads_kv;
  const int vecs = s.head_dim / 8;
  const int tokens_per_iter = kThreads / vecs;
  const int lane_token = threadIdx.x / vecs, cv = threadIdx.x % vecs;
  // Each thread's 8 partial sums and maxima, then one thread per channel over the token lanes: no shared-
  // memory atomics (a float atomicAdd there is a compare-and-swap loop, 16-32 threads deep per address).
  __shared__ float4 k_part[kThreads * 2], v_part[kThreads * 2];
  const bool active = lane_token < tokens_per_iter;
  if (active) {
    float ks[8] = {}, vm[8] = {};
    const T* kp = static_cast<const T*>(a.k.ptr) + b * a.k.batch_stride + h * a.k.head_stride + cv * 8;
    const T* vp = static_cast<const T*>(a.v.ptr) + b * a.v.batch_stride + h * a.v.head_stride + cv * 8;
    const int t0 = blockIdx.x * tokens_per_part;
    const int t1 = min(s.seq_kv, t0 + tokens_per_part);
    // Two tokens' loads in flight per step, kept packed until both are issued.
    for (int t = t0 + lane_token; t < t1; t += 2 * tokens_per_iter) {
      const int64_t t2 = t + tokens_per_iter;
      const bool second = t2 < t1;
      const uint4 k0 = load16_keep(kp + t * a.k.token_stride);
      const uint4 k1 = second ? load16_keep(kp + t2 * a.k.token_stride) : kZero16;
      uint4 v0 = kZero16, v1 = kZero16;
      if (a.pv != PvType::kFp16) {
        v0 = load16_keep(vp + t * a.v.token_stride);
        if (second) v1 = load16_keep(vp + t2 * a.v.token_stride);
      }
      float x[8], y[8];
      unpack8<T>(x, k0);
      unpack8<T>(y, k1);
#pragma unroll
      for (int i = 0; i < 8; ++i) ks[i] += x[i] + y[i];
      unpack8<T>(x, v0);
      unpack8<T>(y, v1);
#pragma unroll
      for (int i = 0; i < 8; ++i) vm[i] = fmaxf(vm[i], fmaxf(fabsf(x[i]), fabsf(y[i])));
    }
    // Thread (lane_token, cv) holds channels 8·cv.. of its token lane: slot lane_token · vecs + cv.
    k_part[2 * threadIdx.x] = make_float4(ks[0], ks[1], ks[2], ks[3]);
    k_part[2 * threadIdx.x + 1] = make_float4(ks[4], ks[5], ks[6], ks[7]);
    v_part[2 * threadIdx.x] = make_float4(vm[0], vm[1], vm[2], vm[3]);
    v_part[2 * threadIdx.x + 1] = make_float4(vm[4], vm[5], vm[6], vm[7]);
  }
  __syncthreads();
  const float* k_flat = reinterpret_cast<const float*>(k_part);
  const float* v_flat = reinterpret_cast<const float*>(v_part);
  // This part's K sums go to its own slot (params.h kv_stats_parts); a maximum is the same in any order.
  const int parts = static_cast<int>(gridDim.x);
  float* k_partial = a.buf.k_partial + static_cast<int64_t>(bh) * parts * s.padded_dim;
  for (int c = threadIdx.x; c < s.head_dim; c += kThreads) {
    float sum = 0.f, mx = 0.f;
    for (int lt = 0; lt < tokens_per_iter; ++lt) {
      sum += k_flat[lt * s.head_dim + c];
      mx = fmaxf(mx, v_flat[lt * s.head_dim + c]);
    }
    k_partial[blockIdx.x * s.padded_dim + c] = sum;
    if (a.pv != PvType::kFp16) atomic_max_nonneg(&a.buf.v_amax[bh * s.padded_dim + c], mx);
  }
  // The head's last part to finish adds the slots, in a fixed order: kThreads / padded_dim threads per
  // channel each take every `lanes`-th part (eight loads in flight: one at a time cost 2-6% at 16k tokens),
  // then one of them adds the lanes' sums.
  __shared__ int arrived;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicAdd(&a.buf.kv_stats_arrivals[bh], 1);
  __syncthreads();
  if (arrived != parts - 1) return;
  __threadfence();
  const int lanes = kThreads / s.padded_dim, c = threadIdx.x % s.padded_dim, slot = threadIdx.x / s.padded_dim;
  float sum = 0.f;
  if (c < s.head_dim) {
    for (int p0 = slot; p0 < parts; p0 += 8 * lanes) {
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int part = p0 + i * lanes;
        x[i] = part < parts ? __ldcg(k_partial + part * s.padded_dim + c) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += x[i];
    }
  }
  float* lane_sums = reinterpret_cast<float*>(k_part);  // free since the first __syncthreads after its reads
  lane_sums[threadIdx.x] = sum;
  __syncthreads();
  if (slot == 0 && c < s.head_dim) {
    float total = 0.f;
    for (int l = 0; l < lanes; ++l) total += lane_sums[l * s.padded_dim + c];
    a.buf.k_sum[bh * s.padded_dim + c] = total;
  }
}

// K block `block` of K/V head `bh` (a CTA of kThreads). kLocalStats: the head's K/V are this one block (cross
// attention over a short text), so the CTA takes K's mean and V's per-channel |max| over its own tokens, and
// neither kv_stats nor the memset before it runs (launch_quantize).
template <typename T, int kDim, int kBlockK, int kBits, bool kLocalStats = false>
__device__ __forceinline__ void quant_kv_block(const AttentionArgs& a, int block, int bh) {
  constexpr int kVecs = kDim / 8;                               // 8-channel vectors per token
  constexpr int kPerThread = kBlockK * kVecs / kThreads;        // vectors each thread quantizes
  static_assert(kBlockK * kVecs % kThreads == 0, "tile must split evenly over the threads");
  // A thread's tokens are threadIdx.x / kVecs + i · (kThreads / kVecs): all ≡ mod 8, so all in one K group;
  // and the lanes that share a group are those equal outside the low log2(2 · kVecs) bits of the lane id.
  static_assert((kThreads / kVecs) % kRowGroups == 0 && 2 * kVecs <= 2 * kWarpSize, "one K group per thread");
  const Shape& s = a.shape;
  const int b = bh / s.heads_kv, h = bh % s.heads_kv;
  const int t0 = block * kBlockK;
  const float inv_n = 1.f / static_cast<float>(s.seq_kv);
  const float* k_sum = a.buf.k_sum + bh * s.padded_dim;
  const int lane = threadIdx.x % kWarpSize;

  __shared__ float group_amax[kColGroups];
  if (threadIdx.x < kColGroups) group_amax[threadIdx.x] = 0.f;
  __syncthreads();

  // K: load, smooth, and find the amax of this thread's group (registers, then the warp, then one shared
  // atomic per group and warp). The vectors stay packed between the two passes over them (half the
  // registers: more CTAs per SM). A thread's vectors all hold the same 8 channels.
  static_assert(kThreads % kVecs == 0, "one channel vector per thread");
  const int c = threadIdx.x % kVecs * 8;
  auto token_in = [&](int i) { return t0 + (threadIdx.x + i * kThreads) / kVecs < s.seq_kv && c < s.head_dim; };
  uint4 xr[kPerThread];
  auto load_k = [&] {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t t = t0 + (threadIdx.x + i * kThreads) / kVecs;
      xr[i] = token_in(i) ? load16_last_use(static_cast<const T*>(a.k.ptr) + b * a.k.batch_stride +
                                            h * a.k.head_stride + t * a.k.token_stride + c)
                          : kZero16;
    }
  };
  float mean[8];
  [[maybe_unused]] __shared__ float local_amax[kLocalStats ? kDim : 1];  // V's, for write_v below
  if constexpr (kLocalStats) {
    // Each thread's K sums and V |max| of its channel vector over its tokens, then one thread per channel
    // reduces both over the kThreads / kVecs threads that hold it, in thread order.
    load_k();
    const T* v_head = static_cast<const T*>(a.v.ptr) + b * a.v.batch_stride + h * a.v.head_stride;
    __shared__ float k_part[kThreads * 8], v_part[kThreads * 8], local_mean[kDim];
    float sum[8] = {}, vm[8] = {};
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      float x[8];
      unpack8<T>(x, xr[i]);  // padded tokens and channels hold zeros
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] += x[e];
      if (token_in(i)) {
        const int64_t t = t0 + (threadIdx.x + i * kThreads) / kVecs;
        unpack8<T>(x, load16_keep(v_head + t * a.v.token_stride + c));
#pragma unroll
        for (int e = 0; e < 8; ++e) vm[e] = fmaxf(vm[e], fabsf(x[e]));
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      k_part[threadIdx.x * 8 + e] = sum[e];
      v_part[threadIdx.x * 8 + e] = vm[e];
    }
    __syncthreads();
    for (int ch = threadIdx.x; ch < kDim; ch += kThreads) {
      float total = 0.f, mx = 0.f;
      for (int u = ch / 8; u < kThreads; u += kVecs) {
        total += k_part[u * 8 + ch % 8];
        mx = fmaxf(mx, v_part[u * 8 + ch % 8]);
      }
      local_mean[ch] = total * inv_n;
      local_amax[ch] = mx;
      a.buf.v_amax[bh * s.padded_dim + ch] = mx;  // the attention kernel's epilogue scales O by it
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = local_mean[c + e];
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = c < s.head_dim ? k_sum[c + e] * inv_n : 0.f;
    load_k();
  }
  // x = K − k̄ of vector i, zeros for padded tokens and channels.
  auto smoothed = [&](float (&x)[8], uint4 raw, int i) {
    unpack8<T>(x, raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = token_in(i) ? x[e] - mean[e] : 0.f;
  };
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    float x[8];
    smoothed(x, xr[i], i);
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(x[e]));
  }
#pragma unroll
  for (int mask = 1; mask < 2 * kVecs && mask < kWarpSize; mask *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, mask));
  const int my_group = ((threadIdx.x / kVecs) % kRowGroups) / (kRowGroups / kColGroups);
  if ((lane & (2 * kVecs - 1)) == 0) atomic_max_nonneg(&group_amax[my_group], m);
  __syncthreads();
  const int num_blocks = s.padded_kv / kBlockK;
  if (threadIdx.x < kColGroups) {
    const int64_t at = (static_cast<int64_t>(bh) * num_blocks + block) * kColGroups + threadIdx.x;
    a.buf.k_scale[at] = group_amax[threadIdx.x] / qmax<kBits>();
    if (kBits == 4) a.buf.k8_scale[at] = group_amax[threadIdx.x] / kInt8Max;
  }
  const float amax = group_amax[my_group];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = threadIdx.x + i * kThreads, tok = idx / kVecs, cv = idx % kVecs;
    const int64_t row = static_cast<int64_t>(bh) * s.padded_kv + t0 + tok;
    float x[8];
    launder(xr[i]);
    smoothed(x, xr[i], i);
    store_packed<kBits>(a.buf.k + row * (kDim * kBits / 8) + cv * kBits, x, inv_scale(amax, qmax<kBits>()));
    if constexpr (kBits == 4) store_packed<8>(a.buf.k8 + row * kDim + cv * 8, x, inv_scale(amax, kInt8Max));
  }

  const T* v_head = static_cast<const T*>(a.v.ptr) + b * a.v.batch_stride + h * a.v.head_stride;
  if (a.pv != PvType::kFp16) {
    // FP8 / INT8 V^T, per channel, tokens permuted in groups of 16 (the 8-bit V layout): the 4 bytes at positions
    // 4q..4q+3 of a group hold tokens 2q, 2q+1, 8+2q, 9+2q. One item = those 4 tokens × 8 channels, written
    // as 8 words. A warp's 32 items are two adjacent channel vectors (lanes' low bit) × 4 q × 4 groups: each load
    // instruction reads 16 tokens × 32 contiguous bytes (whole sectors), each store 64 contiguous bytes a channel.
    constexpr int kGroups = kBlockK / 16, kItems = kBlockK / 4 * kVecs;
    static_assert(kVecs % 2 == 0 && kGroups % 4 == 0, "a warp's items: 2 channel vectors × 4 q × 4 groups");
    const float* v_amax = kLocalStats ? local_amax : a.buf.v_amax + bh * s.padded_dim;
    // The byte format a compile-time choice (`int8`: std::true_type for INT8, std::false_type for FP8), so the
    // loop holds no branch on it (one made ptxas spill on sm_80/86 at head dim 256).
    auto write_v = [&](auto int8) {
      constexpr bool kInt8 = decltype(int8)::value;
      for (int item = threadIdx.x; item < kItems; item += kThreads) {
        const int q = item / 2 % 4, grp = item / 8 % kGroups, cv = item / (8 * kGroups) * 2 + item % 2, c = cv * 8;
        const int toks[4] = {2 * q, 2 * q + 1, 8 + 2 * q, 9 + 2 * q};
        float y[4][8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int t = t0 + 16 * grp + toks[k];
          if (t < s.seq_kv && c < s.head_dim) {
            load8(y[k], v_head + static_cast<int64_t>(t) * a.v.token_stride + c);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) y[k][e] = 0.f;
          }
        }
        uint8_t* dst = static_cast<uint8_t*>(a.buf.v) + (static_cast<int64_t>(bh) * kDim + c) * s.padded_kv + t0 +
                       16 * grp + 4 * q;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float inv = inv_scale(c + e < s.head_dim ? v_amax[c + e] : 0.f, kInt8 ? kInt8Max : kFp8Max);
          uint32_t word;
          if constexpr (kInt8) {
            word = pack_low_bytes(int8_in_low_byte(y[0][e], inv), int8_in_low_byte(y[1][e], inv),
                                  int8_in_low_byte(y[2][e], inv), int8_in_low_byte(y[3][e], inv));
          } else {
            word = pack_e4m3x2(y[0][e] * inv, y[1][e] * inv) |
                   (static_cast<uint32_t>(pack_e4m3x2(y[2][e] * inv, y[3][e] * inv)) << 16);
          }
          *reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(e) * s.padded_kv) = word;
        }
      }
    };
    if (a.pv == PvType::kInt8) {
      write_v(std::true_type{});
    } else {
      write_v(std::false_type{});
    }
  } else {  // FP16 V, row-major
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = threadIdx.x + i * kThreads, tok = idx / kVecs, cv = idx % kVecs;
      const int t = t0 + tok, c = cv * 8;
      float y[8] = {};
      if (t < s.seq_kv && c < s.head_dim) load8(y, v_head + static_cast<int64_t>(t) * a.v.token_stride + c);
      uint4 out;
      out.x = pack_half2(y[0], y[1]);
      out.y = pack_half2(y[2], y[3]);
      out.z = pack_half2(y[4], y[5]);
      out.w = pack_half2(y[6], y[7]);
      *reinterpret_cast<uint4*>(static_cast<__half*>(a.buf.v) +
                                (static_cast<int64_t>(bh) * s.padded_kv + t0 + tok) * kDim + c) = out;
    }
  }
}

// One CTA of kWarps warps, each owning a 16-row slice: lane (g, quad) holds rows g and g+8 and every
// fourth 8-channel vector. With kBits == 4 the CTA is one Q block (the attention kernel's block_q rows):
// its mean q̄ over the valid rows is subtracted first (Q smoothing) and written in INT8 for ΔS.
template <typename T, int kDim, int kWarpQ, int kBits, int kWarps>
__device__ __forceinline__ void quant_q_block(const AttentionArgs& a, int block, int bh, int num_blocks) {
  static_assert(kWarpQ == 16, "one lane quad per row pair: rows g and g+8 of a 16-row warp slice");
  constexpr int kVecsPerLane = kDim / 8 / 4;  // the 4 lanes of a quad split a row's vectors
  constexpr bool kSmooth = kBits == 4;
  const Shape& s = a.shape;
  const int b = bh / s.heads_q, h = bh % s.heads_q;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int slice = block * kWarps + warp;
  if constexpr (!kSmooth) {
    if (slice * kWarpQ >= s.padded_q) return;  // a CTA of the merged launch past the last row (no barriers here)
  }
  const int g = lane / 4, quad = lane % 4;
  const int rows[2] = {slice * kWarpQ + g, slice * kWarpQ + g + 8};
  const float sm_scale_log2 = a.sm_scale * kLog2e;

  // The vectors stay packed as loaded (half the registers of floats) and are unpacked in each pass over
  // them; padded rows and channels hold zeros.
  uint4 raw[2][kVecsPerLane];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int c = (quad + 4 * i) * 8;
      raw[r][i] = rows[r] < s.seq_q && c < s.head_dim
                      ? load16_last_use(static_cast<const T*>(a.q.ptr) + b * a.q.batch_stride + h * a.q.head_stride +
                                        static_cast<int64_t>(rows[r]) * a.q.token_stride + c)
                      : kZero16;
    }
  }

  if (a.buf.q_dot_kmean != nullptr) {  // q·k̄ of the unsmoothed rows, for the LSE
    const int hkv = h / (s.heads_q / s.heads_kv);
    const float* k_sum = a.buf.k_sum + (b * s.heads_kv + hkv) * s.padded_dim;
    const float inv_n = s.seq_kv > 0 ? 1.f / static_cast<float>(s.seq_kv) : 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kVecsPerLane; ++i) {
        const int c = (quad + 4 * i) * 8;
        float x[8];
        unpack8<T>(x, raw[r][i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += c < s.head_dim ? x[e] * (k_sum[c + e] * inv_n) : 0.f;
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      if (quad == 0 && rows[r] < s.seq_q) a.buf.q_dot_kmean[static_cast<int64_t>(bh) * s.seq_q + rows[r]] = dot;
    }
  }

  // Row r's vector i as floats, less the block mean q̄ with Q smoothing (valid rows only: padded rows stay 0).
  __shared__ float q_sum[kSmooth ? kDim : 1];
  float inv_rows = 0.f;
  auto value = [&](float (&x)[8], int r, int i) {
    launder(raw[r][i]);
    unpack8<T>(x, raw[r][i]);
    if constexpr (kSmooth) {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] -= rows[r] < s.seq_q ? q_sum[(quad + 4 * i) * 8 + e] * inv_rows : 0.f;
    }
  };

  if constexpr (kSmooth) {
    // Column sums: over the warp's rows by shuffles, then over the warps by one thread per channel (a float
    // atomicAdd on shared memory would be a compare-and-swap loop, kWarps deep per address).
    __shared__ float mean_amax;
    __shared__ float warp_sum[kWarps][kDim];
    if (threadIdx.x == 0) mean_amax = 0.f;
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      float x0[8], x1[8];
      unpack8<T>(x0, raw[0][i]);
      unpack8<T>(x1, raw[1][i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float v = x0[e] + x1[e];  // padded rows hold zeros
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) warp_sum[warp][(quad + 4 * i) * 8 + e] = v;
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < kDim; c += kWarps * kWarpSize) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sum[w][c];
      q_sum[c] = sum;
    }
    __syncthreads();
    const int q0 = block * kWarps * kWarpQ;
    inv_rows = 1.f / static_cast<float>(max(1, min(kWarps * kWarpQ, s.seq_q - q0)));
    // q̄ in INT8, one scale for the block: the A operand of the attention kernel's ΔS mma.
    for (int c = threadIdx.x; c < kDim; c += kWarps * kWarpSize) atomic_max_nonneg(&mean_amax, fabsf(q_sum[c] * inv_rows));
    __syncthreads();
    const int64_t qb = static_cast<int64_t>(bh) * num_blocks + block;
    const float mean_inv = inv_scale(mean_amax, kInt8Max);
    for (int c = threadIdx.x; c < kDim; c += kWarps * kWarpSize) {
      a.buf.q_mean[qb * kDim + c] = static_cast<int8_t>(quantize<127>(q_sum[c] * inv_rows, mean_inv));
    }
    if (threadIdx.x == 0) a.buf.q_mean_scale[qb] = mean_amax / kInt8Max * sm_scale_log2;
  }

  float amax = 0.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      float x[8];
      value(x, r, i);
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x[e]));
    }
  }
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float inv = inv_scale(amax, qmax<kBits>());
  if (quad == 0) {
    a.buf.q_scale[(static_cast<int64_t>(bh) * (s.padded_q / kWarpQ) + slice) * kRowGroups + g] =
        amax / qmax<kBits>() * sm_scale_log2;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      float x[8];
      value(x, r, i);
      store_packed<kBits>(a.buf.q + (static_cast<int64_t>(bh) * s.padded_q + rows[r]) * (kDim * kBits / 8) +
                              (quad + 4 * i) * kBits,
                          x, inv);
    }
  }
}

template <typename T, int kDim, int kBlockK, int kBits>
__global__ void __launch_bounds__(kThreads) quant_kv_kernel(AttentionArgs a) {
  quant_kv_block<T, kDim, kBlockK, kBits>(a, blockIdx.x, blockIdx.y);
}

template <typename T, int kDim, int kWarpQ, int kBits, int kWarps>
__global__ void __launch_bounds__(kWarps* kWarpSize) quant_q_kernel(AttentionArgs a) {
  quant_q_block<T, kDim, kWarpQ, kBits, kWarps>(a, blockIdx.x, blockIdx.y, gridDim.x);
}

// INT8: K/V and Q in one launch (no dependency between them), a 1-D grid of the K/V CTAs and then the Q
// CTAs of kThreads / kWarpSize warp slices each: one launch less, and each part's tail overlaps the other.
constexpr int kQWarpsMerged = kThreads / kWarpSize;
// The Q CTAs per head (the last may run past padded_q: its extra warps return at once).
__host__ __device__ __forceinline__ int kvq_q_blocks(const Shape& s) {
  return (s.padded_q / kSm80WarpQ + kQWarpsMerged - 1) / kQWarpsMerged;
}

// The kLocalStats variant serves the wgmma family only (launch_quantize), which runs on sm_90 only: elsewhere
// it is compiled as a trap, not as dead code in every architecture's binary.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
constexpr bool kLocalStatsCompiled = false;
#else
constexpr bool kLocalStatsCompiled = true;
#endif

template <typename T, int kDim, int kBlockK, bool kLocalStats>
__global__ void __launch_bounds__(kThreads) quant_kvq_kernel(AttentionArgs a) {
  if constexpr (kLocalStats && !kLocalStatsCompiled) {
    __trap();
  } else {
    const Shape& s = a.shape;
    const int kv_blocks = s.padded_kv / kBlockK, kv_ctas = kv_blocks * s.batch * s.heads_kv;
    const int cta = blockIdx.x;
    if (cta < kv_ctas) {
      quant_kv_block<T, kDim, kBlockK, 8, kLocalStats>(a, cta % kv_blocks, cta / kv_blocks);
    } else {
      const int q_blocks = kvq_q_blocks(s);
      quant_q_block<T, kDim, kSm80WarpQ, 8, kQWarpsMerged>(a, (cta - kv_ctas) % q_blocks,
                                                           (cta - kv_ctas) / q_blocks, q_blocks);
    }
  }
}

template <typename T, int kDim, int kBlockK, bool kLocalStats = false>
void launch_kvq(const AttentionArgs& a, cudaStream_t stream) {
  const Shape& s = a.shape;
  const int64_t kv_ctas = static_cast<int64_t>(s.padded_kv / kBlockK) * s.batch * s.heads_kv;
  const int64_t q_blocks = kvq_q_blocks(s);
  const int64_t ctas = kv_ctas + q_blocks * s.batch * s.heads_q;
  quant_kvq_kernel<T, kDim, kBlockK, kLocalStats><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
}

template <typename T, int kDim>
void launch_typed(const AttentionArgs& a, cudaStream_t stream, bool local_stats) {
  const Shape& s = a.shape;
  const int bh_kv = s.batch * s.heads_kv, bh_q = s.batch * s.heads_q;
  if constexpr (kDim <= 128) {  // the wgmma kernel's 128-key groups (head dims 64 and 128 only)
    if (local_stats) return launch_kvq<T, kDim, kSm90BlockK, true>(a, stream);
  }
  if (s.seq_kv > 0) {
    kv_stats_kernel<T><<<dim3(kv_stats_parts(s.seq_kv), bh_kv), kThreads, 0, stream>>>(a);
  }
  if (a.qk_bits == 8) {
    if constexpr (kDim <= 128) {
      if (s.block_k == kSm90BlockK) launch_kvq<T, kDim, kSm90BlockK>(a, stream);
    }
    if (s.block_k == kSm80BlockK) launch_kvq<T, kDim, kSm80BlockK>(a, stream);
  } else {  // INT4: the Q CTA is the attention kernel's Q block, whose mean Q smoothing removes
    constexpr int kBlockQ = sm80_block_q(kDim), kWarps = kBlockQ / kSm80WarpQ;
    quant_kv_kernel<T, kDim, kSm80BlockK, 4><<<dim3(s.padded_kv / kSm80BlockK, bh_kv), kThreads, 0, stream>>>(a);
    quant_q_kernel<T, kDim, kSm80WarpQ, 4, kWarps>
        <<<dim3(s.padded_q / kBlockQ, bh_q), kWarps * kWarpSize, 0, stream>>>(a);
  }
}

}  // namespace

cudaError_t launch_quantize(const AttentionArgs& a, cudaStream_t stream) {
  const Shape& s = a.shape;
  // K/V of one wgmma K block (cross attention over up to 128 text tokens), no LSE (its q·k̄ reads k_sum), no
  // split tile: quant_kvq alone, its K/V CTA taking the statistics over its own tokens, one launch where
  // there were three operations. H100, SDXL's cross attention: 40.4 → 36.3 µs at 64×64 and 31.2 → 26.4 at
  // 32×32 in CUDA graphs, host time 40 → 31 µs a call, outputs bit for bit the same (hopper notes, q19).
  const bool local_stats = a.qk_bits == 8 && s.block_k == kSm90BlockK && s.padded_kv == kSm90BlockK &&
                           s.seq_kv > 0 && s.padded_dim <= 128 && a.pv != PvType::kFp16 &&
                           a.buf.q_dot_kmean == nullptr && a.num_split_counters == 0;
  if (!local_stats) {
    // k_sum, v_amax, the split counters and kv_stats's arrival counters are one block of memory (params.h):
    // one memset clears them.
    const size_t dim_bytes = static_cast<size_t>(s.batch) * s.heads_kv * s.padded_dim * sizeof(float);
    const size_t counter_bytes =
        (static_cast<size_t>(a.num_split_counters) + static_cast<size_t>(s.batch) * s.heads_kv) * sizeof(int);
    const cudaError_t err = cudaMemsetAsync(a.buf.k_sum, 0, 2 * dim_bytes + counter_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const bool bf16 = a.dtype == DType::kBFloat16;
  if (s.padded_dim == 64) {
    bf16 ? launch_typed<__nv_bfloat16, 64>(a, stream, local_stats)
         : launch_typed<__half, 64>(a, stream, local_stats);
  } else if (s.padded_dim == 128) {
    bf16 ? launch_typed<__nv_bfloat16, 128>(a, stream, local_stats)
         : launch_typed<__half, 128>(a, stream, local_stats);
  } else if (s.padded_dim == 256) {
    bf16 ? launch_typed<__nv_bfloat16, 256>(a, stream, local_stats)
         : launch_typed<__half, 256>(a, stream, local_stats);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace comfy_sage
