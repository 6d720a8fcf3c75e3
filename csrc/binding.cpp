// The only file that knows torch: registers the ops with the LibTorch stable ABI (torch >= 2.10), checks
// arguments, allocates outputs and the quantization workspace, and launches on the current CUDA stream.
// It never synchronizes. Fake (meta) kernels and the Python-side argument handling live in comfy_sage/ops.py.
#include <Python.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "attention/attention.h"
#include "attention/params.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using namespace comfy_sage;

constexpr int64_t kLayoutHND = 0, kLayoutNHD = 1;
constexpr int64_t kAlign = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// [B, H, N, D] sizes and strides of a caller-layout tensor.
struct Dims {
  int64_t b, h, n, d, sb, sh, sn;
};
Dims dims_of(const Tensor& x, int64_t layout) {
  const int hd = layout == kLayoutHND ? 1 : 2, nd = layout == kLayoutHND ? 2 : 1;
  return {x.size(0), x.size(hd), x.size(nd), x.size(3), x.stride(0), x.stride(hd), x.stride(nd)};
}

void check_input(const Tensor& x, const char* name, ScalarType dtype, int64_t device) {
  STD_TORCH_CHECK(x.dim() == 4, name, " must be 4-D");
  STD_TORCH_CHECK(x.is_cuda() && x.get_device_index() == device, name, " must be on q's CUDA device");
  STD_TORCH_CHECK(x.scalar_type() == dtype, name, " must have q's dtype (float16 or bfloat16)");
  STD_TORCH_CHECK(x.stride(3) == 1, name, " must be contiguous in head_dim");
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  for (int i = 0; i < 3; ++i) {  // a size-1 dimension's stride is never used
    STD_TORCH_CHECK(x.size(i) == 1 || x.stride(i) % 8 == 0, name, " strides must be multiples of 8");
  }
}

// PyTorch's current CUDA stream on `device`, where every launch goes.
cudaStream_t current_stream(int64_t device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// A fresh tensor on `like`'s device. A failed allocation (the GPU out of memory: besides the output, which PyTorch
// attention allocates too, the quantized copies of Q, K and V take about half their bytes) raises an error that
// starts with kOutOfMemory and says how many bytes the call needs in all; the Python side (comfy_sage/ops.py
// OUT_OF_MEMORY) answers it with PyTorch attention. The stable ABI's own error would not say what failed.
constexpr const char* kOutOfMemory = "comfy_sage: out of GPU memory";
Tensor allocate(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype, int64_t call_bytes) {
  try {
    return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
  } catch (const std::exception&) {
    throw std::runtime_error(std::string(kOutOfMemory) + ": " + std::to_string(call_bytes) +
                             " bytes for the output and the quantized copies of Q, K and V");
  }
}

constexpr int64_t kFamilySm80 = 80, kFamilySm90 = 90;

#ifdef COMFY_SAGE_NO_SM90
constexpr bool kHaveSm90 = false;
bool sm90_runs() { return false; }
cudaError_t run_sm90(const AttentionArgs&, cudaStream_t) { return cudaErrorNoKernelImageForDevice; }
void sm90_buffers(const Shape&, bool, int64_t* partial_floats, int* counters) { *partial_floats = 0, *counters = 0; }
#else
constexpr bool kHaveSm90 = true;
bool sm90_runs() { return sm90_runs_on_current_device(); }
cudaError_t run_sm90(const AttentionArgs& a, cudaStream_t stream) { return run_sm90_attention(a, stream); }
void sm90_buffers(const Shape& s, bool causal, int64_t* partial_floats, int* counters) {
  sm90_split_buffers(s, causal, partial_floats, counters);
}
#endif

std::tuple<Tensor, Tensor> attention(Tensor q, Tensor k, Tensor v, int64_t layout, int64_t qk_bits, int64_t pv,
                                     bool is_causal, double sm_scale, bool return_lse, int64_t family,
                                     std::optional<Tensor> key_bias) {
  STD_TORCH_CHECK(layout == kLayoutHND || layout == kLayoutNHD, "layout must be 0 (HND) or 1 (NHD)");
  STD_TORCH_CHECK(qk_bits == 8 || qk_bits == 4, "qk_bits must be 8 or 4");
  STD_TORCH_CHECK(pv >= 0 && pv <= 2, "pv must be 0 (FP16), 1 (FP8) or 2 (INT8)");
  const auto pv_type = static_cast<PvType>(pv);
  STD_TORCH_CHECK(pv_type != PvType::kInt8 || qk_bits == 8, "INT8 P·V runs with INT8 Q·K^T only");
  STD_TORCH_CHECK(family == kFamilySm80 || family == kFamilySm90, "family must be 80 (mma.sync) or 90 (wgmma)");
  const bool sm90 = family == kFamilySm90;
  STD_TORCH_CHECK(!sm90 || kHaveSm90, "this build has no wgmma (sm_90a) kernels");
  STD_TORCH_CHECK(!sm90 || (qk_bits == 8 && pv_type != PvType::kFp16),
                  "the wgmma kernels run INT8 Q·K^T with FP8 or INT8 P·V only");
  const ScalarType dtype = q.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16, "q must be float16 or bfloat16");
  const int64_t device = q.get_device_index();
  check_input(q, "q", dtype, device);
  check_input(k, "k", dtype, device);
  check_input(v, "v", dtype, device);
  const Dims dq = dims_of(q, layout), dk = dims_of(k, layout), dv = dims_of(v, layout);
  STD_TORCH_CHECK(dk.b == dq.b && dv.b == dq.b && dk.d == dq.d && dv.d == dq.d, "q, k, v sizes disagree");
  STD_TORCH_CHECK(dk.h == dv.h && dk.n == dv.n && dk.h > 0 && dq.h % dk.h == 0, "k, v heads/tokens disagree");
  STD_TORCH_CHECK(dq.d % 8 == 0 && dq.d <= 256, "head_dim must be a multiple of 8, at most 256");
  STD_TORCH_CHECK(!sm90 || dq.d <= 128, "the wgmma kernels take head_dim up to 128");
  STD_TORCH_CHECK(pv_type != PvType::kInt8 || dk.n <= kInt8PvMaxKeys,
                  "INT8 P·V takes at most ", kInt8PvMaxKeys, " keys (its int32 accumulator); use FP8 or FP16 P·V");

  const int64_t key_bias_width = round_up(std::max<int64_t>(dk.n, 1), kKeyBiasAlign);
  if (key_bias.has_value()) {  // comfy_sage/ops.py key_bias: [B or 1, width + flags] float32, contiguous
    const Tensor& kb = *key_bias;
    STD_TORCH_CHECK(qk_bits == 8, "key masks run with INT8 Q·K^T only");
    STD_TORCH_CHECK(!is_causal, "a key mask and is_causal cannot be combined (fold the causal mask into the mask)");
    STD_TORCH_CHECK(kb.scalar_type() == ScalarType::Float && kb.dim() == 2, "key_bias must be 2-D float32");
    STD_TORCH_CHECK(kb.is_cuda() && kb.get_device_index() == device, "key_bias must be on q's CUDA device");
    STD_TORCH_CHECK(kb.is_contiguous() && reinterpret_cast<uintptr_t>(kb.data_ptr()) % 16 == 0,
                    "key_bias must be contiguous and 16-byte aligned");
    STD_TORCH_CHECK(kb.size(0) == 1 || kb.size(0) == dq.b, "key_bias must have q's batch size or 1 row");
    STD_TORCH_CHECK(kb.size(1) == key_bias_row_length(key_bias_width),
                    "key_bias rows must hold N_kv rounded up to ", kKeyBiasAlign, " values and a flag per ",
                    kSm80BlockK, " of them");
  }

  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);

  const std::array<int64_t, 4> out_sizes = layout == kLayoutHND ? std::array<int64_t, 4>{dq.b, dq.h, dq.n, dq.d}
                                                                 : std::array<int64_t, 4>{dq.b, dq.n, dq.h, dq.d};
  const int64_t output_bytes = dq.b * dq.h * dq.n * dq.d * 2;
  const int64_t lse_bytes = return_lse ? dq.b * dq.h * dq.n * 4 : 0;
  // The output contiguous, so that every row starts 16-byte aligned (head_dim is a multiple of 8): the kernels'
  // epilogue writes 16-byte vectors. It is allocated first (tests hand it a block they poisoned), then the LSE.
  const auto allocate_results = [&](int64_t call_bytes) {
    Tensor out = allocate(q, {out_sizes[0], out_sizes[1], out_sizes[2], out_sizes[3]}, dtype, call_bytes);
    Tensor lse = return_lse ? allocate(q, {dq.b, dq.h, dq.n}, ScalarType::Float, call_bytes)
                            : allocate(q, {0}, ScalarType::Float, call_bytes);
    return std::make_tuple(out, lse);
  };
  if (dq.b == 0 || dq.h == 0 || dq.n == 0) return allocate_results(0);  // nothing to compute, no grid of size 0

  // Grid dimensions y and z take at most 65,535: the quantization's y is batch × heads, the attention
  // kernels' y the query heads and z the batch. A call with more runs in batch chunks that fit, one after
  // another on the stream (factorized video attention, e.g. temporal attention over every latent position,
  // has batch × heads of 10^5 and more).
  STD_TORCH_CHECK(dq.h <= kMaxGridYZ, "the kernels take at most ", kMaxGridYZ, " query heads a call");
  const int64_t chunk = std::min<int64_t>(dq.b, kMaxGridYZ / dq.h);
  const int64_t last_chunk = dq.b - (dq.b - 1) / chunk * chunk;  // the last chunk's batch (≤ chunk)

  Shape s{};
  s.heads_q = dq.h, s.heads_kv = dk.h, s.seq_q = dq.n, s.seq_kv = dk.n, s.head_dim = dq.d;
  s.padded_dim = dq.d <= 64 ? 64 : dq.d <= 128 ? 128 : 256;
  s.block_k = sm90 ? kSm90BlockK : kSm80BlockK;
  s.key_mask = key_bias.has_value();
  s.padded_q = round_up(dq.n, sm90 ? sm90_block_q(s.padded_dim, s.key_mask) : kSm80BlockQ);
  s.padded_kv = round_up(std::max<int64_t>(dk.n, 1), s.block_k);

  // The split tiles' buffers of a chunk of `batch` (the last, smaller chunk may split more tiles).
  const auto split_sizes = [&](int64_t batch, int64_t* floats, int* counters) {
    Shape c = s;
    c.batch = static_cast<int>(batch);
    *floats = 0, *counters = 0;
    if (sm90) sm90_buffers(c, is_causal, floats, counters);
  };
  int64_t split_floats = 0, last_split_floats = 0;
  int split_counters = 0, last_split_counters = 0;
  split_sizes(chunk, &split_floats, &split_counters);
  if (last_chunk == chunk) {
    last_split_floats = split_floats, last_split_counters = split_counters;
  } else {
    split_sizes(last_chunk, &last_split_floats, &last_split_counters);
  }
  split_floats = std::max(split_floats, last_split_floats);
  const int max_split_counters = std::max(split_counters, last_split_counters);

  // One workspace for every quantized buffer, sized for a chunk and reused by each.
  const int64_t bq = chunk * dq.h, bkv = chunk * dk.h;
  const bool int4 = qk_bits == 4;
  const int64_t q_blocks = s.padded_q / sm80_block_q(s.padded_dim), k_blocks = s.padded_kv / s.block_k;
  const int64_t sizes[] = {
      bq * s.padded_q * s.padded_dim * qk_bits / 8,             // q
      bq * (s.padded_q / kSm80WarpQ) * 8 * 4,                   // q_scale
      bkv * s.padded_kv * s.padded_dim * qk_bits / 8,           // k
      bkv * k_blocks * 4 * 4,                                   // k_scale
      (bkv * s.padded_dim * 2 + max_split_counters + bkv) * 4,  // k_sum, v_amax, the counters (one memset)
      bkv * s.padded_kv * s.padded_dim * (pv_type == PvType::kFp16 ? 2 : 1),  // v
      return_lse ? bq * dq.n * 4 : 0,                           // q·k̄
      int4 ? bkv * s.padded_kv * s.padded_dim : 0,              // k8
      int4 ? bkv * k_blocks * 4 * 4 : 0,                        // k8_scale
      int4 ? bq * q_blocks * s.padded_dim : 0,                  // q_mean
      int4 ? bq * q_blocks * 4 : 0,                             // q_mean_scale
      split_floats * 4,                                         // the wgmma kernel's split-tile partials
      bkv * kv_stats_parts(s.seq_kv) * s.padded_dim * 4,        // kv_stats's K sums per part
  };
  constexpr int kBuffers = sizeof(sizes) / sizeof(sizes[0]);
  int64_t offsets[kBuffers], total = 0;
  for (int i = 0; i < kBuffers; ++i) offsets[i] = total, total += round_up(sizes[i], kAlign);
  const int64_t call_bytes = output_bytes + lse_bytes + total;
  auto [out, lse] = allocate_results(call_bytes);
  Tensor workspace = allocate(q, {total}, ScalarType::Byte, call_bytes);
  auto* base = static_cast<uint8_t*>(workspace.data_ptr());

  AttentionArgs a{};
  const Dims dout = dims_of(out, layout);
  a.dtype = dtype == ScalarType::BFloat16 ? DType::kBFloat16 : DType::kFloat16;
  a.buf.q = reinterpret_cast<int8_t*>(base + offsets[0]);
  a.buf.q_scale = reinterpret_cast<float*>(base + offsets[1]);
  a.buf.k = reinterpret_cast<int8_t*>(base + offsets[2]);
  a.buf.k_scale = reinterpret_cast<float*>(base + offsets[3]);
  a.buf.k_sum = reinterpret_cast<float*>(base + offsets[4]);
  a.buf.v = base + offsets[5];
  a.buf.q_dot_kmean = return_lse ? reinterpret_cast<float*>(base + offsets[6]) : nullptr;
  a.buf.k8 = int4 ? reinterpret_cast<int8_t*>(base + offsets[7]) : nullptr;
  a.buf.k8_scale = int4 ? reinterpret_cast<float*>(base + offsets[8]) : nullptr;
  a.buf.q_mean = int4 ? reinterpret_cast<int8_t*>(base + offsets[9]) : nullptr;
  a.buf.q_mean_scale = int4 ? reinterpret_cast<float*>(base + offsets[10]) : nullptr;
  a.split_partials = split_floats > 0 ? reinterpret_cast<float*>(base + offsets[11]) : nullptr;
  a.buf.k_partial = reinterpret_cast<float*>(base + offsets[12]);
  a.sm_scale = static_cast<float>(sm_scale);
  a.causal = is_causal;
  a.qk_bits = static_cast<int>(qk_bits);
  a.pv = pv_type;
  const float* const key_bias_ptr = key_bias.has_value() ? static_cast<const float*>(key_bias->data_ptr()) : nullptr;
  a.key_bias_batch_stride = key_bias.has_value() && key_bias->size(0) > 1 ? key_bias->size(1) : 0;
  a.key_bias_width = static_cast<int>(key_bias_width);

  auto* const q_bytes = static_cast<uint8_t*>(q.data_ptr());
  auto* const k_bytes = static_cast<uint8_t*>(k.data_ptr());
  auto* const v_bytes = static_cast<uint8_t*>(v.data_ptr());
  auto* const out_bytes = static_cast<uint8_t*>(out.data_ptr());
  constexpr int64_t kElementBytes = 2;  // float16 / bfloat16
  for (int64_t b0 = 0; b0 < dq.b; b0 += chunk) {
    const int64_t batch = std::min(chunk, dq.b - b0), bkv_chunk = batch * dk.h;
    a.q = {q_bytes + b0 * dq.sb * kElementBytes, dq.sb, dq.sh, dq.sn};
    a.k = {k_bytes + b0 * dk.sb * kElementBytes, dk.sb, dk.sh, dk.sn};
    a.v = {v_bytes + b0 * dv.sb * kElementBytes, dv.sb, dv.sh, dv.sn};
    a.out = {out_bytes + b0 * dout.sb * kElementBytes, dout.sb, dout.sh, dout.sn};
    a.lse = return_lse ? static_cast<float*>(lse.data_ptr()) + b0 * dq.h * dq.n : nullptr;
    a.key_bias = key_bias_ptr != nullptr ? key_bias_ptr + b0 * a.key_bias_batch_stride : nullptr;
    a.shape = s;
    a.shape.batch = static_cast<int>(batch);
    // k_sum, v_amax, the split counters and kv_stats's arrivals packed for this chunk, as its memset
    // clears them.
    a.buf.v_amax = a.buf.k_sum + bkv_chunk * s.padded_dim;
    int* const counters = reinterpret_cast<int*>(a.buf.v_amax + bkv_chunk * s.padded_dim);
    a.num_split_counters = batch == chunk ? split_counters : last_split_counters;
    a.split_counters = a.num_split_counters > 0 ? counters : nullptr;
    a.buf.kv_stats_arrivals = counters + a.num_split_counters;
    const cudaError_t err = sm90 ? run_sm90(a, stream) : run_sm80_attention(a, stream);
    STD_TORCH_CHECK(err == cudaSuccess, "comfy_sage attention launch failed: ", cudaGetErrorString(err));
  }
  return {out, lse};
}

// A key mask [rows, seq_kv] (any strides; bool, float16, bfloat16, float32 or float64) as `attention`'s key_bias:
// [rows, width + flags] float32 (attention/key_bias.cu; comfy_sage/ops.py key_bias), in one launch.
Tensor key_bias(Tensor mask) {
  STD_TORCH_CHECK(mask.dim() == 2, "mask must be 2-D [rows, seq_kv]");
  STD_TORCH_CHECK(mask.is_cuda(), "mask must be a CUDA tensor");
  const ScalarType dtype = mask.scalar_type();
  MaskType type;
  switch (dtype) {
    case ScalarType::Bool: type = MaskType::kBool; break;
    case ScalarType::Half: type = MaskType::kFloat16; break;
    case ScalarType::BFloat16: type = MaskType::kBFloat16; break;
    case ScalarType::Float: type = MaskType::kFloat32; break;
    case ScalarType::Double: type = MaskType::kFloat64; break;
    default: STD_TORCH_CHECK(false, "mask must be bool, float16, bfloat16, float32 or float64");
  }
  const int64_t rows = mask.size(0), seq_kv = mask.size(1);
  STD_TORCH_CHECK(rows >= 1 && rows <= kMaxGridYZ && seq_kv >= 1 && seq_kv <= INT32_MAX - kKeyBiasAlign,
                  "mask must have 1 to ", kMaxGridYZ, " rows and at least one key");
  const int64_t width = round_up(seq_kv, kKeyBiasAlign), row_length = key_bias_row_length(width);
  const int64_t device = mask.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const std::array<int64_t, 2> sizes{rows, row_length};
  Tensor out = torch::stable::new_empty(mask, torch::headeronly::IntHeaderOnlyArrayRef(sizes.data(), sizes.size()),
                                        ScalarType::Float);
  KeyBiasArgs a{};
  a.rows = static_cast<int>(rows), a.seq_kv = static_cast<int>(seq_kv), a.width = static_cast<int>(width);
  a.row_length = static_cast<int>(row_length), a.row_stride = mask.stride(0), a.key_stride = mask.stride(1);
  a.out = static_cast<float*>(out.data_ptr());
  const cudaError_t err = launch_key_bias(mask.data_ptr(), type, a, stream);
  STD_TORCH_CHECK(err == cudaSuccess, "comfy_sage key_bias launch failed: ", cudaGetErrorString(err));
  return out;
}

// Whether kernel family `family` (80 or 90) has code for `device` (a CUDA device index). Host-side, no launch.
bool runs_on(int64_t device, int64_t family) {
  torch::stable::accelerator::DeviceGuard guard(device);
  return family == kFamilySm90 ? sm90_runs() : family == kFamilySm80 && sm80_runs_on_current_device();
}

}  // namespace

STABLE_TORCH_LIBRARY(comfy_sage, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, int layout, int qk_bits, int pv, bool is_causal, "
      "float sm_scale, bool return_lse, int family=80, Tensor? key_bias=None) -> (Tensor, Tensor)");
  m.def("key_bias(Tensor mask) -> Tensor");
  m.def("runs_on(int device, int family=80) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(comfy_sage, CUDA, m) {
  m.impl("attention", TORCH_BOX(&attention));
  m.impl("key_bias", TORCH_BOX(&key_bias));
}
STABLE_TORCH_LIBRARY_IMPL(comfy_sage, CompositeExplicitAutograd, m) { m.impl("runs_on", TORCH_BOX(&runs_on)); }

// An importable, empty Python module (abi3: no pybind11); the ops live in torch.ops.comfy_sage.
extern "C" {
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
}
