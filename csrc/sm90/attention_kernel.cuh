// The wgmma attention kernel (Hopper, sm_90a): INT8 Q·Kᵀ and FP8 or INT8 P·V on warpgroup tensor cores.
//
// One CTA = one (batch, q head, block of sm90_block_q: 192 query rows at head dim 128, 256 at 64 (192 with a
// key mask)), or a part of one along the keys when the tiles leave a short last wave (Sm90Split below); 4 or 5
// warpgroups:
//   warpgroup 0, the producer: one thread loads Q once and then K and V blocks of kSm90BlockK = 128 keys
//     through TMA into a ring of kStages shared-memory stages ("full" mbarriers complete on the bytes;
//     "empty" mbarriers count the consumer warps that are done with a stage). It gives its registers away
//     (setmaxnreg) to
//   warpgroups 1-3 (1-4 at head dim 64), the consumers, each owning 64 query rows. Per K block:
//     S = Q̂·K̂ᵀ: wgmma m64n128k32 s8 with both operands in shared memory (128- or 64-byte swizzle, as TMA
//       wrote them), dequantized with one multiply: a lane's elements share one Q scale (rows g, g+8 of its
//       warp's 16) and one K scale (its columns 2t, 2t+1 of every 8; the quantization uses 128-key groups);
//     masking (key padding, bottom-right causal, and with kKeyBias a caller's key mask as a per-key bias on
//       the scores; only in the blocks that need it: a key mask's flags say which, read a block ahead),
//       online softmax in base 2 (softmax.cuh);
//     O += P̃·V: P̃ in FP8 e4m3 or unsigned INT8 packed from the S registers in the order of the A fragment
//       (V's tokens are permuted by the quantization to match, as in the mma.sync kernel), written into the
//       consumer's shared-memory tile or, at head dim 64 (Sm90Traits::kPRegs), kept in registers; then wgmma
//       m64nDk32 with V^T in shared memory. FP8: each block's product in a fresh accumulator added into
//       fp32 O with the rescale in the same FFMA (two-level accumulation). INT8: one int32 accumulator for
//       the whole row, exact, rescaled by a right shift before each block's product (the integer row max
//       of softmax.cuh), converted to float once, in the epilogue.
//   Each consumer runs its blocks one after the other; the consumers interleave on the SM, one's
//   exponentials while another's matmuls run, and take turns at the tensor cores in a fixed order so that
//   they stay out of step. Three fit the register file at head dim 128 (160 registers each), four at 64
//   (112 each), only because a consumer never holds two blocks' accumulators at once; INT8 P·V at head dim
//   128 needs no fresh accumulator, and there a consumer's softmax of the next block runs while its P̃·V of
//   this one does. docs/hopper-notes.md has the designs tried and their timings.
// Epilogue: O / l · δV per channel, rows that saw no key written as 0, optional LSE; a part of a split tile
// writes its unnormalized O, row max and row sum instead, and the last part combines them.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../attention/epilogue.cuh"
#include "../attention/params.h"
#include "../attention/softmax.cuh"
#include "../attention/tiles.cuh"
#include "../common/constants.cuh"
#include "../common/ptx.cuh"
#include "../common/ptx_sm90.cuh"
#include "../common/vec.cuh"

namespace comfy_sage {

// The last, partial wave of tiles split along the keys. Every tile (B · Hq · padded_q / block_q of them, row
// block fastest) is the same work without the causal mask, and one CTA fills an SM, so CTAs run in waves of
// `sms`; when the last wave is short, its tiles run in `splits` parts of their K blocks each (CTAs
// split_from, split_from + 1, ... take the parts of tile split_from, then the next tile, ...), the parts'
// unnormalized O, row max and row sum go to AttentionArgs::split_partials, and the last part to finish a
// tile (an arrival counter per tile and consumer) combines them into the output.
// Two launches run such a plan: the whole tiles in the plain kernel (whose K loop is faster), which leaves
// the tiles from split_from to the split kernel, launched as its dependent so that its CTAs take the SMs
// the plain kernel's last wave frees (programmatic dependent launch); first_cta is then split_from.
struct Sm90Split {
  int split_from = 0;  // the first split tile (= the number of tiles when none is split)
  int splits = 1;      // parts per split tile
  int split_tiles = 0;
  int first_cta = 0;   // the split kernel's CTA 0 is CTA first_cta of the plan
  int64_t ctas() const { return split_from + static_cast<int64_t>(split_tiles) * splits; }
};
constexpr int kSm90MaxSplits = 8;
constexpr int kSm90MinBlocksPerPart = 2;  // each part still pays a CTA's start and the combine
// The split kernel's K loop measured 3-4% slower than the plain one at long sequences (same instructions,
// scheduled differently), so a launch splits only where that saves more: at least this fraction of the
// whole-tile time, (1 − 1 / splits) of one wave out of all the waves.
constexpr double kSm90MinSplitGain = 0.08;

inline Sm90Split sm90_split(const Shape& s, bool causal, int sms) {
  const int64_t tiles = static_cast<int64_t>(s.padded_q / sm90_block_q(s.padded_dim, s.key_mask)) * s.heads_q * s.batch;
  const int k_blocks = (s.seq_kv + kSm90BlockK - 1) / kSm90BlockK;
  const int64_t tail = sms > 0 ? tiles % sms : 0;
  Sm90Split plan;
  plan.split_from = static_cast<int>(tiles);
  if (causal || tail == 0) return plan;  // causal tiles differ in length: they run longest first, whole
  const int64_t splits = std::min<int64_t>({sms / tail, k_blocks / kSm90MinBlocksPerPart, kSm90MaxSplits});
  const int64_t waves = (tiles + sms - 1) / sms;
  if (splits < 2 || (1.0 - 1.0 / splits) / waves < kSm90MinSplitGain) return plan;
  plan.split_from = static_cast<int>(tiles - tail);
  plan.splits = static_cast<int>(splits);
  plan.split_tiles = static_cast<int>(tail);
  return plan;
}

// Kernel parameters: the three TMA descriptors must live in parameter space (__grid_constant__).
struct Sm90Params {
  CUtensorMap q_map;  // INT8 Q  [B·Hq][padded_q][D], box D × 128 × 1
  CUtensorMap k_map;  // INT8 K  [B·Hkv][padded_kv][D], box D × 128 × 1
  CUtensorMap v_map;  // 8-bit V^T [B·Hkv][D][padded_kv], box 128 × D × 1
  AttentionArgs args;
  Sm90Split split;
};

template <int kDim, PvType kPv, bool kKeyBias = false>
struct Sm90Traits {
  static constexpr bool kIntPv = kPv == PvType::kInt8;
  static_assert(kPv == PvType::kFp8 || kIntPv, "wgmma kernel: FP8 or INT8 P·V");
  // Consumer warpgroups: as many as the register file holds (see kConsumerRegs); each one more per SM
  // hides more of the others' latencies (docs/hopper-notes.md: h5, g6).
  // With a key mask, three at head dim 64 too: at 112 registers the masked body's bias and scores pushed the
  // O accumulator to local memory in every block (B1 H24 N16,384 with a text-padding mask: 1.32× the unmasked
  // time; with 160 registers 1.20×; docs/hopper-notes.md km2).
  static constexpr int kConsumers = sm90_consumers(kDim, kKeyBias);
  static constexpr int kWgRows = kSm90WgRows;  // query rows per consumer
  static constexpr int kBlockQ = sm90_block_q(kDim, kKeyBias);
  static constexpr int kBlockK = kSm90BlockK;
  static constexpr int kThreads = (kConsumers + 1) * 128;
  // K/V blocks in flight: 3 at head dim 128 (with INT8 P·V 1.5-2.6% faster than 4, with FP8 level to +1%;
  // 2 lost 10%), 4 at 64 (docs/hopper-notes.md, g7 and s1).
  static constexpr int kStages = kDim == 128 ? 3 : 4;
  static constexpr int kQBytes = kBlockQ * kDim;  // INT8 rows of kDim bytes
  static constexpr int kKBytes = kBlockK * kDim;
  static constexpr int kVBytes = kDim * kBlockK;  // 8-bit V^T: kDim rows of kBlockK bytes
  static constexpr int kPBytes = kWgRows * kBlockK;  // one consumer's 8-bit P̃ tile
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages);
  // A key mask's bias for each stage's K block, loaded with it, at head dim 64 (the masked body reads it from
  // shared memory: 1.5-5% faster there than 16 global loads a lane; at 128 1.3% slower at N = 16k, so there the
  // body loads it itself; docs/hopper-notes.md km5).
  static constexpr int kBiasBytes = kKeyBias && kDim == 64 ? kBlockK * 4 : 0;
  // +1024: the tiles need 1024-byte alignment (one 128-byte swizzle pattern), dynamic shared memory has less.
  static constexpr int kSmemBytes =
      kQBytes + kStages * (kKBytes + kVBytes) + kConsumers * kPBytes + kStages * kBiasBytes + kBarrierBytes + 1024;
  static constexpr int kSTiles = kBlockK / 8;  // 8-column tiles of S per row
  static constexpr int kOTiles = kDim / 8;
  // The consumers fit the register file only without keeping two K blocks' accumulators live at once, so
  // each consumer runs its block sequentially. At head dim 64 the fourth consumer's 112 registers spill a
  // few values in the K loop, and still gain 4-6% (g6).
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 4 ? 112 : 160;
  // P̃ straight from registers as P̃·V's A operand instead of through shared memory: no stores, fence or
  // barrier per block. At head dim 64 only (the registers are there), with FP8 P·V only (INT8's conversions
  // then spill and run 20% slower, i5), and only in the plain instantiation: the split one measured 11% slower
  // with it (docs/hopper-notes.md, g10), and level once its order was pinned (g19). Without the stores nothing
  // in memory orders a block's softmax before the turn's barrier, and after edits elsewhere ptxas has sunk it
  // below (the consumer then holds the turn through its exponentials: ~60% speed); scripts/sass_schedule.py
  // checks the order (g14).
  static constexpr bool kPRegs = kDim == 64 && !kIntPv;
  // The consumers take turns at the tensor cores (named barriers kRingBarrier + c, in a ring): each issues
  // one block's P̃·V, adds it into O and issues the next block's Q·Kᵀ in its turn, then hands over and runs
  // its softmax while the next consumer's matrices run. Left alone, the consumers drift into step and wait on
  // the tensor cores and the exponentials together (docs/hopper-notes.md, g1: +5-7% at head dim 128; g5:
  // +5% at SDXL, where it replaced keeping the next block's Q·Kᵀ in flight).
  static constexpr int kRingBarrier = 1 + kConsumers;  // 1..kConsumers: each consumer's own P̃-tile barrier
  // INT8 P·V: the wgmma adds straight into the row's int32 accumulator at head dim 128. At 64 that leaves
  // ptxas too few of the 112 registers (it serializes the wgmmas and spills 800 bytes), so each block's product
  // goes to a fresh accumulator added in afterwards, as FP8 does.
  static constexpr bool kIntInPlace = kDim == 128;
  static_assert(kDim == 64 || kDim == 128, "wgmma kernel: head dims 64 and 128");
  // setmaxnreg moves registers within the CTA's allocation (kThreads × the launch count, which
  // __launch_bounds__(kThreads, 1) makes 65536 / kThreads rounded down to 8): asking for more than that
  // holds makes setmaxnreg.inc wait forever.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8 > 255 ? 248 : (65536 / kThreads) / 8 * 8;
  static_assert(128 * kProducerRegs + kConsumers * 128 * kConsumerRegs <= kThreads * kLaunchRegs,
                "the warpgroups' registers must fit the CTA's allocation");
};

// kSplit: the 1-D grid of a launch with split tiles (Sm90Split); otherwise a (row block, q head, batch) grid
// and none of the split code, which measurably slows the K loop of long sequences when merely present.
// kKeyBias: AttentionArgs::key_bias is set (a key mask); the masked body adds it where a block's flags say so.
template <int kDim, PvType kPv, bool kSplit, bool kKeyBias = false>
__global__ void __launch_bounds__(Sm90Traits<kDim, kPv, kKeyBias>::kThreads, 1)
    sm90_attention_kernel(const __grid_constant__ Sm90Params p) {
  using Tr = Sm90Traits<kDim, kPv, kKeyBias>;
  constexpr bool kIntPv = Tr::kIntPv;
  constexpr bool kSoftmaxUnderPv = kIntPv && Tr::kIntInPlace;  // see the K loop
  using OAcc = std::conditional_t<kIntPv, int32_t, float>;  // the P̃·V accumulator
  // P̃ from registers (Sm90Traits::kPRegs) in the plain kernel without a key mask: with one, ptxas sank the
  // exponentials of head dim 64's loop below the turn's barrier, as it had before g14 (B1 H24 N8,448 with a
  // text-padding mask: 2,098 µs against 1,065 through shared memory; docs/hopper-notes.md km1).
  constexpr bool kPFromRegs = Tr::kPRegs && !kSplit && !kKeyBias;
  const AttentionArgs& a = p.args;
  const Shape& s = a.shape;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t s_q = base;
  auto s_k = [&](int stage) { return base + Tr::kQBytes + stage * Tr::kKBytes; };
  auto s_v = [&](int stage) { return base + Tr::kQBytes + Tr::kStages * Tr::kKBytes + stage * Tr::kVBytes; };
  const uint32_t p_tiles = base + Tr::kQBytes + Tr::kStages * (Tr::kKBytes + Tr::kVBytes);
  auto s_bias = [&](int stage) { return p_tiles + Tr::kConsumers * Tr::kPBytes + stage * Tr::kBiasBytes; };
  const uint32_t bars = p_tiles + Tr::kConsumers * Tr::kPBytes + Tr::kStages * Tr::kBiasBytes;
  const uint32_t q_full = bars;
  auto full = [&](int stage) { return bars + 8 * (1 + stage); };
  auto empty = [&](int stage) { return bars + 8 * (1 + Tr::kStages + stage); };

  // This CTA's tile, and its part of the tile's K blocks: [kb0, num_k_blocks) (Sm90Split).
  const int num_q_blocks = s.padded_q / Tr::kBlockQ;
  int tile = static_cast<int>(blockIdx.x), part = 0, q_block, hq, b;
  if constexpr (kSplit) {  // never causal
    tile += p.split.first_cta;
    if (tile >= p.split.split_from) {
      const int item = tile - p.split.split_from;
      tile = p.split.split_from + item / p.split.splits;
      part = item % p.split.splits;
    }
    q_block = tile % num_q_blocks, hq = tile / num_q_blocks % s.heads_q, b = tile / num_q_blocks / s.heads_q;
  } else {
    launch_dependents();  // the split tiles' kernel, if any, may take the SMs this grid's last wave frees
    // Tiles from split_from are the split kernel's (the row-block-fastest order; causal never splits).
    if ((static_cast<int>(blockIdx.z) * s.heads_q + static_cast<int>(blockIdx.y)) * num_q_blocks +
            static_cast<int>(blockIdx.x) >= p.split.split_from) {
      return;
    }
    q_block = a.causal ? num_q_blocks - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
    hq = blockIdx.y, b = blockIdx.z;
  }
  const int bhq = b * s.heads_q + hq, bhkv = b * s.heads_kv + hq / (s.heads_q / s.heads_kv);
  const int q0 = q_block * Tr::kBlockQ;
  const int diag = s.seq_kv - s.seq_q;  // key j is visible to row i iff j <= i + diag (causal)
  int num_k_blocks = visible_k_blocks(s, a.causal, q0, Tr::kBlockQ, Tr::kBlockK);
  const bool split = kSplit && tile >= p.split.split_from;
  const bool last_part = !split || part == p.split.splits - 1;  // holds the padded keys, if any
  const int kb0 = split ? part * num_k_blocks / p.split.splits : 0;
  if (split) num_k_blocks = (part + 1) * num_k_blocks / p.split.splits;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int i = 0; i < Tr::kStages; ++i) {
      mbar_init(full(i), 1);
      mbar_init(empty(i), Tr::kConsumers * 4);  // lane 0 of every consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  // Broadcast from lane 0, so that ptxas knows the warpgroup index is the same across the warp: the wgmma
  // descriptors built from it then stay in uniform registers instead of being moved there (R2UR) before
  // every wgmma. Measured +3.5-14% (docs/hopper-notes.md, u1).
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);
  if (wg == 0) {  // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0 && num_k_blocks > kb0) {
      prefetch_tensor_map(&p.q_map);
      prefetch_tensor_map(&p.k_map);
      prefetch_tensor_map(&p.v_map);
      mbar_arrive_expect_tx(q_full, Tr::kQBytes);
      tma_load_3d(s_q, &p.q_map, 0, q0, bhq, q_full);
      for (int kb = kb0; kb < num_k_blocks; ++kb) {
        const int stage = (kb - kb0) % Tr::kStages, use = (kb - kb0) / Tr::kStages;
        if (use > 0) mbar_wait(empty(stage), (use - 1) & 1);
        mbar_arrive_expect_tx(full(stage), Tr::kKBytes + Tr::kVBytes + Tr::kBiasBytes);
        tma_load_3d(s_k(stage), &p.k_map, 0, kb * Tr::kBlockK, bhkv, full(stage));
        tma_load_3d(s_v(stage), &p.v_map, kb * Tr::kBlockK, 0, bhkv, full(stage));
        if constexpr (Tr::kBiasBytes > 0) {
          bulk_load(s_bias(stage), a.key_bias + b * a.key_bias_batch_stride + kb * Tr::kBlockK, Tr::kBiasBytes,
                    full(stage));
        }
      }
    }
    // A dependent launch (the split tiles after the plain kernel's) ends only after the grid it depends on,
    // as the stream's next work expects: its CTAs stay until then, in this thread.
    if (kSplit && threadIdx.x == 0 && p.split.first_cta > 0) wait_prerequisites();
    return;
  }

  // ---- consumers ----
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int c = wg - 1;
  const int warp = (threadIdx.x / kWarpSize) % 4, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int row0 = q0 + c * Tr::kWgRows + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
  const float q_scale = a.buf.q_scale[(static_cast<int64_t>(bhq) * (s.padded_q / 16) + row0 / 16) * kRowGroups + g];
  const float* k_scales = a.buf.k_scale + static_cast<int64_t>(bhkv) * (s.padded_kv / Tr::kBlockK) * kColGroups;
  // The key mask's bias row (log2 domain) and whether K block kb has any bias: its two 64-key flags.
  const float* key_bias = kKeyBias ? a.key_bias + b * a.key_bias_batch_stride : nullptr;
  auto biased = [&](int kb) {
    if constexpr (kKeyBias) {
      const float2 flags = __ldg(reinterpret_cast<const float2*>(key_bias + a.key_bias_width) + kb);
      return flags.x != 0.f || flags.y != 0.f;
    } else {
      return false;
    }
  };
  const uint64_t desc_q = make_smem_desc(s_q + c * Tr::kWgRows * kDim, kDim);
  const uint32_t s_p = p_tiles + c * Tr::kPBytes;

  // S = Q̂·K̂ᵀ of one stage, issued (not waited for).
  // (issue_qk_at: for a caller that has the stage's K descriptor already.)
  auto issue_qk_at = [&](int32_t (&acc)[Tr::kSTiles * 4], uint64_t desc_k) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDim / 32; ++kk) {
      if (kk == 0) {
        wgmma_m64n128k32_s8_first(acc, desc_q, desc_k);
      } else {
        wgmma_m64n128k32_s8(acc, desc_q + 2 * kk, desc_k + 2 * kk, 1);
      }
    }
    wgmma_commit();
  };
  auto issue_qk = [&](int32_t (&acc)[Tr::kSTiles * 4], int stage) {
    issue_qk_at(acc, make_smem_desc(s_k(stage), kDim));
  };
  // P̃·V of one stage (32 keys per wgmma), issued: FP8 into a fresh accumulator `blk`, INT8 added into the
  // row's accumulator. P̃ from this consumer's shared-memory tile, or (kPRegs) from registers `pw`.
  const uint64_t desc_p = make_smem_desc(s_p, Tr::kBlockK);
  auto issue_pv_at = [&](OAcc (&blk)[Tr::kOTiles * 4], uint64_t desc_v,
                         const uint32_t (&pw)[Tr::kBlockK / 32][4]) {
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < Tr::kBlockK / 32; ++j) {
      const int accumulate = kIntPv && Tr::kIntInPlace ? 1 : j;
      if constexpr (kPFromRegs) {  // FP8 only
        wgmma_m64n64k32_e4m3_rs(blk, pw[j], desc_v + 2 * j, accumulate);
      } else if constexpr (kDim == 128 && kIntPv) {
        wgmma_m64n128k32_u8s8_ss(blk, desc_p + 2 * j, desc_v + 2 * j, accumulate);
      } else if constexpr (kDim == 128) {
        wgmma_m64n128k32_e4m3_ss(blk, desc_p + 2 * j, desc_v + 2 * j, accumulate);
      } else if constexpr (kIntPv) {
        wgmma_m64n64k32_u8s8_ss(blk, desc_p + 2 * j, desc_v + 2 * j, accumulate);
      } else {
        wgmma_m64n64k32_e4m3_ss(blk, desc_p + 2 * j, desc_v + 2 * j, accumulate);
      }
    }
    wgmma_commit();
  };
  auto issue_pv = [&](OAcc (&blk)[Tr::kOTiles * 4], int stage, const uint32_t (&pw)[Tr::kBlockK / 32][4]) {
    issue_pv_at(blk, make_smem_desc(s_v(stage), Tr::kBlockK), pw);
  };
  // Dequantize (one scale per lane, kept positive so masked -inf stays -inf), mask, and the softmax step
  // (row max, exponentials, row sums; softmax.alpha rescales o in add_block); sf then holds P̃ in fp32.
  // (`masked`: std::true_type for blocks with padded or causally hidden keys, std::false_type otherwise, so
  // each loop body is straight-line code: ptxas tracks in-flight wgmma registers only within one.)
  const float exp_offset = p_exp_offset<kPv>(s);
  auto softmax_step = [&](float (&sf)[Tr::kSTiles][4], const int32_t (&acc)[Tr::kSTiles * 4], int kb,
                          float k_scale, OnlineSoftmax<Tr::kSTiles, kIntPv>& softmax, auto masked) {
    const float scale = fmaxf(q_scale * k_scale, kMinScale);
    const int key0 = kb * Tr::kBlockK;
    if constexpr (kKeyBias && decltype(masked)::value) {
      // A key mask: the masked body of every block it touches (the padded last block among them: its bias is
      // −inf there). The scores are unscaled here, so the bias enters divided by the scale; the row max is then
      // taken on the floats.
      // The block's bias: from the stage in shared memory (Sm90Traits::kBiasBytes), or from global memory.
      const float inv_scale = __frcp_rn(scale);
      // This lane's keys n·8 + 2t, + 1 of n-tile n, in the stage's copy or in global memory (one is unused).
      [[maybe_unused]] const uint32_t s_bias_lane = s_bias((kb - kb0) % Tr::kStages) + 8 * t;
      [[maybe_unused]] const float2* g_bias_lane = reinterpret_cast<const float2*>(key_bias + key0) + t;
#pragma unroll
      for (int n = 0; n < Tr::kSTiles; ++n) {
        float2 bn;
        if constexpr (Tr::kBiasBytes > 0) {
          asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(bn.x), "=f"(bn.y) : "r"(s_bias_lane + 32 * n));
        } else {
          bn = __ldg(g_bias_lane + 4 * n);
        }
        // No padding or causal test: the bias is −inf past seq_kv, and a key mask never comes with the causal
        // mask (the binding rejects the two together). 64 tests fewer per lane and block than in the masked body
        // without a key mask.
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sf[n][e] = fmaf((e & 1) ? bn.y : bn.x, inv_scale, static_cast<float>(acc[4 * n + e]));
        }
      }
      softmax.template scores<kSoftmaxUnderPv>(sf, scale, exp_offset);
    } else if constexpr (kSoftmaxUnderPv) {
      // Each row's maximum over the lane's keys taken on the int32 S (exact: |S| < 2^24) beside the
      // conversions instead of after them.
      int part[2][2] = {{INT_MIN, INT_MIN}, {INT_MIN, INT_MIN}};
#pragma unroll
      for (int n = 0; n < Tr::kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int v = acc[4 * n + e];
          sf[n][e] = static_cast<float>(v);
          if constexpr (decltype(masked)::value) {
            // The mask as in the loop below, written out in both: one lambda for the two changed every
            // instantiation's SASS (head dim 128 FP8: 5,172 → 6,116 lines), the fragile head-dim-64 loops too.
            const int key = key0 + n * 8 + 2 * t + (e & 1), row = row0 + (e >> 1) * 8;
            const bool hidden = key >= s.seq_kv || (a.causal && key > row + diag);
            sf[n][e] = hidden ? -kInf : sf[n][e];
            v = hidden ? INT_MIN : v;
          }
          part[e >> 1][n % 2] = max(part[e >> 1][n % 2], v);
        }
      }
      // (In an unmasked block every score is finite, |S| < 2^24: neither INT_MIN nor a -inf max comes up.)
      constexpr bool kSeen = !decltype(masked)::value;
      float lane_max[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int mx = max(part[half][0], part[half][1]);
        lane_max[half] = !kSeen && mx == INT_MIN ? -kInf : static_cast<float>(mx);
      }
      softmax.template scores<kSeen, /*kSumFromFirst=*/true>(sf, lane_max, scale, exp_offset);
    } else {
#pragma unroll
      for (int n = 0; n < Tr::kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sf[n][e] = static_cast<float>(acc[4 * n + e]);
          if constexpr (decltype(masked)::value) {
            const int key = key0 + n * 8 + 2 * t + (e & 1), row = row0 + (e >> 1) * 8;
            sf[n][e] = key >= s.seq_kv || (a.causal && key > row + diag) ? -kInf : sf[n][e];
          }
        }
      }
      softmax.scores(sf, scale, exp_offset);
    }
  };
  // P̃ (8-bit) into this consumer's tile: 64 rows of 128 key bytes, 128-byte swizzled (16-byte chunk index
  // XOR row mod 8) as the wgmma descriptor reads it. Keys of k step j sit at bytes 32j.. of the row in the
  // A-fragment order (V's tokens are permuted to match): the 4 bytes a lane packs from tiles 4j + 2h, +1
  // go to chunk 2j + h, bytes 4t..4t+3. Each store instruction of a warp covers 32 distinct banks. The
  // tile is complete, and visible to the tensor cores, after the warpgroup's barrier that follows.
  // P̃ of k step j as this lane's A-fragment words: pw[j][r] is the word store_p writes for (j, r).
  auto pack_p = [&](const float (&sf)[Tr::kSTiles][4], uint32_t (&pw)[Tr::kBlockK / 32][4]) {
#pragma unroll
    for (int j = 0; j < Tr::kBlockK / 32; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = 4 * j + 2 * (r >> 1), e = 2 * (r & 1);
        if constexpr (kIntPv) {
          pw[j][r] = pack_u8x4(sf[n][e], sf[n][e + 1], sf[n + 1][e], sf[n + 1][e + 1]);
        } else {
          pw[j][r] = pack_e4m3x2(sf[n][e], sf[n][e + 1]) |
                     (static_cast<uint32_t>(pack_e4m3x2(sf[n + 1][e], sf[n + 1][e + 1])) << 16);
        }
      }
    }
  };
  // INT8 P·V at head dim 128 without a key mask: one stmatrix per k step stores a warp's 16 rows × 32
  // bytes. pw[j][r] is word t of row g + 8(r & 1) of chunk 2j + (r >> 1), i.e. matrix r's fragment, and
  // lane 8r + i gives the address of that matrix's row i. With the tile 1024-byte aligned, row·128 leaves
  // bits 4-6 clear, so the swizzled chunk (2j + h) ^ (row mod 8) is this lane's (h ^ i) << 4 with j << 5
  // XORed in: one address a lane and k step, where the 16 word stores took 16 addresses rebuilt every
  // block (H100, CUDA graphs: Wan 14B +3%, N16k +4%, bit for bit the same; hopper notes st1). The others
  // keep the word stores: with stmatrix FP8 P·V at head dim 128 ran 2-8% slower, the key-mask
  // instantiations 1-2% (st6), and head dim 64's split instantiations spilled more.
  static_assert(Tr::kBlockK == 128, "store_p's addresses assume 128-byte rows (the 128-byte swizzle)");
  // The address is held through a lane shuffle of itself, which ptxas cannot recompute from the thread
  // index: as plain arithmetic it was rebuilt in every block (9 instructions; H100, CUDA graphs: +1-1.5% at
  // 16-75k tokens, hopper notes st3).
  [[maybe_unused]] uint32_t p_row =
      s_p + (warp * 16 + (lane & 15)) * Tr::kBlockK + ((((lane >> 4) ^ lane) & 7) << 4);
  if constexpr (kDim == 128 && kIntPv && !kKeyBias) p_row = __shfl_sync(0xffffffffu, p_row, lane);
  auto store_p = [&](const uint32_t (&pw)[Tr::kBlockK / 32][4]) {
    if constexpr (kDim == 128 && kIntPv && !kKeyBias) {
#pragma unroll
      for (int j = 0; j < Tr::kBlockK / 32; ++j) stmatrix_x4(p_row ^ (j << 5), pw[j]);
    } else {
#pragma unroll
      for (int j = 0; j < Tr::kBlockK / 32; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = warp * 16 + g + 8 * (r & 1), chunk = (2 * j + (r >> 1)) ^ g;
          const uint32_t addr = s_p + row * Tr::kBlockK + chunk * 16 + 4 * t;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pw[j][r]) : "memory");
        }
      }
    }
    fence_proxy_async();             // the tensor cores read it through the async proxy
    named_barrier_sync(1 + c, 128);  // the whole tile is written
  };

  // The turn at the tensor cores: wait for it, and hand it to the next consumer. Consumer c waits on
  // barrier kRingBarrier + c, which the consumer before it arrives at; the last consumer opens the ring
  // once at the start and skips its final hand-over, so every barrier completes as often as it is waited
  // for. A turn: the previous block's P̃·V and its addition into O, then this block's Q·Kᵀ issued
  // (the first turn: the first Q·Kᵀ; the last: the last P̃·V).
  auto turn_wait = [&] { named_barrier_sync(Tr::kRingBarrier + c, 256); };
  auto turn_pass = [&] { named_barrier_arrive(Tr::kRingBarrier + (c + 1) % Tr::kConsumers, 256); };

  float o[Tr::kOTiles][4] = {};
  int32_t oi[kIntPv ? Tr::kOTiles * 4 : 1] = {};  // INT8: the exact int32 O of the lane's row elements
  OnlineSoftmax<Tr::kSTiles, kIntPv> softmax;
  // o relative to the new row max plus this block's product: one FFMA per element (no branch: control flow
  // between a wgmma and its wait makes ptxas wait early).
  auto add_block = [&](const float (&blk)[Tr::kOTiles * 4]) {
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] = fmaf(o[n][e], softmax.alpha[e >> 1], blk[4 * n + e]);
    }
  };
  // This block's P̃·V into `acc` in this consumer's turn at the tensor cores, waited for; then the stage goes
  // back to the producer.
  auto pv_turn = [&](auto& acc, int stage, uint32_t (&pw)[Tr::kBlockK / 32][4]) {
    turn_wait();
    issue_pv(acc, stage, pw);
    wgmma_wait<0>();
    if constexpr (kPFromRegs) fence_registers(pw);
    fence_registers(acc);
    if (lane == 0) mbar_arrive(empty(stage));  // this warp is done with the stage
  };
  // One K block: its Q·Kᵀ ends this consumer's turn (which began with the previous block's P̃·V, or before
  // the first block), its P̃·V begins the next turn.
  auto block = [&](int kb, auto masked) {
    const int stage = (kb - kb0) % Tr::kStages;
    const float k_scale = k_scales[kb * kColGroups + t];
    mbar_wait(full(stage), ((kb - kb0) / Tr::kStages) & 1);
    float sf[Tr::kSTiles][4];
    {
      int32_t acc[Tr::kSTiles * 4];
      issue_qk(acc, stage);
      turn_pass();
      wgmma_wait<0>();
      fence_registers(acc);
      softmax_step(sf, acc, kb, k_scale, softmax, masked);
    }
    uint32_t pw[Tr::kBlockK / 32][4];
    pack_p(sf, pw);
    if constexpr (!kPFromRegs) store_p(pw);
    if constexpr (kIntPv) {  // head dim 64: a fresh tile (the in-place accumulation has its own loop below)
      // The row accumulator relative to the new (integer) row max: shifted right where the max rose; here,
      // where the product is added in anyway, without the vote the in-place loop uses (it cost 3% at SDXL
      // and 21% at N = 16k).
      int32_t blk[Tr::kOTiles * 4];
      pv_turn(blk, stage, pw);
#pragma unroll
      for (int i = 0; i < Tr::kOTiles * 4; ++i) oi[i] = (oi[i] >> softmax.shift[(i >> 1) & 1]) + blk[i];
    } else {
      float blk[Tr::kOTiles * 4];
      pv_turn(blk, stage, pw);
      add_block(blk);
    }
  };
  // INT8 P·V in place (head dim 128): a turn issues the next block's Q·Kᵀ and then this block's P̃·V, and the
  // consumer waits for the Q·Kᵀ alone: its next softmax runs while the P̃·V does, which it needs done only
  // before its P̃ overwrites the tile and its shift rescales the accumulator. `block`'s order (P̃·V waited
  // for, then Q·Kᵀ issued and waited for) has both products' latencies on each consumer's path; this has one
  // (+2-5% in CUDA-graph TOPS on an H100, docs/hopper-notes.md i7). The registers are there because the
  // in-place accumulation needs no fresh tile; FP8's two-level accumulation does.
  int32_t s_acc[kSoftmaxUnderPv ? Tr::kSTiles * 4 : 1];
  if (num_k_blocks > kb0) {
    if (c == Tr::kConsumers - 1) turn_pass();  // consumer 0 goes first
    mbar_wait(q_full, 0);
    turn_wait();
    // Blocks before `first_masked` have no padded key and none hidden by the causal mask from any of this
    // warpgroup's rows (the smallest row sees the fewest keys).
    int first_masked = s.seq_kv % Tr::kBlockK && last_part ? num_k_blocks - 1 : num_k_blocks;
    if (a.causal) {
      const int hidden_after = q0 + c * Tr::kWgRows + diag - (Tr::kBlockK - 1);
      first_masked = min(first_masked, hidden_after < 0 ? 0 : hidden_after / Tr::kBlockK + 1);
    }
    if constexpr (kSoftmaxUnderPv) {
      // The softmax of block kb (its S in s_acc, waited for) into the P̃ words `pw`. The next block's K scale
      // is loaded here, a block ahead: loaded inside the softmax that uses it, ptxas placed the wait for the
      // P̃·V before the exponentials of every unmasked block (the order above then held only in masked ones;
      // scripts/sass_schedule.py checks it).
      float next_k_scale = k_scales[kb0 * kColGroups + t];
      auto softmax_of = [&](int kb, auto masked, uint32_t (&pw)[Tr::kBlockK / 32][4]) {
        float sf[Tr::kSTiles][4];
        softmax_step(sf, s_acc, kb, next_k_scale, softmax, masked);
        next_k_scale = k_scales[min(kb + 1, num_k_blocks - 1) * kColGroups + t];
        pack_p(sf, pw);
      };
      // The P̃ words into the tile, and the accumulator relative to the new row maxima (the previous P̃·V
      // done). In most K blocks of a long row none of the warp's 16 row maxima rises, and the warp skips the
      // shifts (H100: +3% at N = 16k, +4% at 32k).
      auto stage_p = [&](const uint32_t (&pw)[Tr::kBlockK / 32][4]) {
        store_p(pw);
        if (__any_sync(0xffffffffu, (softmax.shift[0] | softmax.shift[1]) != 0)) {
#pragma unroll
          for (int i = 0; i < Tr::kOTiles * 4; ++i) oi[i] >>= softmax.shift[(i >> 1) & 1];
        }
      };
      // One turn: block kb + 1's Q·Kᵀ, then block kb's P̃·V (P̃ from the tile: `pw` then takes block
      // kb + 1's words); block kb + 1's softmax under the P̃·V.
      // The stages and the next one's phase are counted along the loop, and a stage's descriptors are the
      // first stage's plus its offset (the address field is addr >> 4, and no stage reaches past 2^18):
      // the turn's uniform work without a division by kStages or a descriptor rebuilt from its address
      // (H100, CUDA graphs: +1.4-3% at 4-75k tokens, hopper notes st4).
      const uint64_t desc_k0 = make_smem_desc(s_k(0), kDim), desc_v0 = make_smem_desc(s_v(0), Tr::kBlockK);
      int stage = 0, next_stage = 1 % Tr::kStages;
      uint32_t next_phase = Tr::kStages == 1 ? 1 : 0;
      auto turn = [&](int kb, auto masked_next) {
        mbar_wait(full(next_stage), next_phase);  // no branch with a wgmma in flight
        uint32_t pw[Tr::kBlockK / 32][4];
        turn_wait();
        issue_qk_at(s_acc, desc_k0 + static_cast<uint64_t>(next_stage * (Tr::kKBytes >> 4)));
        issue_pv_at(oi, desc_v0 + static_cast<uint64_t>(stage * (Tr::kVBytes >> 4)), pw);
        turn_pass();
        wgmma_wait<1>();
        fence_registers(s_acc);
        softmax_of(kb + 1, masked_next, pw);
        wgmma_wait<0>();
        fence_registers(oi);
        if (lane == 0) mbar_arrive(empty(stage));  // this warp is done with the stage
        stage_p(pw);
        stage = next_stage;
        next_stage = next_stage + 1 == Tr::kStages ? 0 : next_stage + 1;
        next_phase ^= next_stage == 0 ? 1u : 0u;
      };
      {
        mbar_wait(full(0), 0);
        uint32_t pw[Tr::kBlockK / 32][4];
        issue_qk_at(s_acc, desc_k0);
        turn_pass();
        wgmma_wait<0>();
        fence_registers(s_acc);
        if (kb0 < first_masked && !biased(kb0)) {
          softmax_of(kb0, std::false_type{}, pw);
        } else {
          softmax_of(kb0, std::true_type{}, pw);
        }
        stage_p(pw);
      }
      bool next_biased = biased(min(kb0 + 1, num_k_blocks - 1));  // a block ahead: its load under the turn
      for (int kb = kb0; kb + 1 < num_k_blocks; ++kb) {
        const bool masked_next = kb + 1 >= first_masked || next_biased;
        if constexpr (kKeyBias) next_biased = biased(min(kb + 2, num_k_blocks - 1));
        if (!masked_next) {
          turn(kb, std::false_type{});
        } else {
          turn(kb, std::true_type{});
        }
      }
      uint32_t unused[Tr::kBlockK / 32][4];  // P̃ from the tile
      pv_turn(oi, stage, unused);  // the last block's P̃·V (the turns counted `stage` up to its stage)
    } else {
      bool this_biased = biased(kb0);
      for (int kb = kb0; kb < num_k_blocks; ++kb) {
        const bool masked = kb >= first_masked || this_biased;
        if constexpr (kKeyBias) this_biased = biased(min(kb + 1, num_k_blocks - 1));  // a block ahead
        if (!masked) {
          block(kb, std::false_type{});
        } else {
          block(kb, std::true_type{});
        }
      }
    }
    if (c != Tr::kConsumers - 1) turn_pass();
  }

  // ---- epilogue ----
  if constexpr (kIntPv) {
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] = static_cast<float>(oi[4 * n + e]);
    }
  }
  if (!split) {  // always so without kSplit
    store_rows<kPv>(a, softmax, o, row0, b, hq, bhq, bhkv, t, exp_offset);
    return;
  }
  // A part of a split tile: its unnormalized O, row max and whole-row sum, in this lane's own positions;
  // the part that arrives last at this consumer's counter combines all parts (in part order: the result
  // does not depend on which finished last) and writes the output.
  softmax.reduce_sums();
  const int64_t split_tile = tile - p.split.split_from;
  const int64_t rows_per_part = Tr::kBlockQ;
  auto part_o = [&](int prt) {
    return a.split_partials + ((split_tile * p.split.splits + prt) * rows_per_part + c * Tr::kWgRows) * (kDim + 2);
  };
  const int r_local = warp * 16 + g;  // rows r_local and r_local + 8 of this consumer's 64
  {
    float* mine = part_o(part);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float* row = mine + (r_local + 8 * half) * (kDim + 2);
#pragma unroll
      for (int n = 0; n < Tr::kOTiles; ++n) {
        *reinterpret_cast<float2*>(row + n * 8 + 2 * t) = make_float2(o[n][2 * half], o[n][2 * half + 1]);
      }
      if (t == 0) *reinterpret_cast<float2*>(row + kDim) = make_float2(softmax.m[half], softmax.l[half]);
    }
  }
  __threadfence();  // the partials are visible GPU-wide before the arrival below
  named_barrier_sync(1 + c, 128);
  if (threadIdx.x % 128 == 0) {
    const int arrived = atomicAdd(a.split_counters + split_tile * Tr::kConsumers + c, 1);
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(s_p), "r"(arrived == p.split.splits - 1 ? 1 : 0) : "memory");
  }
  named_barrier_sync(1 + c, 128);
  uint32_t last = 0;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(last) : "r"(s_p) : "memory");
  if (last == 0) return;
  __threadfence();
  OnlineSoftmax<Tr::kSTiles> total;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float m_max = -kInf;
    for (int prt = 0; prt < p.split.splits; ++prt) {
      m_max = fmaxf(m_max, __ldcg(part_o(prt) + (r_local + 8 * half) * (kDim + 2) + kDim));
    }
    const float m_use = m_max == -kInf ? 0.f : m_max;
    float l = 0.f;
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) o[n][2 * half] = o[n][2 * half + 1] = 0.f;
    for (int prt = 0; prt < p.split.splits; ++prt) {
      const float* row = part_o(prt) + (r_local + 8 * half) * (kDim + 2);
      const float2 ml = __ldcg(reinterpret_cast<const float2*>(row + kDim));
      const float w = ml.x == -kInf ? 0.f : exp2f(ml.x - m_use);
      l = fmaf(ml.y, w, l);
#pragma unroll
      for (int n = 0; n < Tr::kOTiles; ++n) {
        const float2 x = __ldcg(reinterpret_cast<const float2*>(row + n * 8 + 2 * t));
        o[n][2 * half] = fmaf(x.x, w, o[n][2 * half]);
        o[n][2 * half + 1] = fmaf(x.y, w, o[n][2 * half + 1]);
      }
    }
    total.m[half] = m_max;
    total.l[half] = l;
  }
  write_rows<kPv>(a, total, o, row0, b, hq, bhq, bhkv, t, exp_offset);
}

}  // namespace comfy_sage
