// Thin wrappers over the PTX instructions the kernels use: tensor-core mma.sync, ldmatrix, cp.async,
// conversions and the fast exp2. One place for the inline assembly; everything above it reads like C++.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k*"), with g = lane / 4, t = lane % 4:
//   C/D of every m16n8 shape: c0,c1 = (row g, cols 2t, 2t+1); c2,c3 = (row g+8, cols 2t, 2t+1).
//   A of m16n8k32 (8-bit) / m16n8k64 (4-bit): a0 = row g, bytes 4t..4t+3; a1 = row g+8, same bytes;
//     a2 = row g, bytes 16+4t..; a3 = row g+8, bytes 16+4t...
//   B of those (".col"): b0 = column g, bytes 4t..4t+3 of k; b1 = column g, bytes 16+4t...
//   A of m16n8k16 (16-bit): a0 = row g, k 2t,2t+1; a1 = row g+8; a2 = row g, k 8+2t..; a3 = row g+8, k 8+2t..
//   B of m16n8k16: b0 = column g, k 2t, 2t+1; b1 = column g, k 8+2t, 8+2t+1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace comfy_sage {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---- asynchronous copies global -> shared (16 bytes per thread) ----
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- ldmatrix: four 8x8 matrices of 16-bit elements (8 rows x 16 bytes each) ----
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- tensor-core products, D = A·B + C ----
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// INT8 P̃·V: A unsigned (P̃ in [0, 255]), B signed.
__device__ __forceinline__ void mma_u8s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_s4(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // FP8 tensor cores start at sm_89; the dispatcher never sends FP8 work below it.
#endif
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- conversions ----
// Two floats to two e4m3 bytes (round to nearest even, saturating): `lo` in bits 0-7, `hi` in bits 8-15.
__device__ __forceinline__ uint16_t pack_e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  __trap();
  return 0;
#endif
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Four floats in [0, 255] to unsigned bytes x0 (bits 0-7) .. x3, rounded to the nearest integer (ties to even)
// and saturated: cvt.pack.sat takes two rounded ints and the word to merge into, d = {b, a, c[15:0]} bytewise.
// On sm_90 ptxas fuses each rounding pair and pack into one F2IP (2 instructions per 4 values, as the FP8
// packing); before sm_90 the roundings are F2I on the special-function unit, which the exponentials need,
// so the mma.sync kernels use pack_u8x4_via_f16 instead.
__device__ __forceinline__ uint32_t pack_u8x4(float x0, float x1, float x2, float x3) {
  uint32_t hi, r;
  asm("cvt.pack.sat.u8.s32.b32 %0, %1, %2, 0;\n" : "=r"(hi) : "r"(__float2int_rn(x3)), "r"(__float2int_rn(x2)));
  asm("cvt.pack.sat.u8.s32.b32 %0, %1, %2, %3;\n"
      : "=r"(r)
      : "r"(__float2int_rn(x1)), "r"(__float2int_rn(x0)), "r"(hi));
  return r;
}
// The same bytes through fp16 (comfy_sage/reference/quant.py round_p_int8 with via_fp16): each value to fp16
// (nearest even), then + 1024 in fp16, which rounds to an integer (fp16's step is 1 in [1024, 2048)) and leaves
// it in the low byte; one byte permute gathers the four. 5 instructions per 4 values, none on the
// special-function unit.
__device__ __forceinline__ uint32_t pack_u8x4_via_f16(float x0, float x1, float x2, float x3) {
  const __half2 magic = __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400));  // 1024, 1024
  const __half2 lo = __hadd2(__floats2half2_rn(x0, x1), magic), hi = __hadd2(__floats2half2_rn(x2, x3), magic);
  return __byte_perm(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi), 0x6420);
}

// 2^x on the special-function unit (flushes denormal results to zero, exact 0 for -inf).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace comfy_sage
