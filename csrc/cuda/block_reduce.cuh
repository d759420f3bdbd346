// Deterministic block-wide reductions and scans: fixed shuffle trees, so a result depends only on
// the values and the block size (never on timing), which keeps the sampler batch-invariant.
#pragma once
#include <cstdint>

namespace ipa_fast {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
struct Sum {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
template <typename T>
struct Max {
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
template <typename T>
struct Min {
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Every thread gets the block's reduction. `scratch` holds >= THREADS / 32 elements of T.
template <int THREADS, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  constexpr int kWarps = THREADS / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}

// Exclusive prefix sum over threads in thread order; *total receives the block sum.
template <int THREADS, typename T>
__device__ __forceinline__ T block_exclusive_sum(T v, T* scratch, T* total) {
  constexpr int kWarps = THREADS / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  T inc = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inc;
  __syncthreads();
  T before = T(0), all = T(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    all += scratch[w];
  }
  *total = all;
  T exc = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) exc = T(0);
  return before + exc;
}

}  // namespace cuda
}  // namespace ipa_fast
