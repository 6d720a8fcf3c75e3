// Named constants shared by the quantization and attention kernels.
#pragma once

#include <limits>

namespace comfy_sage {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kFp8Max = 448.0f;             // largest finite float8 e4m3fn
constexpr float kLog2Fp8Max = 8.807354922057604f;  // log2(448): P̃ = exp2(S - m + this) lands in [0, 448]
constexpr float kInt8Max = 127.0f;
constexpr float kInt4Max = 7.0f;
constexpr float kInf = std::numeric_limits<float>::infinity();  // portable: MSVC has no __builtin_huge_valf
constexpr float kFloatMax = 3.40282347e38f;
constexpr float kMinScale = 1.17549435e-38f;  // FLT_MIN: a zero dequantization scale, kept positive
// 1.5 · 2^23: adding it to a float x with |x| < 2^22 rounds x to an integer (ties to even) and leaves that
// integer, two's complement, in the sum's low mantissa bits (its word minus this constant's word).
constexpr float kRoundingBias = 12582912.0f;
constexpr int kRoundingBiasBits = 0x4B400000;  // its word

constexpr int kWarpSize = 32;
// Rows of an m16n8 accumulator a lane holds differ by 8 (rows ≡ lane/4 mod 8 share one Q scale);
// its columns come in pairs (tokens whose index mod 8 is in {2j, 2j+1} share one K scale).
constexpr int kRowGroups = 8;
constexpr int kColGroups = 4;

}  // namespace comfy_sage
