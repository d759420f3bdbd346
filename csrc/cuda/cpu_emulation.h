// Runs the CUDA sampler kernel on the CPU for tests, with no CUDA toolkit: the kernel source is
// compiled as C++ (-DIPA_FAST_CPU_EMULATION) and each block runs as kThreads std::threads with
// real barriers for __syncthreads and per-warp exchanges for the shuffles. Slow (a thread per
// CUDA thread) but it executes the same block-level code paths as the GPU: reductions, scans,
// the uniform early exits, shared-memory compaction. Only what sampler.cu uses is provided.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static  // one block at a time: statics are the block's shared memory

namespace ipa_fast {
namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned char> exchange;  // [warp][lane][8 bytes]
};

inline Block& block() {
  static Block b;
  return b;
}

inline thread_local Dim3 thread_idx;
inline Dim3 block_idx;

}  // namespace emu
}  // namespace ipa_fast

#define threadIdx (::ipa_fast::emu::thread_idx)
#define blockIdx (::ipa_fast::emu::block_idx)

inline void __syncthreads() { ipa_fast::emu::block().all->arrive_and_wait(); }

template <typename T>
inline T emu_shuffle(T v, int src_lane) {
  auto& b = ipa_fast::emu::block();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  std::memcpy(&b.exchange[(warp * 32 + lane) * 8], &v, sizeof(T));
  b.warps[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &b.exchange[(warp * 32 + src_lane) * 8], sizeof(T));
  b.warps[warp]->arrive_and_wait();
  return r;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
  return emu_shuffle(v, (threadIdx.x % 32) ^ offset);
}

template <typename T>
inline T __shfl_up_sync(unsigned, T v, int offset) {
  const int lane = threadIdx.x % 32;
  return emu_shuffle(v, lane >= offset ? lane - offset : lane);  // CUDA: lanes below offset keep v
}

inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int atomicAdd(int* address, int val) {
  return reinterpret_cast<std::atomic<int>*>(address)->fetch_add(val);
}

using std::max;
using std::min;

// Half types are not emulated: the emulated launcher runs float32 rows only.
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __half2float(__half) { return NAN; }
inline float __bfloat162float(__nv_bfloat16 h) {
  const unsigned u = static_cast<unsigned>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

namespace ipa_fast {
namespace emu {

// Runs kernel(args...) for every block of a grid_x x grid_y grid, each with `threads` CPU threads.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid_x, unsigned grid_y, int threads, const Args&... args) {
  auto& b = block();
  for (unsigned gy = 0; gy < grid_y; ++gy)
    for (unsigned gx = 0; gx < grid_x; ++gx) {
      block_idx.x = gx;
      block_idx.y = gy;
      b.all = std::make_unique<std::barrier<>>(threads);
      b.warps.clear();
      for (int w = 0; w < threads / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(32));
      b.exchange.assign(static_cast<size_t>(threads) * 8, 0);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          thread_idx.x = static_cast<unsigned>(t);
          kernel(args...);
        });
      for (auto& th : pool) th.join();
    }
}

}  // namespace emu
}  // namespace ipa_fast
