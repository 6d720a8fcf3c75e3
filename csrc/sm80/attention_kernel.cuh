// The mma.sync attention kernel (Ampere, Ada, consumer Blackwell; also runs on Hopper).
//
// One CTA = one (batch, q head, block of kSm80BlockQ = 128 query rows); 8 warps, each owning 16 rows.
// Per K block of kSm80BlockK = 64 keys (double-buffered with cp.async):
//   S = Q̂·K̂ᵀ on INT8 (m16n8k32) or INT4 (m16n8k64) tensor cores, dequantized with one multiply: every
//   element a lane holds shares one Q scale (its rows g, g+8) and one K scale (its columns 2t, 2t+1 of
//   each n-tile); INT4 adds Q smoothing's ΔS = q̄·K'ᵀ (one row per CTA, see below);
//   masking (key padding, bottom-right causal, and with kKeyBias a caller's key mask: a per-key bias staged
//   through shared memory with each K block, added only in the blocks whose flag says they have one, so the
//   others run the plain kernel's code), online softmax in base 2 (softmax.cuh);
//   O += P̃·V: FP8 (m16n8k32, P̃ packed straight from the S registers thanks to V's token permutation, each
//   block's product in a fresh accumulator added into fp32: the two-level accumulation), INT8 (m16n8k32
//   u8·s8, the same packing and V layout, accumulated exactly in int32 across blocks: the integer row max
//   makes each rescale a right shift, softmax.cuh) or FP16 (m16n8k16, fp32 accumulate).
// Epilogue: O / l (· δV per channel for FP8 and INT8), rows that saw no key written as 0, optional LSE.
//
// Shared memory rows are padded by 16 bytes so the 8 row addresses of every ldmatrix hit distinct banks.
//
// INT4 Q smoothing: Q' = Q − q̄ per Q block (the CTA's rows), so S = Q̂'·K̂ᵀ + ΔS with ΔS = q̄·K'ᵀ, one value
// per key for the whole CTA. It is computed per K block on INT8 tensor cores from q̄ in INT8 (one scale per
// block) and K' in INT8 (the same per-thread groups as the INT4 K): an A fragment whose 16 rows all hold q̄
// gives every lane ΔS for exactly its own columns. Warp w computes n-tile w and shares it through shared
// memory. Using INT8 K' here, not the INT4 one, is what keeps K's INT4 error from meeting q̄'s outliers.
#pragma once

#include <cuda_runtime.h>

#include "../attention/epilogue.cuh"
#include "../attention/params.h"
#include "../attention/softmax.cuh"
#include "../attention/tiles.cuh"
#include "../common/constants.cuh"
#include "../common/ptx.cuh"
#include "../common/vec.cuh"

namespace comfy_sage {

template <int kQkBits, int kDim, PvType kPv, bool kKeyBias = false>
struct Sm80Traits {
  // Head dim 256 halves the Q block (4 warps) so the tiles still fit 99 KB of shared memory.
  static constexpr int kBlockQ = sm80_block_q(kDim);
  static constexpr int kWarpQ = kSm80WarpQ, kBlockK = kSm80BlockK;
  static constexpr int kWarps = kBlockQ / kWarpQ;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kPad = 16;
  static constexpr int kQkBytes = kDim * kQkBits / 8;                      // bytes of a quantized Q/K row
  static constexpr int kQkRow = kQkBytes + kPad;                           // bytes per Q/K smem row
  static constexpr bool kSmoothQ = kQkBits == 4;                           // INT4 needs Q smoothing
  static constexpr int kK8Row = kDim + kPad;                               // INT8 K' row (ΔS), INT4 only
  static constexpr bool kV8 = kPv != PvType::kFp16;                      // 8-bit V^T (FP8 or INT8)
  static constexpr int kVRow = kV8 ? kBlockK + kPad : 2 * kDim + kPad;     // 8-bit: a channel; FP16: a token
  static constexpr int kVRows = kV8 ? kDim : kBlockK;
  static constexpr int kQBytes = kBlockQ * kQkRow;
  static constexpr int kKBytes = kBlockK * kQkRow + (kSmoothQ ? kBlockK * kK8Row : 0);
  static constexpr int kVBytes = kVRows * kVRow;
  // The K block's key bias (float32) and 16 bytes of flags holding its own (AttentionArgs::key_bias).
  static constexpr int kBiasBytes = kKeyBias ? kBlockK * 4 + 16 : 0;
  static_assert(!kKeyBias || kQkBits == 8, "key masks are compiled for INT8 Q·Kᵀ only");
  // K/V double-buffered where two stages fit 99 KB; otherwise (head dim 256 but INT8 + 8-bit P·V) one stage.
  static constexpr int kStages = kQBytes + 2 * (kKBytes + kVBytes + kBiasBytes) + kBlockK * 4 <= 99 * 1024 ? 2 : 1;
  static constexpr int kDeltaBytes = kSmoothQ ? kBlockK * 4 : 0;  // ΔS of the current K block
  // Head dim 256: a lane's 128 fp32 O accumulators leave too few of the 255 registers for the rest (ptxas
  // spilled 48-108 bytes), so the kernel takes register-lean forms there (kLean's uses); the smaller head
  // dims keep the forms, and the SASS, their speed was measured with.
  static constexpr bool kLean = kDim > 128;
  // The tile loads' lean form with one stage only: the two-stage variant (INT8 + FP8 P·V) has no spills
  // without it on sm_80-89 and sm_120, and with it ptxas (nvcc 13.0) spills more: 116 bytes against 4 on
  // sm_90 (in the P·V, where FP8 mma.sync is emulated), 12 against 0 on sm_120.
  static constexpr bool kLeanLoads = kLean && kStages == 1;
  static constexpr int kQMeanBytes = kSmoothQ && kLean ? kDim : 0;  // INT4's q̄ in INT8, for ldmatrix
  static constexpr int kQMeanOffset = kQBytes + kStages * (kKBytes + kVBytes) + kDeltaBytes;
  static constexpr int kBiasOffset = kQMeanOffset + kQMeanBytes;  // kStages stages of kBiasBytes
  static constexpr int kSmemBytes = kBiasOffset + kStages * kBiasBytes;
  static constexpr int kSTiles = kBlockK / 8;  // n-tiles of S per warp
  static constexpr int kOTiles = kDim / 8;     // n-tiles of O per warp
  // Two CTAs per SM (16 warps) hide the mma.sync and exp2 latencies that one CTA's 8 warps leave exposed
  // (+20% measured on the H100, with the few bytes of spills the 128-register cap costs). sm_86/89/120 have
  // 100 KB of shared memory and fit one CTA; sm_80 would fit two but spills up to 60 bytes under the cap
  // and cannot be measured here, so it keeps one CTA and no spills.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
  static constexpr int kMinBlocks = 2;
#else
  static constexpr int kMinBlocks = 1;
#endif
  // The register cap that follows (a kernel takes __maxnreg__ or __launch_bounds__, not both). With one
  // CTA per SM, 232 rather than 255: ptxas spills at 255 for INT8+FP8 D=128 on sm_89 and not at 232.
  static constexpr int kMaxRegs = kMinBlocks == 2 ? (65536 / (2 * kThreads) > 255 ? 255 : 65536 / (2 * kThreads))
                                                  : (kDim > 128 ? 255 : 232);
  static_assert(kSmemBytes <= 99 * 1024, "must fit the 99 KB a CTA may use on sm_86 and sm_89");
};

// Copies a kRows × kRowBytes tile (source rows `src_stride` bytes apart) into shared memory rows kDstRow
// bytes apart, 16 bytes per cp.async (a tile smaller than one copy per thread leaves the rest idle).
// kLean: the same copies, indexed without a division per copy. A thread's chunk column is the same in every
// copy (kThreads is a multiple of kChunks) and its row advances by kThreads / kChunks, so each address is
// one base plus a constant; dividing each copy's index leaves ptxas an address per copy (64 bits for the
// global ones), which it hoists out of the K loop and holds through it, or spills.
template <int kRows, int kRowBytes, int kDstRow, int kThreads, bool kLean = false>
__device__ __forceinline__ void load_tile(uint8_t* dst, const uint8_t* src, int64_t src_stride) {
  constexpr int kChunks = kRowBytes / 16, kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0 || kTotal < kThreads, "the tile must split evenly over the threads");
  if constexpr (kLean) {
    static_assert(kThreads % kChunks == 0, "a thread's chunk column must not change between copies");
    const int r0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
#pragma unroll
    for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
      const int r = r0 + i * (kThreads / kChunks);
      if (kTotal >= kThreads || threadIdx.x < kTotal) {
        cp_async_16(smem_addr(dst + r * kDstRow + c * 16), src + r * src_stride + c * 16);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
      const int idx = threadIdx.x + i * kThreads, r = idx / kChunks, c = idx % kChunks;
      if (kTotal >= kThreads || idx < kTotal) {
        cp_async_16(smem_addr(dst + r * kDstRow + c * 16), src + r * src_stride + c * 16);
      }
    }
  }
}

template <int kQkBits, int kDim, PvType kPv, bool kKeyBias = false>
__global__ void __maxnreg__((Sm80Traits<kQkBits, kDim, kPv, kKeyBias>::kMaxRegs))
    sm80_attention_kernel(const AttentionArgs a) {
  using Tr = Sm80Traits<kQkBits, kDim, kPv, kKeyBias>;
  constexpr bool kIntPv = kPv == PvType::kInt8;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* s_q = smem;
  auto s_k = [&](int stage) { return smem + Tr::kQBytes + stage * Tr::kKBytes; };
  auto s_k8 = [&](int stage) { return s_k(stage) + Tr::kBlockK * Tr::kQkRow; };  // INT4 only
  auto s_v = [&](int stage) { return smem + Tr::kQBytes + Tr::kStages * Tr::kKBytes + stage * Tr::kVBytes; };
  float* s_delta = reinterpret_cast<float*>(smem + Tr::kQBytes + Tr::kStages * (Tr::kKBytes + Tr::kVBytes));
  auto s_bias = [&](int stage) { return reinterpret_cast<float*>(smem + Tr::kBiasOffset + stage * Tr::kBiasBytes); };

  const Shape& s = a.shape;
  const int num_q_blocks = s.padded_q / Tr::kBlockQ;
  // Causal: the longest rows first, so the short tail of CTAs fills the gaps.
  const int q_block = a.causal ? num_q_blocks - 1 - blockIdx.x : blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / (s.heads_q / s.heads_kv);
  const int bhq = b * s.heads_q + hq, bhkv = b * s.heads_kv + hkv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int q0 = q_block * Tr::kBlockQ;
  const int diag = s.seq_kv - s.seq_q;  // key j is visible to row i iff j <= i + diag (causal)

  const int num_k_blocks = visible_k_blocks(s, a.causal, q0, Tr::kBlockQ, Tr::kBlockK);

  const int8_t* gq = a.buf.q + (static_cast<int64_t>(bhq) * s.padded_q + q0) * Tr::kQkBytes;
  const int8_t* gk = a.buf.k + static_cast<int64_t>(bhkv) * s.padded_kv * Tr::kQkBytes;
  const int8_t* gk8 = a.buf.k8 + static_cast<int64_t>(bhkv) * s.padded_kv * kDim;  // INT4 only
  const uint8_t* gv = static_cast<const uint8_t*>(a.buf.v) +
                      static_cast<int64_t>(bhkv) * s.padded_kv * kDim * (Tr::kV8 ? 1 : 2);
  const float* gbias = kKeyBias ? a.key_bias + b * a.key_bias_batch_stride : nullptr;
  const float* gbias_flags = kKeyBias ? gbias + a.key_bias_width : nullptr;  // one per K block: any bias ≠ 0
  auto s_bias_flags = [&](int stage) { return s_bias(stage) + Tr::kBlockK; };

  // ---- loads ----
  auto load_kv = [&](int kb, int stage) {
    load_tile<Tr::kBlockK, Tr::kQkBytes, Tr::kQkRow, Tr::kThreads, Tr::kLeanLoads>(
        s_k(stage), reinterpret_cast<const uint8_t*>(gk) + kb * Tr::kBlockK * Tr::kQkBytes, Tr::kQkBytes);
    if constexpr (Tr::kSmoothQ) {
      load_tile<Tr::kBlockK, kDim, Tr::kK8Row, Tr::kThreads, Tr::kLeanLoads>(
          s_k8(stage), reinterpret_cast<const uint8_t*>(gk8) + kb * Tr::kBlockK * kDim, kDim);
    }
    if constexpr (Tr::kV8) {  // V^T: kDim channel rows of kBlockK bytes, row stride padded_kv
      load_tile<kDim, Tr::kBlockK, Tr::kVRow, Tr::kThreads, Tr::kLeanLoads>(s_v(stage), gv + kb * Tr::kBlockK,
                                                                             s.padded_kv);
    } else {  // V: kBlockK token rows of 2·kDim bytes
      load_tile<Tr::kBlockK, 2 * kDim, Tr::kVRow, Tr::kThreads, Tr::kLeanLoads>(
          s_v(stage), gv + static_cast<int64_t>(kb) * Tr::kBlockK * kDim * 2, 2 * kDim);
    }
    if constexpr (kKeyBias) {  // padded with −inf to padded_kv: always in bounds; the flags padded to 4 as well
      load_tile<1, Tr::kBlockK * 4, Tr::kBlockK * 4, Tr::kThreads>(
          reinterpret_cast<uint8_t*>(s_bias(stage)), reinterpret_cast<const uint8_t*>(gbias + kb * Tr::kBlockK), 0);
      if (threadIdx.x == Tr::kThreads - 1) cp_async_16(smem_addr(s_bias_flags(stage)), gbias_flags + (kb & ~3));
    }
  };
  load_tile<Tr::kBlockQ, Tr::kQkBytes, Tr::kQkRow, Tr::kThreads, Tr::kLeanLoads>(
      s_q, reinterpret_cast<const uint8_t*>(gq), Tr::kQkBytes);
  if (num_k_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const float q_scale =
      a.buf.q_scale[(static_cast<int64_t>(bhq) * (s.padded_q / Tr::kWarpQ) + q0 / Tr::kWarpQ + warp) * kRowGroups + g];
  const float* k_scales = a.buf.k_scale + static_cast<int64_t>(bhkv) * (s.padded_kv / Tr::kBlockK) * kColGroups;

  // INT4: q̄ in INT8 as the A fragment of an mma whose 16 rows all hold q̄ (a0 = a1, a2 = a3). Held in
  // registers it takes 2·kDim/32 of them (the mma wants a0..a3 in four registers, so each value twice);
  // at head dim 256 those 32 do not fit, and ldmatrix rebuilds the fragment from shared memory per use.
  uint32_t qm[Tr::kSmoothQ && !Tr::kLean ? kDim / 32 : 1][2] = {};
  float qm_scale = 0.f;
  if constexpr (Tr::kSmoothQ) {
    const int64_t qb = static_cast<int64_t>(bhq) * (s.padded_q / Tr::kBlockQ) + q_block;
    if constexpr (Tr::kLean) {
      load_tile<1, kDim, kDim, Tr::kThreads, Tr::kLeanLoads>(
          smem + Tr::kQMeanOffset, reinterpret_cast<const uint8_t*>(a.buf.q_mean + qb * kDim), kDim);
      cp_async_commit();  // waited for with the first K block, before the first ΔS
    } else {
      const uint32_t* mean8 = reinterpret_cast<const uint32_t*>(a.buf.q_mean + qb * kDim);
#pragma unroll
      for (int kk = 0; kk < kDim / 32; ++kk) qm[kk][0] = mean8[kk * 8 + t], qm[kk][1] = mean8[kk * 8 + 4 + t];
    }
    qm_scale = a.buf.q_mean_scale[qb];
  }
  const float* k8_scales = a.buf.k8_scale + static_cast<int64_t>(bhkv) * (s.padded_kv / Tr::kBlockK) * kColGroups;

  float o[Tr::kOTiles][4] = {};
  int32_t oi[kIntPv ? Tr::kOTiles : 1][4] = {};  // INT8 P·V: the exact int32 O, whole rows
  OnlineSoftmax<Tr::kSTiles, kIntPv> softmax;
  const float exp_offset = p_exp_offset<kPv>(s);
  const uint32_t q_frag = smem_addr(s_q + (warp * Tr::kWarpQ + (lane & 15)) * Tr::kQkRow + (lane >> 4) * 16);
  // kLean: the lane's part of the K and V fragment addresses, so that each ldmatrix below is the stage's
  // base plus a constant. Written from the generic pointers, the addresses cost a register per n-tile or
  // per 32 bytes of K (16 for FP16 V), live through the block's products.
  uint32_t k_lane = 0, v_lane = 0;
  if constexpr (Tr::kLean) {
    k_lane = ((lane / 16) * 8 + (lane & 7)) * Tr::kQkRow + ((lane / 8) & 1) * 16;
    v_lane = Tr::kV8 ? (lane & 7) * Tr::kVRow + (lane >> 3) * 16
                    : (((lane >> 3) & 1) * 8 + (lane & 7)) * Tr::kVRow + (lane >> 4) * 16;
  }

  for (int kb = 0; kb < num_k_blocks; ++kb) {
    const int stage = Tr::kStages == 2 ? kb & 1 : 0;
    if (Tr::kStages == 2 && kb + 1 < num_k_blocks) {
      load_kv(kb + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q̂·K̂ᵀ (Q fragments re-read from shared memory each block: registers are the scarcer resource)
    int32_t acc[Tr::kSTiles][4] = {};
#pragma unroll
    for (int kk = 0; kk < Tr::kQkBytes / 32; ++kk) {  // 32 bytes: k = 32 INT8 or 64 INT4 values
      uint32_t qa[4];
      ldmatrix_x4(qa, q_frag + kk * 32);
#pragma unroll
      for (int p = 0; p < Tr::kSTiles / 2; ++p) {
        uint32_t kf[4];
        if constexpr (Tr::kLean) {
          ldmatrix_x4(kf, smem_addr(s_k(stage)) + k_lane + 16 * p * Tr::kQkRow + kk * 32);
        } else {
          const int m = lane / 8;
          ldmatrix_x4(kf, smem_addr(s_k(stage) + (16 * p + (m / 2) * 8 + (lane & 7)) * Tr::kQkRow + kk * 32 +
                                    (m & 1) * 16));
        }
        if constexpr (kQkBits == 8) {
          mma_s8(acc[2 * p], qa, kf[0], kf[1]);
          mma_s8(acc[2 * p + 1], qa, kf[2], kf[3]);
        } else {
          mma_s4(acc[2 * p], qa, kf[0], kf[1]);
          mma_s4(acc[2 * p + 1], qa, kf[2], kf[3]);
        }
      }
    }
    if constexpr (Tr::kSmoothQ) {  // ΔS = q̄·K'ᵀ for this block's keys, into shared memory
      const float k8_scale = k8_scales[kb * kColGroups + t];
      for (int n = warp; n < Tr::kSTiles; n += Tr::kWarps) {
        int32_t d[4] = {};
#pragma unroll
        for (int kk = 0; kk < kDim / 32; kk += 2) {
          uint32_t kf[4];  // keys 8n..8n+7; bytes kk*32.. (b0, b1) and (kk+1)*32.. (b0, b1)
          ldmatrix_x4(kf, smem_addr(s_k8(stage) + (8 * n + (lane & 7)) * Tr::kK8Row + kk * 32 + (lane >> 3) * 16));
          if constexpr (Tr::kLean) {
            // Matrices 0, 1 have all 8 rows at q̄ bytes kk*32.., 2, 3 at kk*32 + 16..: every lane gets
            // words kk*8 + t, kk*8 + t, kk*8 + 4 + t, kk*8 + 4 + t, the register form's fragment.
            uint32_t q0a[4], q1a[4];
            ldmatrix_x4(q0a, smem_addr(smem + Tr::kQMeanOffset + kk * 32 + (lane >> 4) * 16));
            ldmatrix_x4(q1a, smem_addr(smem + Tr::kQMeanOffset + (kk + 1) * 32 + (lane >> 4) * 16));
            mma_s8(d, q0a, kf[0], kf[1]);
            mma_s8(d, q1a, kf[2], kf[3]);
          } else {
            const uint32_t q0a[4] = {qm[kk][0], qm[kk][0], qm[kk][1], qm[kk][1]};
            const uint32_t q1a[4] = {qm[kk + 1][0], qm[kk + 1][0], qm[kk + 1][1], qm[kk + 1][1]};
            mma_s8(d, q0a, kf[0], kf[1]);
            mma_s8(d, q1a, kf[2], kf[3]);
          }
        }
        if (g == 0) {
          s_delta[8 * n + 2 * t] = static_cast<float>(d[0]) * qm_scale * k8_scale;
          s_delta[8 * n + 2 * t + 1] = static_cast<float>(d[1]) * qm_scale * k8_scale;
        }
      }
      __syncthreads();
    }

    // Dequantize (one scale per lane) and mask. The scale is kept positive so that masked -inf stays -inf.
    const float scale = fmaxf(q_scale * k_scales[kb * kColGroups + t], kMinScale);
    const int key0 = kb * Tr::kBlockK;
    const bool needs_mask = key0 + Tr::kBlockK > s.seq_kv || (a.causal && key0 + Tr::kBlockK - 1 > q0 + diag);
    float sf[Tr::kSTiles][4];
#pragma unroll
    for (int n = 0; n < Tr::kSTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sf[n][e] = Tr::kSmoothQ ? fmaf(static_cast<float>(acc[n][e]), scale, s_delta[8 * n + 2 * t + (e & 1)])
                                : static_cast<float>(acc[n][e]);
      }
    }
    const bool biased = kKeyBias && s_bias_flags(stage)[kb & 3] != 0.f;
    if (biased) {  // the scores are unscaled here: the bias enters divided by the scale
      const float inv_scale = __frcp_rn(scale);
#pragma unroll
      for (int n = 0; n < Tr::kSTiles; ++n) {
        const float2 bias = *reinterpret_cast<const float2*>(s_bias(stage) + 8 * n + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) sf[n][e] = fmaf((e & 1) ? bias.y : bias.x, inv_scale, sf[n][e]);
      }
    }
    if (needs_mask) {
#pragma unroll
      for (int n = 0; n < Tr::kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * t + (e & 1);
          const int row = q0 + warp * Tr::kWarpQ + g + (e >> 1) * 8;
          if (key >= s.seq_kv || (a.causal && key > row + diag)) sf[n][e] = -kInf;
        }
      }
    }

    const float sm_scale = Tr::kSmoothQ ? 1.f : scale;  // INT4 scores are already scaled
    if constexpr (kIntPv) {  // O relative to the new integer row max: shifted where it rose
      softmax.scores(sf, sm_scale, exp_offset);
      // Late in a long row most K blocks raise none of the warp's 16 row maxima; at head dim 128 skipping their
      // shifts pays (H100, N = 16k: +7%), at 64 the vote costs more than it saves (SDXL: -4%), and at 256 the
      // branch makes ptxas spill (112 bytes on sm_80-89).
      if (kDim != 128 || __any_sync(0xffffffffu, (softmax.shift[0] | softmax.shift[1]) != 0)) {
#pragma unroll
        for (int n = 0; n < Tr::kOTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) oi[n][e] >>= softmax.shift[e >> 1];
        }
      }
    } else {
      softmax.step(sf, o, sm_scale, exp_offset);
    }

    // O += P̃·V
    if constexpr (Tr::kV8) {
      uint32_t pa[2][4];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // a0: tiles 4c,4c+1 row g; a1: row g+8; a2, a3: tiles 4c+2, 4c+3
          const int n = 4 * c + 2 * (r >> 1), e = 2 * (r & 1);
          if constexpr (kIntPv) {
            pa[c][r] = pack_u8x4_via_f16(sf[n][e], sf[n][e + 1], sf[n + 1][e], sf[n + 1][e + 1]);
          } else {
            pa[c][r] = pack_e4m3x2(sf[n][e], sf[n][e + 1]) |
                       (static_cast<uint32_t>(pack_e4m3x2(sf[n + 1][e], sf[n + 1][e + 1])) << 16);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < Tr::kOTiles; ++n) {
        uint32_t vf[4];
        if constexpr (Tr::kLean) {
          ldmatrix_x4(vf, smem_addr(s_v(stage)) + v_lane + n * 8 * Tr::kVRow);
        } else {
          ldmatrix_x4(vf, smem_addr(s_v(stage) + (n * 8 + (lane & 7)) * Tr::kVRow + (lane >> 3) * 16));
        }
        if constexpr (kIntPv) {
          mma_u8s8(oi[n], pa[0], vf[0], vf[1]);
          mma_u8s8(oi[n], pa[1], vf[2], vf[3]);
        } else {
          float blk[4] = {};
          mma_e4m3(blk, pa[0], vf[0], vf[1]);
          mma_e4m3(blk, pa[1], vf[2], vf[3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) o[n][e] += blk[e];
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < Tr::kBlockK / 16; ++c) {
        const uint32_t pa[4] = {pack_half2(sf[2 * c][0], sf[2 * c][1]), pack_half2(sf[2 * c][2], sf[2 * c][3]),
                                pack_half2(sf[2 * c + 1][0], sf[2 * c + 1][1]),
                                pack_half2(sf[2 * c + 1][2], sf[2 * c + 1][3])};
#pragma unroll
        for (int n = 0; n < Tr::kOTiles; n += 2) {
          uint32_t vf[4];
          if constexpr (Tr::kLean) {
            ldmatrix_x4_trans(vf, smem_addr(s_v(stage)) + v_lane + 16 * c * Tr::kVRow + n * 16);
          } else {
            const int token = 16 * c + ((lane >> 3) & 1) * 8 + (lane & 7);
            ldmatrix_x4_trans(vf, smem_addr(s_v(stage) + token * Tr::kVRow + (n * 8 + (lane >> 4) * 8) * 2));
          }
          mma_f16(o[n], pa, vf[0], vf[1]);
          mma_f16(o[n + 1], pa, vf[2], vf[3]);
        }
      }
    }
    __syncthreads();  // the stage just read is the next load's target
    if (Tr::kStages == 1 && kb + 1 < num_k_blocks) {
      load_kv(kb + 1, 0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();

  // ---- epilogue ----
  if constexpr (kIntPv) {
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] = static_cast<float>(oi[n][e]);
    }
  }
  store_rows<kPv>(a, softmax, o, q0 + warp * Tr::kWarpQ + g, b, hq, bhq, bhkv, t, exp_offset);
}

}  // namespace comfy_sage
