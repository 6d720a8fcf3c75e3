// The argument structs that cross from the binding (the only file that knows torch) to the kernels.
// Plain data: pointers, sizes, strides in elements.
#pragma once

#include <cstdint>

namespace comfy_sage {

// The mma.sync family's tile (comfy_sage/tiling.py SM80 mirrors it): 8 warps of 16 Q rows, 64 keys a step;
// head dim 256 uses half the Q block (sm80_block_q).
constexpr int kSm80BlockQ = 128;
constexpr int kSm80WarpQ = 16;
constexpr int kSm80BlockK = 64;
constexpr int kKeyBiasAlign = 128;  // AttentionArgs::key_bias_width's multiple
// A key_bias row for `width` keys (N_kv rounded up to kKeyBiasAlign): the bias values, then a flag per
// kSm80BlockK keys, rounded up to 4 (comfy_sage/ops.py key_bias_row_length).
constexpr int64_t key_bias_row_length(int64_t width) { return width + (width / kSm80BlockK + 3) / 4 * 4; }
// Grid dimensions y and z take at most this many blocks (the key_bias op's rows; the attention call's heads
// and batch chunks, csrc/binding.cpp).
constexpr int kMaxGridYZ = 65535;
// The most negative finite key bias (log2 domain): a finite mask value stays finite (bfloat16's −finfo.max,
// the padding ComfyUI's models use, would overflow to −inf), so a row whose every key has one averages V, as
// PyTorch's attention does (comfy_sage/ops.py FINITE_BIAS_FLOOR).
constexpr float kFiniteBiasFloor = -1e25f;
constexpr int sm80_block_q(int padded_dim) { return padded_dim > 128 ? kSm80BlockQ / 2 : kSm80BlockQ; }

// The wgmma family's tile (comfy_sage/tiling.py SM90): consumer warpgroups of 64 Q rows (warps of 16), four
// at head dim 64 and three at 128, and three at 64 with a key mask (sm90/attention_kernel.cuh says why); 128
// keys a step, and its K scales are per 128-key block.
constexpr int kSm90WgRows = 64;
constexpr int sm90_consumers(int padded_dim, bool key_mask) { return padded_dim <= 64 && !key_mask ? 4 : 3; }
constexpr int sm90_block_q(int padded_dim, bool key_mask) {
  return sm90_consumers(padded_dim, key_mask) * kSm90WgRows;
}
constexpr int kSm90BlockK = 128;

// kv_stats's CTAs per K/V head ("parts"): 256 tokens each, and past 64 CTAs more tokens each. Every part
// writes its channel sums to its own slot and the head's last part to finish adds the slots in part order,
// so K's mean, and with it K's quantization, does not depend on the order the CTAs ran in.
constexpr int kStatsTokensPerPart = 256;
constexpr int kMaxStatsParts = 64;
constexpr int kv_stats_parts(int seq_kv) {
  const int parts = (seq_kv + kStatsTokensPerPart - 1) / kStatsTokensPerPart;
  return parts < 1 ? 1 : parts > kMaxStatsParts ? kMaxStatsParts : parts;
}
constexpr int kv_stats_tokens_per_part(int seq_kv) {
  const int parts = kv_stats_parts(seq_kv);
  return (seq_kv + parts - 1) / parts;
}

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// What P̃·V runs in (the op's `pv` argument; comfy_sage/ops.py PV_CODES): FP16 with fp32 accumulation, FP8
// e4m3 with two-level accumulation, or INT8 (P̃ unsigned, V signed) accumulated exactly in int32.
enum class PvType : int { kFp16 = 0, kFp8 = 1, kInt8 = 2 };

// INT8 P·V accumulates a whole row in int32, so Σ_keys p̂ · |v̂| ≤ p_max · 127 · seq_kv must stay below 2^31
// (less a margin for the floor of each rescale): P̃'s largest value p_max is 255 up to 65,793 keys and shrinks
// past them (comfy_sage/reference/quant.py int8_p_max, the same rule).
constexpr int64_t kInt8PvBudget = (int64_t{1} << 31) - (int64_t{1} << 24);
constexpr int64_t kInt8PvMaxKeys = kInt8PvBudget / 127;  // p_max ≥ 1
constexpr int int8_p_max(int seq_kv) {
  const int64_t p = kInt8PvBudget / (127 * static_cast<int64_t>(seq_kv > 1 ? seq_kv : 1));
  return p > 255 ? 255 : p < 1 ? 1 : static_cast<int>(p);
}

// The caller's Q, K, V and output: [batch, heads, tokens, head_dim] addressed through strides, so the
// HND and NHD layouts are the same code. The head_dim stride is 1.
struct TensorView {
  void* ptr;
  int64_t batch_stride, head_stride, token_stride;
};

// Sizes of one call. `head_dim` is the caller's; `padded_dim` the kernel's (64, 128 or 256).
struct Shape {
  int batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, padded_dim;
  int padded_q, padded_kv;  // seq_q, seq_kv rounded up to the CTA's Q and K blocks
  int block_k;              // the attention kernel's K block: the unit of K's quantization groups
  bool key_mask;            // AttentionArgs::key_bias is set (the wgmma kernel's Q block depends on it)
};

// Buffers written by the fused quantization and read by the attention kernel (all contiguous).
struct QuantBuffers {
  int8_t* q;        // [B, Hq, padded_q, padded_dim]  (INT8; INT4 packs two per byte, half the width)
  float* q_scale;   // [B, Hq, padded_q / warp_q, 8]  (sm_scale·log2 e folded in)
  int8_t* k;        // [B, Hkv, padded_kv, padded_dim]  (INT4: half the width)
  float* k_scale;   // [B, Hkv, padded_kv / block_k, 4]
  // INT4 only, for Q smoothing's ΔS = q̄·K'ᵀ: K' in INT8 with the same groups, and q̄ per Q block in INT8.
  int8_t* k8;            // [B, Hkv, padded_kv, padded_dim]
  float* k8_scale;       // [B, Hkv, padded_kv / block_k, 4]
  int8_t* q_mean;        // [B, Hq, padded_q / block_q, padded_dim]
  float* q_mean_scale;   // [B, Hq, padded_q / block_q]  (sm_scale·log2 e folded in)
  float* k_sum;     // [B, Hkv, padded_dim]  (Σ over tokens; the mean is k_sum / seq_kv)
  float* k_partial;  // [B, Hkv, kv_stats_parts(seq_kv), padded_dim]: each kv_stats CTA's sums of its tokens
  void* v;          // FP8 / INT8: [B, Hkv, padded_dim, padded_kv] e4m3 / int8, tokens permuted in groups of 16;
                    // FP16: [B, Hkv, padded_kv, padded_dim] half
  float* v_amax;    // [B, Hkv, padded_dim] right after k_sum  (FP8 and INT8 only; float bits reduced with atomicMax);
                    // AttentionArgs::split_counters follow it, then kv_stats_arrivals
  int* kv_stats_arrivals;  // [B, Hkv] kv_stats CTAs finished per head
  float* q_dot_kmean;  // [B, Hq, seq_q] q·k̄ for the LSE, or null
};

struct AttentionArgs {
  TensorView q, k, v, out;
  DType dtype;
  Shape shape;
  QuantBuffers buf;
  float* lse;  // [B, Hq, seq_q] or null
  // A key mask as an additive bias on the log2-domain scores, one value per key (−inf: the key is masked out),
  // the same for every head and query row; null without one. Rows of [B or 1] float32
  // (key_bias_batch_stride 0 where one row serves the whole batch): key_bias_width = seq_kv rounded up to
  // kKeyBiasAlign values (−inf past seq_kv), then one flag per kSm80BlockK keys, 1 where any of its values is
  // not 0, their count rounded up to 4 (rows stay 16-byte aligned; comfy_sage/ops.py key_bias).
  const float* key_bias;
  int64_t key_bias_batch_stride;
  int key_bias_width;
  float sm_scale;
  bool causal;
  int qk_bits;  // 8 or 4
  PvType pv;
  // The wgmma kernel's split tiles (Sm90Split): their partial results, and one arrival counter per tile and
  // consumer, zeroed by the quantization's memset (they follow v_amax). Null / 0 without split tiles.
  float* split_partials;
  int* split_counters;
  int num_split_counters;
};

}  // namespace comfy_sage
