// The Hopper (sm_90a) instructions the wgmma kernel uses: mbarriers, TMA tile loads, warpgroup MMA,
// register reallocation and programmatic dependent launch. One place for the inline assembly; compiled only
// for sm_90a (setup.py SOURCE_ARCHS), where wgmma and setmaxnreg exist.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"), for warp w of the
// warpgroup and lane (g = lane / 4, t = lane % 4):
//   D of m64nN (fp32 or s32): d[4j + 0, 1] = (row 16w + g, cols 8j + 2t, +1); d[4j + 2, 3] = row 16w + g + 8.
//   A of m64nNk32 8-bit, as register fragments (the order P̃ is written in): a0 = row 16w + g, bytes
//     4t..4t+3; a1 = row + 8, same bytes; a2 = row 16w + g, bytes 16 + 4t..; a3 = row + 8, bytes 16 + 4t..
//     (the mma.sync m16n8k32 A layout).
//   Operands in shared memory are described by a 64-bit descriptor (make_smem_desc); 8-bit operands must be
//   K-major, so Q, K and V^T are stored with their reduction dimension contiguous.
#pragma once

#include <cuda.h>
#include <cstdint>

namespace comfy_sage {

// ---- programmatic dependent launch ----
// This grid's dependents (launched with programmatic stream serialization) may start once every CTA of it
// has run this or exited.
__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
// Waits until the grids this one depends on have completed and their memory is visible.
__device__ __forceinline__ void wait_prerequisites() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// ---- mbarrier ----
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the barrier initialisation visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase with parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---- TMA: one box of a 3-D tensor map into shared memory, completing on `bar` ----
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) of global memory into shared memory, completing on
// `bar` as the tensor loads do.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Orders this thread's ordinary shared-memory stores before later reads by the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Four 8×8 matrices of 16-bit elements (8 rows of 16 bytes each) from the warp's registers into shared
// memory: lane 8m + i gives the address of row i of matrix m, and word w[m] of lane 4i + j is 4-byte word j
// of that row.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&w)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(w[0]),
               "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}

// ---- a named barrier (id 1..15; 0 is __syncthreads) over `threads` threads, a multiple of 32 ----
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this thread's warp in the barrier without waiting for it to complete.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- register reallocation between warpgroups ----
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- warpgroup MMA ----
// Shared-memory matrix descriptor of a K-major tile whose rows are `row_bytes` (64 or 128) long and
// swizzled at that width, as TMA writes them with CU_TENSOR_MAP_SWIZZLE_64B / _128B: groups of 8 rows
// are 8 · row_bytes apart. `addr` must be aligned to one such group (start of a k step within it is fine).
__device__ __forceinline__ uint64_t make_smem_desc(uint32_t addr, int row_bytes) {
  const uint64_t swizzle = row_bytes == 128 ? 1 : 2;  // 1: 128-byte swizzle, 2: 64-byte
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>((8 * row_bytes) >> 4) << 32) | (swizzle << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulator registers across a wgmma_wait: the
// wgmma asm statements write them asynchronously, which the compiler cannot see.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_registers(int32_t (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int kN, int kM>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[kN][kM]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int j = 0; j < kM; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
}

// The accumulator operands of m64nN: N / 2 registers per lane, listed as "{%0, ..., %(N/2 - 1)}" in the
// instruction and as constraint C ("=r", "+r", "+f") on d[0..N/2) in the operand list.
#define COMFY_SAGE_D8(C, d, i) \
  C(d[i]), C(d[i + 1]), C(d[i + 2]), C(d[i + 3]), C(d[i + 4]), C(d[i + 5]), C(d[i + 6]), C(d[i + 7])
#define COMFY_SAGE_D32(C, d) COMFY_SAGE_D8(C, d, 0), COMFY_SAGE_D8(C, d, 8), COMFY_SAGE_D8(C, d, 16), COMFY_SAGE_D8(C, d, 24)
#define COMFY_SAGE_D64(C, d)                                                                                   \
  COMFY_SAGE_D32(C, d), COMFY_SAGE_D8(C, d, 32), COMFY_SAGE_D8(C, d, 40), COMFY_SAGE_D8(C, d, 48), \
      COMFY_SAGE_D8(C, d, 56)
#define COMFY_SAGE_LIST32                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define COMFY_SAGE_LIST64                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "   \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, " \
  "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// The predicate for the scale-d operand: accumulate (d += A·B) when `accumulate` is non-zero, else d = A·B.
#define COMFY_SAGE_PRED(n) "{\n.reg .pred p;\nsetp.ne.b32 p, %" #n ", 0;\n"

// The first k step of Q·Kᵀ: D = A·B, the accumulators written only (their old values are not inputs, so the
// compiler need not keep them alive up to here).
__device__ __forceinline__ void wgmma_m64n128k32_s8_first(int32_t (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " COMFY_SAGE_LIST64 ", %64, %65, 0;\n"
               : COMFY_SAGE_D64("=r", d)
               : "l"(desc_a), "l"(desc_b));
}
__device__ __forceinline__ void wgmma_m64n128k32_s8(int32_t (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                    int accumulate) {
  asm volatile(COMFY_SAGE_PRED(66) "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " COMFY_SAGE_LIST64
                                   ", %64, %65, p;\n}\n"
               : COMFY_SAGE_D64("+r", d)
               : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// P̃·V in FP8 (fp32 accumulators) or INT8 (P̃ unsigned, V signed; s32 accumulators), A and B in shared memory.
__device__ __forceinline__ void wgmma_m64n64k32_e4m3_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                         int accumulate) {
  asm volatile(COMFY_SAGE_PRED(34) "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 " COMFY_SAGE_LIST32
                                   ", %32, %33, p, 1, 1;\n}\n"
               : COMFY_SAGE_D32("+f", d)
               : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                         int accumulate) {
  asm volatile(COMFY_SAGE_PRED(66) "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " COMFY_SAGE_LIST64
                                   ", %64, %65, p, 1, 1;\n}\n"
               : COMFY_SAGE_D64("+f", d)
               : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64n64k32_u8s8_ss(int32_t (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                         int accumulate) {
  asm volatile(COMFY_SAGE_PRED(34) "wgmma.mma_async.sync.aligned.m64n64k32.s32.u8.s8 " COMFY_SAGE_LIST32
                                   ", %32, %33, p;\n}\n"
               : COMFY_SAGE_D32("+r", d)
               : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64n128k32_u8s8_ss(int32_t (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                          int accumulate) {
  asm volatile(COMFY_SAGE_PRED(66) "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 " COMFY_SAGE_LIST64
                                   ", %64, %65, p;\n}\n"
               : COMFY_SAGE_D64("+r", d)
               : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// The same with A (P̃) from registers: a[0..3] hold a lane's A fragment of one k step (rows g and g + 8 of its
// warp's 16, keys 4t..4t+3 and 16 + 4t..; the m16n8k32 8-bit A layout).
__device__ __forceinline__ void wgmma_m64n64k32_e4m3_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                         int accumulate) {
  asm volatile(COMFY_SAGE_PRED(37) "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 " COMFY_SAGE_LIST32
                                   ", {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
               : COMFY_SAGE_D32("+f", d)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

#undef COMFY_SAGE_D8
#undef COMFY_SAGE_D32
#undef COMFY_SAGE_D64
#undef COMFY_SAGE_LIST32
#undef COMFY_SAGE_LIST64
#undef COMFY_SAGE_PRED

}  // namespace comfy_sage
