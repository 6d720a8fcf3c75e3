// Fused quantization of Q, K, V into the buffers of AttentionArgs::buf (see quantize.cu).
#pragma once

#include <cuda_runtime.h>

#include "../attention/params.h"

namespace comfy_sage {

// Enqueues the quantization kernels on `stream`; returns the launch error, if any.
cudaError_t launch_quantize(const AttentionArgs& args, cudaStream_t stream);

}  // namespace comfy_sage
