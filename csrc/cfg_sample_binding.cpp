// Torch binding for csrc/cfg_sample.cu, built by torch.utils.cpp_extension.load (kernels/cfg_sampling.py).
// Shapes, dtypes and parameter values are validated in Python; the checks here guard the raw pointers.  Only
// CPU-side torch headers are used (the stream comes from Python as a handle), so csrc/compile_check.sh can
// compile this file with a CPU-only torch wheel too.
#include <torch/extension.h>

#include "cfg_sample.h"

namespace {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == rows &&
                  t.is_contiguous(),
              name, " must be a contiguous [", rows, "] ", dtype, " tensor on ", device);
}

void cfg_sample_out(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond, const at::Tensor& cfg_weight,
                    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                    const at::Tensor& seeds, const at::Tensor& counters, at::Tensor& tokens, at::Tensor& logprobs,
                    at::Tensor& mixed_logprobs, int64_t stream) {
  TORCH_CHECK(cond.is_cuda() && cond.dim() == 2 && cond.stride(1) == 1, "cond must be a [R, V] CUDA tensor "
              "with unit stride along V");
  const int64_t rows = cond.size(0);
  const at::Device device = cond.device();
  gotr1::LogitDtype dtype;
  switch (cond.scalar_type()) {
    case at::kFloat: dtype = gotr1::LogitDtype::kFloat32; break;
    case at::kHalf: dtype = gotr1::LogitDtype::kFloat16; break;
    case at::kBFloat16: dtype = gotr1::LogitDtype::kBFloat16; break;
    default: TORCH_CHECK(false, "cond must be fp32, fp16 or bf16, got ", cond.scalar_type());
  }
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->device() == device && uncond->scalar_type() == cond.scalar_type() &&
                    uncond->sizes() == cond.sizes() && uncond->stride(1) == 1,
                "uncond must match cond in shape, dtype and device, with unit stride along V");
  }
  check_vector(cfg_weight, "cfg_weight", at::kFloat, rows, device);
  check_vector(temperature, "temperature", at::kFloat, rows, device);
  check_vector(top_k, "top_k", at::kLong, rows, device);
  check_vector(top_p, "top_p", at::kFloat, rows, device);
  check_vector(seeds, "seeds", at::kLong, rows, device);
  check_vector(counters, "counters", at::kLong, rows, device);
  check_vector(tokens, "tokens", at::kLong, rows, device);
  check_vector(logprobs, "logprobs", at::kFloat, rows, device);
  check_vector(mixed_logprobs, "mixed_logprobs", at::kFloat, rows, device);

  gotr1::CfgSampleArgs args{};
  args.cond = cond.data_ptr();
  args.uncond = uncond.has_value() ? uncond->data_ptr() : nullptr;
  args.cond_row_stride = cond.stride(0);
  args.uncond_row_stride = uncond.has_value() ? uncond->stride(0) : 0;
  args.rows = rows;
  args.vocab = cond.size(1);
  args.dtype = dtype;
  args.cfg_weight = cfg_weight.data_ptr<float>();
  args.temperature = temperature.data_ptr<float>();
  args.top_k = top_k.data_ptr<int64_t>();
  args.top_p = top_p.data_ptr<float>();
  args.seeds = seeds.data_ptr<int64_t>();
  args.counters = counters.data_ptr<int64_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  args.mixed_logprobs = mixed_logprobs.data_ptr<float>();
  args.splits = gotr1::cfg_sample_splits(rows, args.vocab);
  at::Tensor partials;  // from torch's caching allocator: no cudaMalloc per step
  if (args.splits > 1) {
    partials = at::empty({rows * args.splits * static_cast<int64_t>(sizeof(gotr1::CfgSamplePartial))},
                         cond.options().dtype(at::kByte));
    args.partials = reinterpret_cast<gotr1::CfgSamplePartial*>(partials.data_ptr());
  }
  const cudaError_t status = gotr1::launch_cfg_sample(args, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(status == cudaSuccess, "cfg_sample kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cfg_sample_out", &cfg_sample_out,
        "Fused CFG + top-k/top-p + Philox sampling into tokens/logprobs/mixed_logprobs, enqueued on `stream` "
        "(a cudaStream_t of the logits' device, which must be the current device)");
}
