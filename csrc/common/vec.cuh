// 16-byte vector loads of eight fp16/bf16 values as float, and element-type traits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace comfy_sage {

template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float2 to_float2(uint32_t bits) {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  }
  static __device__ __forceinline__ uint32_t from_float2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(uint32_t bits) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  }
  static __device__ __forceinline__ uint32_t from_float2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Eight elements kept packed as loaded (one 16-byte vector, 4 registers instead of 8 floats' 8).
template <typename T>
__device__ __forceinline__ void unpack8(float (&x)[8], uint4 raw) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Elem<T>::to_float2(words[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Makes `raw` opaque to the compiler: values unpacked from it afterwards are computed again, not taken from an
// earlier unpacking kept live in registers (which would undo keeping the vector packed).
__device__ __forceinline__ void launder(uint4& raw) {
  asm volatile("" : "+r"(raw.x), "+r"(raw.y), "+r"(raw.z), "+r"(raw.w));
}

// 16 read-only bytes with an L2 eviction priority. The quantization reads K and V twice (their statistics,
// then the quantization itself): the first read asks L2 to keep them (evict_last), the second, their last
// use, and Q's one read let them go first (evict_first).
__device__ __forceinline__ uint64_t l2_evict_last() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint4 load16_hinted(const void* src, uint64_t policy) {
  uint4 r;
  asm("ld.global.nc.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(src), "l"(policy));
  return r;
}
__device__ __forceinline__ uint4 load16_keep(const void* src) { return load16_hinted(src, l2_evict_last()); }
__device__ __forceinline__ uint4 load16_last_use(const void* src) { return load16_hinted(src, l2_evict_first()); }

// Eight consecutive elements at `src` (16-byte aligned) as floats, read for the last time.
template <typename T>
__device__ __forceinline__ void load8(float (&x)[8], const T* src) {
  unpack8<T>(x, load16_last_use(src));
}

// atomicMax for non-negative floats: their bit patterns order like the values.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float value) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(value));
}

}  // namespace comfy_sage
