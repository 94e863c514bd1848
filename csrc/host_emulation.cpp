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
inline uint3 blockIdx;

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

template <typename T, bool kPaired>
void run_blocks(const gotr1::CfgSampleArgs& args) {
  const bool vec = gotr1::cfg_sample_detail::vector_loads_ok<T>(args);
  using gotr1::cfg_sample_detail::kThreads;
  using gotr1::cfg_sample_detail::kWarps;
  for (int64_t row = 0; row < args.rows; ++row) {
    blockIdx = make_uint3(static_cast<unsigned>(row), 0, 0);
    std::barrier<> block(kThreads);
    std::unique_ptr<emu::Warp[]> warps(new emu::Warp[kWarps]);
    emu::block_barrier = &block;
    emu::warps = warps.get();
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&args, vec, t] {
        threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
        emu::thread_id = t;
        gotr1::cfg_sample_detail::cfg_sample_kernel<T, kPaired>(args, vec);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

template <typename T>
void run_typed(const gotr1::CfgSampleArgs& args) {
  if (args.uncond != nullptr) {
    run_blocks<T, true>(args);
  } else {
    run_blocks<T, false>(args);
  }
}

}  // namespace

extern "C" int gotr1_cfg_sample_emulate(const void* cond, const void* uncond, int64_t cond_row_stride,
                                        int64_t uncond_row_stride, int64_t rows, int64_t vocab, int dtype,
                                        const float* cfg_weight, const float* temperature, const int64_t* top_k,
                                        const float* top_p, const int64_t* seeds, const int64_t* counters,
                                        int64_t* tokens, float* logprobs, float* mixed_logprobs) {
  gotr1::CfgSampleArgs args{cond, uncond, cond_row_stride, uncond_row_stride, rows, vocab,
                            static_cast<gotr1::LogitDtype>(dtype), cfg_weight, temperature, top_k, top_p,
                            seeds, counters, tokens, logprobs, mixed_logprobs};
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
