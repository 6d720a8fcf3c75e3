// Which K blocks a block of query rows reads, for both kernel families.
#pragma once

#include "params.h"

namespace comfy_sage {

// The K blocks of `block_k` keys that rows [q0, q0 + block_q) read: all of them, or with the causal mask
// (aligned bottom-right: key j is visible to row i iff j <= i + seq_kv - seq_q) those up to the last key
// the block's last row sees; 0 when no row sees a key.
__device__ __forceinline__ int visible_k_blocks(const Shape& s, bool causal, int q0, int block_q, int block_k) {
  const int all = (s.seq_kv + block_k - 1) / block_k;
  if (!causal) return all;
  const int last_key = q0 + block_q - 1 + (s.seq_kv - s.seq_q);
  return last_key < 0 ? 0 : min(all, last_key / block_k + 1);
}

}  // namespace comfy_sage
