// Online softmax in base 2 over the rows a lane holds in an m16n8 accumulator.
//
// A warp owns 16 query rows; lane (g = lane/4, t = lane%4) holds rows g and g+8 ("halves" 0 and 1) and,
// of every 8-key n-tile, keys 2t and 2t+1. A row's statistics are reduced across the 4 lanes of a quad.
// Rows that have seen no visible key keep m = -inf and use 0 as their reference, so every exp2 is of
// -inf (giving 0) and nothing becomes NaN; such rows end with l = 0 and are written as 0.
#pragma once


#include "../common/constants.cuh"
#include "../common/ptx.cuh"
#include "params.h"

namespace comfy_sage {

// kIntegerMax (INT8 P·V): the running max is rounded up to an integer, so that alpha is 2^-shift and the
// int32 O accumulator rescales by an arithmetic right shift (the reference's floor; shift capped at 31, which
// leaves 0 or -1 of any |O| < 2^31, as does the floor of O · 2^-k for every k ≥ 31).
// The offset every exponent gets, so that P̃ = exp2(S − m + offset) lands in [0, 448] for FP8 P·V, in
// [0, p_max] for INT8 (int8_p_max) and in [0, 1] for FP16.
template <PvType kPv>
__device__ __forceinline__ float p_exp_offset(const Shape& s) {
  if constexpr (kPv == PvType::kInt8) return log2f(static_cast<float>(int8_p_max(s.seq_kv)));
  return kPv == PvType::kFp8 ? kLog2Fp8Max : 0.f;
}

template <int kTiles, bool kIntegerMax = false>
struct OnlineSoftmax {
  static constexpr int kWays = kTiles >= 2 ? 2 : kTiles;  // independent chains in the row max and sum

  float m[2] = {-kInf, -kInf};  // running row max (log2 domain)
  float l[2] = {0.f, 0.f};                      // running row sum of P̃, this lane's keys only
  float alpha[2] = {1.f, 1.f};                  // the last step's rescale factor exp2(m_old − m_new)
  int shift[2] = {0, 0};                        // kIntegerMax: the last step's m_new − m_old, at most 31

  // Turns one K block's unscaled scores `s` (the log2-domain score is s·scale, scale > 0) into P̃ in place,
  // rescales `o` by alpha = exp2(m_old − m_new) and adds the block's row sums. `offset` is added to every exponent
  // (log2(448) for FP8 P, 0 for FP16 P). A lane's max is taken before scaling (scale > 0 keeps the order
  // within the lane), so each exponent costs one FFMA.
  template <int kOTiles>
  __device__ __forceinline__ void step(float (&s)[kTiles][4], float (&o)[kOTiles][4], float scale, float offset) {
    scores(s, scale, offset);
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e >> 1];
    }
  }

  // `step` without the rescale of o: the caller applies `alpha` itself (the wgmma kernel folds it into the
  // addition of the previous block's P̃·V). kSumFromFirst: as for the overload below.
  template <bool kSumFromFirst = false>
  __device__ __forceinline__ void scores(float (&s)[kTiles][4], float scale, float offset) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_scores<false, kSumFromFirst>(s, half, lane_max(s, half), scale, offset);
    }
  }
  // `scores` for a caller that has each row's maximum over this lane's keys (unscaled) already. kSeen: every
  // row has a visible key in this block (no masked key at all), so no new row max is -inf. kSumFromFirst:
  // each row-sum chain starts from its first exponential rather than from 0 + it, the same sums (no
  // exponential is -0) with one FADD fewer a chain: the wgmma kernel's in-place INT8 loop gained 0.5-1% with
  // it (hopper notes st2), while its head-dim-64 INT8 loop lost 6-10% (st7), so only the former asks for it.
  template <bool kSeen = false, bool kSumFromFirst = false>
  __device__ __forceinline__ void scores(float (&s)[kTiles][4], const float (&lane_max)[2], float scale,
                                         float offset) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_scores<kSeen, kSumFromFirst>(s, half, lane_max[half], scale, offset);
    }
  }

  // The maximum of row `half` over this lane's keys, as a tree of kWays independent chains: a single chain of
  // kTiles dependent FMNMX leaves the warp waiting on each one's latency (few warps per scheduler hide it).
  __device__ __forceinline__ static float lane_max(const float (&s)[kTiles][4], int half) {
    float part[kWays];
#pragma unroll
    for (int w = 0; w < kWays; ++w) part[w] = -kInf;
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      part[n % kWays] = fmaxf(part[n % kWays], fmaxf(s[n][2 * half], s[n][2 * half + 1]));
    }
    return combine_max(part);
  }

  // Row `half` given `mx`, its maximum over this lane's keys: the quad's maximum, the rescale and the
  // exponentials, and the row sum (again as kWays chains).
  template <bool kSeen = false, bool kSumFromFirst = false>
  __device__ __forceinline__ void row_scores(float (&s)[kTiles][4], int half, float mx, float scale, float offset) {
    float part[kWays];
    // Each lane of the quad has its own K scale: compare scaled values across lanes. kIntegerMax rounds
    // up here and in `base` below, so that no exponent exceeds `offset` even where the logits are so large
    // that a float's step is above 1: P̃ must stay within the byte INT8 P·V packs it into.
    mx = kIntegerMax ? __fmul_ru(mx, scale) : mx * scale;
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[half], kIntegerMax ? ceilf(mx) : mx);
    const float m_use = kSeen || m_new != -kInf ? m_new : 0.f;
    float alpha;
    if constexpr (kIntegerMax) {
      // The maxima are integers, so alpha = 2^-gap is built from its exponent bits, and neither it nor the
      // shift takes the special-function unit the exponentials wait on (a MUFU and an F2I per row and
      // block). gap = m_new - m_old is a whole number, +inf where m_old = -inf and NaN where both are:
      // fminf makes those 127 (alpha 0; O is still 0 there), and adding kRoundingBias puts it in the low
      // bits of a float's word.
      const int gap = __float_as_int(fminf(m_new - m[half], 127.f) + kRoundingBias) - kRoundingBiasBits;
      alpha = __int_as_float((127 - gap) << 23);
      shift[half] = min(gap, 31);
    } else {
      alpha = fast_exp2(m[half] - m_use);
    }
    this->alpha[half] = alpha;
    const float base = kIntegerMax ? __fsub_ru(m_use, offset) : m_use - offset;
    // (kSumFromFirst: see `scores`. FP8's head-dim-64 loop put its exponentials inside its turn with it,
    // scripts/sass_schedule.py.)
#pragma unroll
    for (int w = 0; w < kWays; ++w) part[w] = 0.f;
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[n][e] = fast_exp2(fmaf(s[n][e], scale, -base));
        if (kSumFromFirst && n < kWays && e == 2 * half) {
          part[n] = s[n][e];
        } else {
          part[n % kWays] += s[n][e];
        }
      }
    }
    const float sum = combine_sum(part);
    l[half] = l[half] * alpha + sum;
    m[half] = m_new;
  }

  __device__ __forceinline__ static float combine_max(const float (&p)[kWays]) {
    if constexpr (kWays == 4) return fmaxf(fmaxf(p[0], p[1]), fmaxf(p[2], p[3]));
    float r = p[0];
#pragma unroll
    for (int w = 1; w < kWays; ++w) r = fmaxf(r, p[w]);
    return r;
  }
  __device__ __forceinline__ static float combine_sum(const float (&p)[kWays]) {
    if constexpr (kWays == 4) return (p[0] + p[1]) + (p[2] + p[3]);
    float r = p[0];
#pragma unroll
    for (int w = 1; w < kWays; ++w) r += p[w];
    return r;
  }

  // The row sums over all 4 lanes of the quad (call once, after the last block).
  __device__ __forceinline__ void reduce_sums() {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
      l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
    }
  }

  // Natural-log LSE of row `half`, given the exponent offset used in `step`; -inf where no key was seen.
  __device__ __forceinline__ float lse(int half, float offset) const {
    if (!(l[half] > 0.f)) return -kInf;
    return (m[half] + log2f(l[half]) - offset) * kLn2;
  }
};

}  // namespace comfy_sage
