// Entry points of the attention kernels, one per architecture family. Each enqueues the fused
// quantization and the attention kernel on `stream` and returns the first launch error.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace comfy_sage {

cudaError_t run_sm80_attention(const AttentionArgs& args, cudaStream_t stream);

// A key mask [rows][seq_kv] (element strides row_stride, key_stride) into AttentionArgs::key_bias's layout:
// `out` is [rows][row_length] float32, row_length = width + width / kSm80BlockK flags rounded up to 4
// (key_bias.cu).
enum class MaskType { kBool, kFloat16, kBFloat16, kFloat32, kFloat64 };
struct KeyBiasArgs {
  int rows, seq_kv, width, row_length;
  int64_t row_stride, key_stride;
  float* out;
};
cudaError_t launch_key_bias(const void* mask, MaskType type, const KeyBiasArgs& args, cudaStream_t stream);

// Whether this build holds code that runs on the current CUDA device.
bool sm80_runs_on_current_device();

// The wgmma family (sm_90a; absent from builds without it, where COMFY_SAGE_NO_SM90 is defined):
// INT8 Q·Kᵀ, FP8 or INT8 P·V, head dims 64 and 128; AttentionArgs::shape.block_k must be kSm90BlockK.
cudaError_t run_sm90_attention(const AttentionArgs& args, cudaStream_t stream);
bool sm90_runs_on_current_device();
// The sizes of AttentionArgs::split_partials (floats) and split_counters the wgmma kernel needs for a call
// on the current device (zero when it splits no tile).
void sm90_split_buffers(const Shape& shape, bool causal, int64_t* partial_floats, int* counters);

}  // namespace comfy_sage
