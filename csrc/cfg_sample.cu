// Fused CFG mix + temperature + top-k/top-p + Philox Gumbel-max sampling + log-probs.
//
// Semantics are those of kernels/cfg_sampling.py (the torch path and sorting-based reference); this file is
// plain CUDA C++ (no torch headers) so `nvcc -c` checks it anywhere.  A decode step has only a few dozen rows, so
// one block per row would leave most SMs idle (on an H100 a step's 16 text rows of 102400 logits took 116 us,
// bound by the Gumbel noise's float64 logs on 16 SMs): greedy and unfiltered rows (GoT-R1's recipe) are split
// over `cfg_sample_splits` blocks, each leaving its slice's log-sum-exp states and best key, merged in split
// order by a second kernel; rows with top-k or top-p keep one block for the whole row.  Per row, all passes
// re-read the logits (L1/L2 resident at these sizes) with 4-wide vector loads:
//   pass 1       online max/sum-exp of mixed/T and cond/T; for greedy or unfiltered rows also the argmax
//                of the sampling keys, so those rows need one pass in all;
//   top-k        3 passes of an MSD radix select over order-preserving 32-bit keys of s = mixed/T, counting
//                tokens per 11/11/10-bit digit: the k-th largest value, ties kept (no sort);
//   top-p        3 more radix passes among the top-k survivors, weighting each digit by exp(s - max) in
//                float64 shared-memory histograms: the largest threshold whose kept mass reaches top_p * Z;
//   sample       argmax over kept tokens of s + G, G = -log(-log(U)) (float64, rounded to fp32), U from
//                Philox4x32-10 keyed by (seed) at counter (token // 4, counter lo, counter hi, 0).
// Tokens equal the torch path's exactly except where fp32 probabilities round differently at a top-p boundary.
#include "cfg_sample_kernel.cuh"

namespace gotr1 {
namespace {

using cfg_sample_detail::cfg_sample_kernel;
using cfg_sample_detail::cfg_sample_merge_kernel;
using cfg_sample_detail::kMergeThreads;
using cfg_sample_detail::kThreads;

template <typename T, bool kPaired>
cudaError_t launch_kernels(const CfgSampleArgs& args, cudaStream_t stream) {
  const bool vec = cfg_sample_detail::vector_loads_ok<T>(args);
  cfg_sample_kernel<T, kPaired><<<dim3(static_cast<unsigned>(args.rows), static_cast<unsigned>(args.splits)),
                                  kThreads, 0, stream>>>(args, vec);
  if (args.splits > 1) {
    const unsigned blocks = static_cast<unsigned>((args.rows + kMergeThreads - 1) / kMergeThreads);
    cfg_sample_merge_kernel<T, kPaired><<<blocks, kMergeThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const CfgSampleArgs& args, cudaStream_t stream) {
  return args.uncond != nullptr ? launch_kernels<T, true>(args, stream) : launch_kernels<T, false>(args, stream);
}

}  // namespace

int64_t cfg_sample_splits(int64_t rows, int64_t vocab) {
  int device = 0, sm_count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;  // the launch that follows reports the error
  }
  return cfg_sample_detail::splits_for(rows, vocab, sm_count);
}

cudaError_t launch_cfg_sample(const CfgSampleArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.rows > INT_MAX || args.vocab < 1 || args.vocab > INT_MAX - 4 || args.splits < 1 ||
      args.splits > 65535 || (args.splits > 1 && args.partials == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  switch (args.dtype) {
    case LogitDtype::kFloat32:
      return launch_typed<float>(args, stream);
    case LogitDtype::kFloat16:
      return launch_typed<__half>(args, stream);
    case LogitDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gotr1
