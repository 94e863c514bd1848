// Runs the CUDA kernel's device code (cfg_sample_kernel.cuh) on the CPU: one std::thread per CUDA thread,
// __syncthreads as a block barrier, warp shuffles through a per-warp exchange with a warp barrier, shared
// memory as function statics, atomics as std::atomic_ref.  Test-only (tests/test_cfg_sampling.py builds it with
// g++ and calls it through ctypes), so the kernel's indexing, radix select, scans and Philox are checked on
// machines without a GPU.  Build: g++ -std=c++20 -O1 -ffp-contract=off -shared -fPIC -pthread
//   -I<cuda>/include [-DGOTR1_CFG_SAMPLE_THREADS=64] host_emulation.cpp -o libcfg_sample_emulation.so
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// CUDA keywords as host C++: shared memory is one static per kernel instantiation, visible to all threads.
#undef __device__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
struct Warp {
  std::barrier<> barrier{32};
  uint64_t slots[32];
};
inline std::barrier<>* block_barrier = nullptr;
inline Warp* warps = nullptr;
inline thread_local int thread_id = 0;

template <class T>
T exchange(T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Warp& warp = warps[thread_id / 32];
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  warp.slots[thread_id % 32] = slot;
  warp.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &warp.slots[src_lane], sizeof(T));
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}
}  // namespace emu

inline thread_local uint3 threadIdx;
inline uint3 blockIdx, blockDim, gridDim;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_down_sync(unsigned, T value, unsigned offset) {
  const int lane = threadIdx.x % 32;
  return emu::exchange(value, lane + static_cast<int>(offset) < 32 ? lane + static_cast<int>(offset) : lane);
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned offset) {
  const int lane = threadIdx.x % 32;
  return emu::exchange(value, lane >= static_cast<int>(offset) ? lane - static_cast<int>(offset) : lane);
}
template <class T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return emu::exchange(value, (static_cast<int>(threadIdx.x) % 32) ^ mask);
}

template <class T>
T __ldg(const T* ptr) { return *ptr; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float __uint2float_rn(unsigned u) { return static_cast<float>(u); }
inline int min(int a, int b) { return a < b ? a : b; }

inline double atomicAdd(double* ptr, double value) { return std::atomic_ref<double>(*ptr).fetch_add(value); }
inline unsigned atomicAdd(unsigned* ptr, unsigned value) {
  return std::atomic_ref<unsigned>(*ptr).fetch_add(value);
}
inline int atomicMax(int* ptr, int value) {
  std::atomic_ref<int> ref(*ptr);
  int old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline int atomicMin(int* ptr, int value) {
  std::atomic_ref<int> ref(*ptr);
  int old = ref.load();
  while (old > value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

#include "cfg_sample_kernel.cuh"

namespace {

// Runs `kernel()` as a grid of `grid` blocks of `threads` threads, one block after another.
template <class Kernel>
void launch(dim3 grid, unsigned threads, Kernel kernel) {
  gridDim = make_uint3(grid.x, grid.y, 1);
  blockDim = make_uint3(threads, 1, 1);
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = make_uint3(x, y, 0);
      std::barrier<> block(threads);
      std::unique_ptr<emu::Warp[]> warps(new emu::Warp[(threads + 31) / 32]);
      emu::block_barrier = &block;
      emu::warps = warps.get();
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&kernel, t] {
          threadIdx = make_uint3(t, 0, 0);
          emu::thread_id = static_cast<int>(t);
          kernel();
        });
      }
      for (auto& thread : pool) thread.join();
    }
  }
}

// The same two launches as cfg_sample.cu's launch_kernels.
template <typename T, bool kPaired>
void run_kernels(const gotr1::CfgSampleArgs& args) {
  namespace detail = gotr1::cfg_sample_detail;
  const bool vec = detail::vector_loads_ok<T>(args);
  launch(dim3(static_cast<unsigned>(args.rows), static_cast<unsigned>(args.splits)), detail::kThreads,
         [&args, vec] { detail::cfg_sample_kernel<T, kPaired>(args, vec); });
  if (args.splits > 1) {
    launch(dim3(static_cast<unsigned>((args.rows + detail::kMergeThreads - 1) / detail::kMergeThreads)),
           detail::kMergeThreads, [&args] { detail::cfg_sample_merge_kernel<T, kPaired>(args); });
  }
}

template <typename T>
void run_typed(const gotr1::CfgSampleArgs& args) {
  if (args.uncond != nullptr) {
    run_kernels<T, true>(args);
  } else {
    run_kernels<T, false>(args);
  }
}

}  // namespace

// `splits` blocks per row (cfg_sample_splits picks it on a GPU; tests pass their own).
extern "C" int gotr1_cfg_sample_emulate(const void* cond, const void* uncond, int64_t cond_row_stride,
                                        int64_t uncond_row_stride, int64_t rows, int64_t vocab, int dtype,
                                        const float* cfg_weight, const float* temperature, const int64_t* top_k,
                                        const float* top_p, const int64_t* seeds, const int64_t* counters,
                                        int64_t* tokens, float* logprobs, float* mixed_logprobs, int64_t splits) {
  if (splits < 1) return 1;
  std::vector<gotr1::CfgSamplePartial> partials(static_cast<size_t>(rows * splits));
  gotr1::CfgSampleArgs args{cond, uncond, cond_row_stride, uncond_row_stride, rows, vocab,
                            static_cast<gotr1::LogitDtype>(dtype), cfg_weight, temperature, top_k, top_p,
                            seeds, counters, tokens, logprobs, mixed_logprobs, splits, partials.data()};
  switch (args.dtype) {
    case gotr1::LogitDtype::kFloat32:
      run_typed<float>(args);
      return 0;
    case gotr1::LogitDtype::kFloat16:
      run_typed<__half>(args);
      return 0;
    case gotr1::LogitDtype::kBFloat16:
      run_typed<__nv_bfloat16>(args);
      return 0;
  }
  return 1;
}

extern "C" int gotr1_cfg_sample_emulate_threads() { return gotr1::cfg_sample_detail::kThreads; }

extern "C" int64_t gotr1_cfg_sample_splits_for(int64_t rows, int64_t vocab, int64_t sm_count) {
  return gotr1::cfg_sample_detail::splits_for(rows, vocab, sm_count);
}
