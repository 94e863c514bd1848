// Device code of the fused CFG sampling kernel (semantics and pass structure: cfg_sample.cu).  A header so that
// csrc/host_emulation.cpp can run the very same code on the CPU, one std::thread per CUDA thread.
#pragma once

#include "cfg_sample.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#ifndef GOTR1_CFG_SAMPLE_THREADS
#define GOTR1_CFG_SAMPLE_THREADS 1024
#endif

namespace gotr1::cfg_sample_detail {

constexpr int kThreads = GOTR1_CFG_SAMPLE_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;  // 11-bit digits: keys resolved in 3 levels of 11, 11 and 10 bits
constexpr int kBinsPerThread = kBins / kThreads;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "block reductions finish in one warp");
static_assert(kBins % kThreads == 0, "each thread owns kBinsPerThread histogram bins in the scan");

struct SharedStorage {
  double mass[kBins];
  unsigned int count[kBins];
  double scan[kWarps];
  float red[4][kWarps];
  int red_index[kWarps];
  int selected;
  int lowest_occupied;
  double above;
};

// ------------------------------------------------------------------------------------------------ loads

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

template <typename T>
__device__ __forceinline__ float bits16_to_f32(uint32_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);  // bf16 is the top half of an fp32
  }
}

// Tokens i .. i+3 of a row as fp32; one 16- or 8-byte load when aligned, tokens past the end read as -inf.
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ row, int64_t i, int64_t vocab, bool vec,
                                      float (&out)[4]) {
  if (vec && i + 4 <= vocab) {
    if constexpr (std::is_same_v<T, float>) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row + i));
      out[0] = v.x;
      out[1] = v.y;
      out[2] = v.z;
      out[3] = v.w;
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + i));
      out[0] = bits16_to_f32<T>(v.x & 0xFFFFu);
      out[1] = bits16_to_f32<T>(v.x >> 16);
      out[2] = bits16_to_f32<T>(v.y & 0xFFFFu);
      out[3] = bits16_to_f32<T>(v.y >> 16);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = i + j < vocab ? to_f32(row[i + j]) : -INFINITY;
  }
}

// ------------------------------------------------------------------------------------------------ math

// u + w (c - u) rounded op by op (no FMA contraction), as torch computes it; c == u (also -inf in both) gives c.
__device__ __forceinline__ float mix(float c, float u, float w) {
  return c == u ? c : __fadd_rn(u, __fmul_rn(w, __fsub_rn(c, u)));
}

// Order-preserving unsigned key of an fp32 value; -0.0 folds into +0.0 so equal values stay tied.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Philox4x32-10 (Salmon et al. 2011); the torch twin is kernels.cfg_sampling.philox4x32_10.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return ctr;
}

// Gumbel noise from one Philox word: U = ((x >> 9) * 2 + 1) 2^-24 (exact in fp32, inside (0, 1)), then
// -log(-log U) in float64 rounded to fp32, so that implementations with different log ulps still agree.
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float u = __uint2float_rn(((bits >> 9) << 1) | 1u) * 5.9604644775390625e-08f;
  return static_cast<float>(-log(-log(static_cast<double>(u))));
}

__device__ __forceinline__ void gumbel4(uint2 key, int64_t group, uint32_t ctr_lo, uint32_t ctr_hi,
                                        float (&out)[4]) {
  const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(group), ctr_lo, ctr_hi, 0u), key);
  out[0] = gumbel(r.x);
  out[1] = gumbel(r.y);
  out[2] = gumbel(r.z);
  out[3] = gumbel(r.w);
}

// Online log-sum-exp state (max m, sum l of exp(x - m)); merging in (m2, l2).
__device__ __forceinline__ void merge_lse(float& m, float& l, float m2, float l2) {
  if (m2 > m) {
    l = l * expf(m - m2) + l2;
    m = m2;
  } else if (m2 != -INFINITY) {
    l += l2 * expf(m2 - m);
  }
}

// Argmax order: larger key, then lower index (NaN keys never win).
__device__ __forceinline__ bool better(float key, int index, float best, int best_index) {
  return key > best || (key == best && index < best_index);
}

// ------------------------------------------------------------------------------------------------ block ops

// Two log-sum-exp states reduced over the block; every thread gets thread 0's result.
__device__ inline void block_lse2(float& m1, float& l1, float& m2, float& l2, SharedStorage& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int round = 0; round < 2; ++round) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float om1 = __shfl_down_sync(kFullMask, m1, offset), ol1 = __shfl_down_sync(kFullMask, l1, offset);
      const float om2 = __shfl_down_sync(kFullMask, m2, offset), ol2 = __shfl_down_sync(kFullMask, l2, offset);
      merge_lse(m1, l1, om1, ol1);
      merge_lse(m2, l2, om2, ol2);
    }
    if (round == 1) break;
    if (lane == 0) {
      sh.red[0][warp] = m1;
      sh.red[1][warp] = l1;
      sh.red[2][warp] = m2;
      sh.red[3][warp] = l2;
    }
    __syncthreads();
    m1 = lane < kWarps ? sh.red[0][lane] : -INFINITY;
    l1 = lane < kWarps ? sh.red[1][lane] : 0.f;
    m2 = lane < kWarps ? sh.red[2][lane] : -INFINITY;
    l2 = lane < kWarps ? sh.red[3][lane] : 0.f;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sh.red[0][0] = m1;
    sh.red[1][0] = l1;
    sh.red[2][0] = m2;
    sh.red[3][0] = l2;
  }
  __syncthreads();
  m1 = sh.red[0][0];
  l1 = sh.red[1][0];
  m2 = sh.red[2][0];
  l2 = sh.red[3][0];
  __syncthreads();
}

// (key, index) argmax over the block; every thread gets the result.
__device__ inline void block_argmax(float& key, int& index, SharedStorage& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int round = 0; round < 2; ++round) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float k = __shfl_xor_sync(kFullMask, key, offset);
      const int i = __shfl_xor_sync(kFullMask, index, offset);
      if (better(k, i, key, index)) {
        key = k;
        index = i;
      }
    }
    if (round == 1) break;
    if (lane == 0) {
      sh.red[0][warp] = key;
      sh.red_index[warp] = index;
    }
    __syncthreads();
    key = lane < kWarps ? sh.red[0][lane] : -INFINITY;
    index = lane < kWarps ? sh.red_index[lane] : INT_MAX;
    __syncthreads();
  }
}

// Exclusive prefix sum over threads of `value`; `total` gets the block sum.
__device__ inline double block_exclusive_scan(double value, double& total, SharedStorage& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const double y = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  double exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) exclusive = 0.0;
  if (lane == 31) sh.scan[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    double warp_total = lane < kWarps ? sh.scan[lane] : 0.0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const double y = __shfl_up_sync(kFullMask, warp_total, offset);
      if (lane >= offset) warp_total += y;
    }
    if (lane < kWarps) sh.scan[lane] = warp_total;
  }
  __syncthreads();
  total = sh.scan[kWarps - 1];
  if (warp > 0) exclusive += sh.scan[warp - 1];
  __syncthreads();
  return exclusive;
}

// MSD radix select: the largest key t with sum(weight of visited keys >= t) >= target, or the smallest visited
// key when none qualifies (float64 rounding).  `visit(add)` must call add(key, weight) for every candidate of
// the row (the same set each call).  kMass: weights summed in float64 and `target` a fraction of their total
// (top-p); otherwise every candidate weighs 1, counted in integers, and `target` is a count (top-k).
// Mirrors kernels.cfg_sampling._radix_threshold.
template <bool kMass, class Visit>
__device__ uint32_t radix_select(SharedStorage& sh, Visit&& visit, double target) {
  uint32_t prefix = 0u;
  double above = 0.0;  // weight of candidates above the current digit range
#pragma unroll 1
  for (int level = 0; level < 3; ++level) {
    const int shift = level == 0 ? 21 : (level == 1 ? 10 : 0);
    const uint32_t digit_mask = level == 2 ? 0x3FFu : 0x7FFu;
    const uint32_t range_mask = level == 0 ? 0u : (level == 1 ? 0xFFE00000u : 0xFFFFFC00u);
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      if constexpr (kMass) sh.mass[b] = 0.0;
      sh.count[b] = 0u;
    }
    if (threadIdx.x == 0) {
      sh.selected = -1;
      sh.lowest_occupied = kBins;
    }
    __syncthreads();
    visit([&](uint32_t key, float weight) {
      if ((key & range_mask) != prefix) return;
      const uint32_t digit = (key >> shift) & digit_mask;
      if constexpr (kMass) atomicAdd(&sh.mass[digit], static_cast<double>(weight));
      atomicAdd(&sh.count[digit], 1u);
    });
    __syncthreads();
    const auto weight_of = [&](int digit) {
      if constexpr (kMass) {
        return sh.mass[digit];
      } else {
        return static_cast<double>(sh.count[digit]);
      }
    };
    // Thread t owns the kBinsPerThread digits from `top` down, so a prefix scan in thread order is a suffix
    // scan over digits.
    const int top = kBins - 1 - static_cast<int>(threadIdx.x) * kBinsPerThread;
    double local = 0.0;
#pragma unroll
    for (int b = 0; b < kBinsPerThread; ++b) local += weight_of(top - b);
    double total;
    const double before = above + block_exclusive_scan(local, total, sh);  // weight of digits above `top`
    if (level == 0 && kMass) target *= total;
    int highest_reaching = -1, lowest_occupied = kBins;
    double exclusive = before;
#pragma unroll
    for (int b = 0; b < kBinsPerThread; ++b) {
      exclusive += weight_of(top - b);  // now inclusive of digit top - b
      // An empty digit is never selected: with a target of 0 (a top_p that rounds to 0) every digit reaches it.
      if (highest_reaching < 0 && exclusive >= target && sh.count[top - b] > 0u) highest_reaching = top - b;
      if (sh.count[top - b] > 0u) lowest_occupied = top - b;
    }
    if (highest_reaching >= 0) atomicMax(&sh.selected, highest_reaching);
    if (lowest_occupied < kBins) atomicMin(&sh.lowest_occupied, lowest_occupied);
    __syncthreads();
    const int chosen = sh.selected >= 0 ? sh.selected : min(sh.lowest_occupied, kBins - 1);
    if (chosen <= top && chosen > top - kBinsPerThread) {  // the owner records the weight above `chosen`
      exclusive = before;
      for (int digit = top; digit > chosen; --digit) exclusive += weight_of(digit);
      sh.above = exclusive;
    }
    __syncthreads();
    above = sh.above;
    prefix |= (static_cast<uint32_t>(chosen) & digit_mask) << shift;
    __syncthreads();  // all reads of this level's shared state precede the next level's reset
  }
  return prefix;
}

// ------------------------------------------------------------------------------------------------ kernel

// A row's settings, as the sampling kernel and the merge of a split row both read them.
struct RowSettings {
  float w, t;  // CFG weight (1 unpaired), temperature (1 for greedy rows)
  bool greedy, use_k, use_p;
  int64_t top_k;
  float top_p;
  // Greedy and unfiltered rows need one pass over the logits, so their blocks can split the vocabulary.
  __device__ __forceinline__ bool one_pass() const { return !use_k && !use_p; }
};

template <bool kPaired>
__device__ __forceinline__ RowSettings row_settings(const CfgSampleArgs& args, int64_t row) {
  RowSettings r;
  r.w = kPaired ? args.cfg_weight[row] : 1.f;
  const float temperature = args.temperature[row];
  r.greedy = temperature == 0.f;
  r.t = r.greedy ? 1.f : temperature;
  r.top_k = args.top_k[row];
  r.top_p = args.top_p[row];
  r.use_k = !r.greedy && r.top_k > 0 && r.top_k < args.vocab;
  r.use_p = !r.greedy && r.top_p < 1.f;
  return r;
}

// The row's outputs from its whole-row log-sum-exp states and winning index.
template <typename T, bool kPaired>
__device__ __forceinline__ void write_sample(const CfgSampleArgs& args, int64_t row, const RowSettings& r,
                                             float s_max, float s_sum, float c_max, float c_sum, int best_index) {
  const T* cond = static_cast<const T*>(args.cond) + row * args.cond_row_stride;
  const int64_t token = best_index == INT_MAX ? 0 : best_index;  // only for an all-NaN row
  const float c = to_f32(cond[token]);
  float s_token = __fdiv_rn(c, r.t), cs_token = s_token;
  if constexpr (kPaired) {
    const T* uncond = static_cast<const T*>(args.uncond) + row * args.uncond_row_stride;
    s_token = __fdiv_rn(mix(c, to_f32(uncond[token]), r.w), r.t);
  }
  const float mixed_logprob = (s_token - s_max) - logf(s_sum);
  args.tokens[row] = token;
  args.mixed_logprobs[row] = mixed_logprob;
  args.logprobs[row] = kPaired ? (cs_token - c_max) - logf(c_sum) : mixed_logprob;
}

// Grid (rows, splits). A one-pass row's block `blockIdx.y` covers its share of the vocabulary's groups of 4 and,
// with more than one split, leaves a partial for cfg_sample_merge_kernel; a filtered row is sampled whole by its
// first block (its radix selects need every token), the others exit at once.
template <typename T, bool kPaired>
__global__ void __launch_bounds__(kThreads) cfg_sample_kernel(const CfgSampleArgs args, const bool vec) {
  __shared__ SharedStorage sh;
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t vocab = args.vocab;
  const T* __restrict__ cond = static_cast<const T*>(args.cond) + row * args.cond_row_stride;
  const T* __restrict__ uncond =
      kPaired ? static_cast<const T*>(args.uncond) + row * args.uncond_row_stride : nullptr;
  const RowSettings r = row_settings<kPaired>(args, row);
  const bool sample_in_first_pass = r.one_pass();
  if (!sample_in_first_pass && split > 0) return;
  const bool partial = sample_in_first_pass && splits > 1;
  const uint64_t seed = static_cast<uint64_t>(args.seeds[row]);
  const uint64_t counter = static_cast<uint64_t>(args.counters[row]);
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t ctr_lo = static_cast<uint32_t>(counter), ctr_hi = static_cast<uint32_t>(counter >> 32);
  // This block's groups of 4 tokens, [first, end), in 32 bits (vocab < 2^31): int64 bounds spill at 64 registers.
  const int groups = static_cast<int>((vocab + 3) / 4);
  const int per_split = partial ? static_cast<int>((groups + splits - 1) / splits) : groups;
  const int first = partial ? static_cast<int>(split) * per_split : 0;
  const int end = first + per_split < groups ? first + per_split : groups;

  // f(group, n, s, cs) for this thread's groups of 4 tokens (n valid): s = mixed / T, cs = cond / T.
  auto for_each_group = [&](auto&& f) {
    for (int64_t g = first + static_cast<int>(threadIdx.x); g < end; g += kThreads) {
      float c[4], s[4], cs[4];
      load4(cond, 4 * g, vocab, vec, c);
      if constexpr (kPaired) {
        float u[4];
        load4(uncond, 4 * g, vocab, vec, u);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[j] = __fdiv_rn(mix(c[j], u[j], r.w), r.t);
          cs[j] = __fdiv_rn(c[j], r.t);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[j] = cs[j] = __fdiv_rn(c[j], r.t);
      }
      f(g, static_cast<int>(vocab - 4 * g < 4 ? vocab - 4 * g : 4), s, cs);
    }
  };

  float s_max = -INFINITY, s_sum = 0.f, c_max = -INFINITY, c_sum = 0.f;
  float best = -INFINITY;
  int best_index = INT_MAX;
  for_each_group([&](int64_t g, int n, const float (&s)[4], const float (&cs)[4]) {
    float noise[4] = {0.f, 0.f, 0.f, 0.f};
    if (sample_in_first_pass && !r.greedy) gumbel4(key, g, ctr_lo, ctr_hi, noise);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= n) break;
      merge_lse(s_max, s_sum, s[j], 1.f);
      if constexpr (kPaired) merge_lse(c_max, c_sum, cs[j], 1.f);
      if (sample_in_first_pass) {
        const float k = r.greedy ? s[j] : __fadd_rn(s[j], noise[j]);
        const int i = static_cast<int>(4 * g + j);
        if (better(k, i, best, best_index)) {
          best = k;
          best_index = i;
        }
      }
    }
  });
  block_lse2(s_max, s_sum, c_max, c_sum, sh);

  if (!sample_in_first_pass) {
    uint32_t threshold = 0u;  // keep tokens with order_key(s) >= threshold
    if (r.use_k) {
      threshold = radix_select<false>(sh, [&](auto&& add) {
        for_each_group([&](int64_t, int n, const float (&s)[4], const float (&)[4]) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // not j < n: a loop of unknown count would index s in local memory
            if (j < n) add(order_key(s[j]), 1.f);
          }
        });
      }, static_cast<double>(r.top_k));
    }
    if (r.use_p) {
      const uint32_t survivors = threshold;
      threshold = radix_select<true>(sh, [&](auto&& add) {
        for_each_group([&](int64_t, int n, const float (&s)[4], const float (&)[4]) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t k = order_key(s[j]);
            if (j < n && k >= survivors) add(k, expf(s[j] - s_max));
          }
        });
      }, static_cast<double>(r.top_p));
    }
    for_each_group([&](int64_t g, int n, const float (&s)[4], const float (&)[4]) {
      bool kept[4], any = false;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        kept[j] = j < n && order_key(s[j]) >= threshold;
        any |= kept[j];
      }
      if (!any) return;  // no Philox work for groups the filters removed
      float noise[4];
      gumbel4(key, g, ctr_lo, ctr_hi, noise);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float k = __fadd_rn(s[j], noise[j]);
        const int i = static_cast<int>(4 * g + j);
        if (kept[j] && better(k, i, best, best_index)) {
          best = k;
          best_index = i;
        }
      }
    });
  }
  block_argmax(best, best_index, sh);

  if (threadIdx.x != 0) return;
  if (partial) {
    args.partials[row * splits + split] = CfgSamplePartial{s_max, s_sum, c_max, c_sum, best, best_index};
  } else {
    write_sample<T, kPaired>(args, row, r, s_max, s_sum, c_max, c_sum, best_index);
  }
}

// One thread per row after a split launch: merges a one-pass row's partials in split order (the argmax order
// makes the winner the same as one block's; the sums differ from it only by rounding) and writes its outputs.
template <typename T, bool kPaired>
__global__ void cfg_sample_merge_kernel(const CfgSampleArgs args) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= args.rows) return;
  const RowSettings r = row_settings<kPaired>(args, row);
  if (!r.one_pass()) return;  // sampled whole by its first block
  float s_max = -INFINITY, s_sum = 0.f, c_max = -INFINITY, c_sum = 0.f, best = -INFINITY;
  int best_index = INT_MAX;
  const CfgSamplePartial* part = args.partials + row * args.splits;
  for (int64_t i = 0; i < args.splits; ++i) {
    const CfgSamplePartial p = part[i];
    merge_lse(s_max, s_sum, p.s_max, p.s_sum);
    if constexpr (kPaired) merge_lse(c_max, c_sum, p.c_max, p.c_sum);
    if (better(p.best, p.best_index, best, best_index)) {
      best = p.best;
      best_index = p.best_index;
    }
  }
  write_sample<T, kPaired>(args, row, r, s_max, s_sum, c_max, c_sum, best_index);
}

constexpr int kMergeThreads = 128;

// Host side: blocks per row for `rows` rows of `vocab` logits on `sm_count` SMs (cfg_sample_splits).
inline int64_t splits_for(int64_t rows, int64_t vocab, int64_t sm_count) {
  const int64_t blocks = 2 * sm_count;  // two blocks of 1024 threads fill an SM's 2048
  const int64_t most = (vocab + 3) / 4 / kThreads;  // each thread keeps at least one group of 4 tokens
  const int64_t want = rows > 0 ? (blocks + rows - 1) / rows : 1;
  const int64_t splits = want < most ? want : most;
  return splits > 1 ? splits : 1;
}

// Host side: whether every row of cond/uncond allows the 4-wide vector loads (16 B fp32, 8 B fp16/bf16).
template <typename T>
inline bool vector_loads_ok(const CfgSampleArgs& args) {
  const auto aligned = [](const void* ptr, int64_t row_stride) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(T)) == 0 && row_stride % 4 == 0);
  };
  return aligned(args.cond, args.cond_row_stride) && aligned(args.uncond, args.uncond_row_stride);
}

}  // namespace gotr1::cfg_sample_detail
