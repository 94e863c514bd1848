// Fused CFG mix + temperature + top-k/top-p + Philox Gumbel-max sampling + log-probs (issue 9).
// Plain CUDA C++ interface (no torch headers), so cfg_sample.cu compiles standalone with nvcc; the torch
// binding lives in cfg_sample_binding.cpp. Semantics: kernels/cfg_sampling.py (module docstring).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace gotr1 {

enum class LogitDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What one block of a split row found over its slice of the vocabulary: the log-sum-exp states of mixed/T and
// cond/T and its best sampling key (cfg_sample.cu merges them in split order).
struct CfgSamplePartial {
  float s_max, s_sum, c_max, c_sum, best;
  int32_t best_index;
};

struct CfgSampleArgs {
  const void* cond;            // [rows, vocab], unit stride along vocab
  const void* uncond;          // same layout, or nullptr when unpaired
  int64_t cond_row_stride;     // in elements
  int64_t uncond_row_stride;   // in elements
  int64_t rows;
  int64_t vocab;               // < 2^31
  LogitDtype dtype;
  const float* cfg_weight;     // [rows]
  const float* temperature;    // [rows], 0 = greedy
  const int64_t* top_k;        // [rows], 0 = off
  const float* top_p;          // [rows], >= 1 = off
  const int64_t* seeds;        // [rows], Philox key
  const int64_t* counters;     // [rows], Philox counter words 1-2
  int64_t* tokens;             // [rows] out
  float* logprobs;             // [rows] out, log_softmax(cond / T)[token]
  float* mixed_logprobs;       // [rows] out, log_softmax(mixed / T)[token]
  int64_t splits;              // blocks per row (cfg_sample_splits); rows with top-k/top-p use one of them
  CfgSamplePartial* partials;  // [rows, splits] workspace when splits > 1, else unused
};

// Blocks per row for `rows` rows of `vocab` logits on the current device (its SM count): enough blocks to
// fill the device, each with at least one group of 4 tokens per thread; 1 when the rows alone fill it.
int64_t cfg_sample_splits(int64_t rows, int64_t vocab);

// Enqueues `args.splits` blocks per row on `stream`, then, when that is more than 1, the merge of the partials;
// returns the launch status (cudaErrorInvalidValue for bad sizes).
cudaError_t launch_cfg_sample(const CfgSampleArgs& args, cudaStream_t stream);

}  // namespace gotr1
