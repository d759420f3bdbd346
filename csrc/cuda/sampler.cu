// CUDA backend of ipa_fast.sample: one 1024-thread block per row, everything on chip after the reads.
//
// Semantics are ipa_fast/reference.py's (SPEC §2). Per row:
//   1. stats pass     z = (base + alpha*adapter) / T (IEEE division, built with --fmad=false),
//                     per-thread online max / sum-exp merged by a fixed shuffle tree, lowest argmax,
//                     NaN / +inf / finite counts. Invalid and greedy rows are done here.
//   2. no filter      inverse CDF straight over the row (tiles in index order, early exit).
//   3. histogram pass (filters on) counts of floor(z*R) below floor(m*R) in NB bins of 1/R nat;
//                     the kept set {z >= tau} lies in bins 0..J (top-k by counts, top-p by mass
//                     bounds, min-p by ln(min_p)).
//   4. gather         if bins 0..J hold <= kCap tokens they are compacted in index order into shared
//                     memory (tile scan); otherwise the search below re-reads the row (exact, slow).
//   5. search         bisection on the float32 order-preserving integer key (fixed 33 steps): top-k
//                     threshold by counts, then top-p over the top-k mass (float64); min-p per token.
//   6. draw           one Philox uniform per row (csrc/philox.h), the first kept index whose
//                     inclusive kept mass (float64, tiles in index order) exceeds u * total.
// Every loop is bounded by V, kCap or a constant; no allocation, no host sync: graph-capturable.
#ifdef IPA_FAST_CPU_EMULATION
#include "cuda/cpu_emulation.h"  // tests: the same kernel on CPU threads (see that header)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cfloat>
#include <cstdint>

#include "cuda/block_reduce.cuh"
#include "cuda/sampler.h"
#include "philox.h"

namespace ipa_fast {
namespace cuda {
namespace {

#ifdef IPA_FAST_CPU_EMULATION
constexpr int kThreads = 64;   // CPU threads per emulated block: same code paths, less waiting
#else
constexpr int kThreads = 1024;  // one row per block: at B <= #SMs more loads in flight per row
#endif
constexpr int kUnroll = 8;                      // loads in flight per thread in the unordered passes
constexpr int kStride = kThreads * kUnroll;
constexpr int kItems = 4;                       // consecutive elements per thread in a tile
constexpr int kTile = kThreads * kItems;        // index-ordered passes walk the row tile by tile
constexpr int kBins = 64;                       // histogram bins (the last one is the overflow bin)
constexpr float kBinsPerNat = 4.0f;
constexpr int kCap = 4096;                      // shared-memory candidates per row
constexpr float kMaxAbsLogit = 1048576.0f;      // beyond |max z| = 2^20 the bins are not exact
constexpr int kNoIndex = 0x7fffffff;

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// int64 key with the order of float32 z (z is never NaN or -0.0 here).
__device__ __forceinline__ int64_t order_key(float z) {
  const int b = __float_as_int(z);
  return static_cast<int64_t>(b >= 0 ? b : (b ^ 0x7fffffff));
}

template <typename T>
struct Row {
  const T* base;
  const T* adapter;  // nullptr: no adapter
  float alpha, t;
  int64_t vocab;
  __device__ __forceinline__ float z(int64_t i) const {
    float x = load_f(base, i);
    if (adapter != nullptr) {
      const float a = load_f(adapter, i);
      x = x + (alpha == 0.0f ? 0.0f : alpha * a);
    }
    return __fdiv_rn(x, t) + 0.0f;  // + 0.0f turns -0.0 into +0.0 so integer keys order like floats
  }
};

// Where the search and the draw read (z, vocabulary index) from: the raw row or the candidates.
template <typename T>
struct RowSource {
  Row<T> row;
  __device__ __forceinline__ int64_t size() const { return row.vocab; }
  __device__ __forceinline__ float z(int64_t e) const { return row.z(e); }
  __device__ __forceinline__ int64_t index(int64_t e) const { return e; }
};

struct SharedSource {
  const float* cz;
  const int* ci;
  int n;
  __device__ __forceinline__ int64_t size() const { return n; }
  __device__ __forceinline__ float z(int64_t e) const { return cz[e]; }
  __device__ __forceinline__ int64_t index(int64_t e) const { return ci[e]; }
};

struct Scratch {
  float f[kThreads / kWarp];
  double d[kThreads / kWarp];
  int64_t l[kThreads / kWarp];
  int i[kThreads / kWarp];
};

__device__ __forceinline__ int bin_of(float z, float fm) {
  if (!(z > -INFINITY)) return kBins - 1;
  float d = fm - floorf(z * kBinsPerNat);
  d = fminf(fmaxf(d, 0.0f), static_cast<float>(kBins - 1));
  return static_cast<int>(d);
}

// count and float64 mass of the tokens whose key is > key
template <typename Src>
__device__ void count_mass_gt(const Src& src, float m, int64_t key, Scratch& s, int64_t* cnt, double* mass) {
  int64_t c = 0;
  double w = 0.0;
  const int64_t n = src.size();
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const float z = src.z(e);
    if (order_key(z) > key) {
      ++c;
      w += static_cast<double>(expf(z - m));
    }
  }
  *cnt = block_reduce<kThreads>(c, Sum<int64_t>(), s.l);
  *mass = block_reduce<kThreads>(w, Sum<double>(), s.d);
}

// Smallest key in (lo, hi] where pred(count_gt, mass_gt) holds; it holds at hi and is monotone.
template <typename Src, typename Pred>
__device__ int64_t search_key(const Src& src, float m, int64_t lo, int64_t hi, Pred pred, Scratch& s) {
  for (int step = 0; step < 34 && hi - lo > 1; ++step) {  // keys span < 2^33: 33 halvings suffice
    const int64_t mid = lo + (hi - lo) / 2;
    int64_t cnt;
    double mass;
    count_mass_gt(src, m, mid, s, &cnt, &mass);
    if (pred(cnt, mass)) hi = mid;
    else lo = mid;
  }
  return hi;
}

struct Drawn {
  int64_t token;
  float z;
};

// First element (in source order = vocabulary order) whose inclusive kept mass exceeds target;
// kept = key >= key_t and exp(z - m) >= min_p and weight > 0. Falls back to the last kept token.
template <typename Src>
__device__ Drawn draw(const Src& src, float m, int64_t key_t, float min_p, double target, Scratch& s) {
  const int64_t n = src.size();
  double before_tile = 0.0;
  int64_t last = -1;
  for (int64_t start = 0; start < n; start += kTile) {
    double w[kItems];
    double mine = 0.0;
    int64_t my_last = -1;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t e = start + static_cast<int64_t>(threadIdx.x) * kItems + j;
      w[j] = 0.0;
      if (e < n) {
        const float z = src.z(e);
        const float p = expf(z - m);
        if (order_key(z) >= key_t && p >= min_p && p > 0.0f) {
          w[j] = static_cast<double>(p);
          my_last = e;
        }
      }
      mine += w[j];
    }
    double tile_total;
    const double exc = block_exclusive_sum<kThreads>(mine, s.d, &tile_total);
    const int64_t tile_last = block_reduce<kThreads>(my_last, Max<int64_t>(), s.l);
    if (tile_last >= 0) last = tile_last;
    if (before_tile + tile_total > target) {
      int64_t hit = INT64_MAX;
      double c = before_tile + exc;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        c += w[j];
        if (w[j] > 0.0 && c > target && hit == INT64_MAX) hit = start + static_cast<int64_t>(threadIdx.x) * kItems + j;
      }
      hit = block_reduce<kThreads>(hit, Min<int64_t>(), s.l);
      if (hit != INT64_MAX) return Drawn{src.index(hit), src.z(hit)};
    }
    before_tile += tile_total;
  }
  if (last < 0) return Drawn{-1, -INFINITY};
  return Drawn{src.index(last), src.z(last)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a) {
  __shared__ float cand_z[kCap];
  __shared__ int cand_i[kCap];
  __shared__ int hist[kBins];
  __shared__ Scratch s;
  __shared__ int shared_j, shared_n;

  const int64_t r = blockIdx.x;
  const int64_t V = a.vocab;
  const float temperature = reinterpret_cast<const float*>(a.temperature)[r];
  const int64_t k = reinterpret_cast<const int64_t*>(a.top_k)[r];
  const float p = reinterpret_cast<const float*>(a.top_p)[r];
  const float min_p = reinterpret_cast<const float*>(a.min_p)[r];
  Row<T> row{reinterpret_cast<const T*>(a.base) + r * V,
             a.adapter ? reinterpret_cast<const T*>(a.adapter) + r * V : nullptr,
             reinterpret_cast<const float*>(a.alpha)[r], temperature > 0.0f ? temperature : 1.0f, V};
  int64_t* tokens = reinterpret_cast<int64_t*>(a.tokens);
  float* logprobs = reinterpret_cast<float*>(a.logprobs);
  float* filtered = reinterpret_cast<float*>(a.filtered_logprobs);
  bool* valid_out = reinterpret_cast<bool*>(a.valid);

  // 1. stats
  float tm = -INFINITY, ts = 0.0f;
  int targ = kNoIndex, tbad = 0, tfin = 0;
  for (int64_t start = 0; start < V; start += kStride) {
    float zs[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {  // all loads first: kUnroll x 2 requests in flight per thread
      const int64_t i = start + j * kThreads + threadIdx.x;
      zs[j] = i < V ? row.z(i) : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {  // in index order per thread: the first maximum is kept
      const float z = zs[j];
      if (z != z || z == INFINITY) {
        ++tbad;
        continue;
      }
      if (z == -INFINITY) continue;
      ++tfin;
      if (z > tm) {
        ts = ts * expf(tm - z) + 1.0f;
        tm = z;
        targ = static_cast<int>(start + j * kThreads + threadIdx.x);
      } else {
        ts += expf(z - tm);
      }
    }
  }
  const float m = block_reduce<kThreads>(tm, Max<float>(), s.f);
  const float mine = tm > -INFINITY ? ts * expf(tm - m) : 0.0f;
  const float se = block_reduce<kThreads>(mine, Sum<float>(), s.f);
  const int argmax = block_reduce<kThreads>(tm == m ? targ : kNoIndex, Min<int>(), s.i);
  const int nbad = block_reduce<kThreads>(tbad, Sum<int>(), s.i);
  const int nfin = block_reduce<kThreads>(tfin, Sum<int>(), s.i);
  const bool valid = nbad == 0 && nfin > 0 && temperature >= 0.0f && k >= 0 && p > 0.0f && p <= 1.0f &&
                     min_p >= 0.0f && min_p <= 1.0f;
  const float lse = logf(se);  // relative to m: z - m is exact near the max
  if (!valid || temperature == 0.0f) {
    if (threadIdx.x == 0) {
      tokens[r] = valid ? argmax : 0;
      logprobs[r] = valid ? -lse : NAN;
      filtered[r] = valid ? 0.0f : NAN;
      valid_out[r] = valid;
    }
    return;
  }

  const double u = philox_uniform(static_cast<uint64_t>(reinterpret_cast<const int64_t*>(a.seed)[r]),
                                  static_cast<uint64_t>(reinterpret_cast<const int64_t*>(a.offset)[r]));
  const bool k_on = k > 0 && k < V, p_on = p < 1.0f, mp_on = min_p > 0.0f;
  const RowSource<T> row_src{row};
  Drawn d;
  double total;
  if (!(k_on || p_on || mp_on)) {
    // 2. no filter: every token is kept
    total = static_cast<double>(se);
    d = draw(row_src, m, INT64_MIN, 0.0f, u * total, s);
  } else {
    // 3. histogram below the max
    const float fm = floorf(m * kBinsPerNat);
    for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t start = 0; start < V; start += kStride) {
      float zs[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t i = start + j * kThreads + threadIdx.x;
        zs[j] = i < V ? row.z(i) : -INFINITY;
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j)
        if (start + j * kThreads + threadIdx.x < V) atomicAdd(&hist[bin_of(zs[j], fm)], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t cum = 0;
      int j_k = kBins - 1, j_p = kBins - 1;
      float above = 0.0f;
      for (int b = 0; b < kBins; ++b) {
        cum += hist[b];
        if (k_on && cum >= k && j_k == kBins - 1) j_k = b;
        // mass strictly above bin b is at least `above` (each token there weighs > e^{-(bin+1)/R})
        if (p_on && j_p == kBins - 1 && above * 0.99999f >= p * se * 1.00001f) j_p = b - 1;
        if (b < kBins - 1) above += static_cast<float>(hist[b]) * expf(-(b + 1.0f) / kBinsPerNat);
      }
      const int j_mp = mp_on ? static_cast<int>(fminf(floorf(1.0f - kBinsPerNat * logf(min_p)) + 1.0f, kBins - 1.0f))
                             : kBins - 1;
      int J;
      if (k_on && p_on) J = j_k;  // top-p renormalises over all of top-k: keep them all in view
      else if (k_on) J = min(j_k, j_mp);
      else J = min(j_p, j_mp);
      int n = 0;
      for (int b = 0; b <= J; ++b) n += hist[b];
      shared_j = J;
      shared_n = (J < kBins - 1 && n <= kCap && fabsf(m) < kMaxAbsLogit) ? n : -1;
    }
    __syncthreads();
    const int J = shared_j, n = shared_n;
    // 4. gather the candidates in index order, or search the raw row
    if (n >= 0) {
      int base_pos = 0;
      for (int64_t start = 0; start < V; start += kTile) {
        float zs[kItems];
        int mine_n = 0;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int64_t i = start + static_cast<int64_t>(threadIdx.x) * kItems + j;
          zs[j] = i < V ? row.z(i) : -INFINITY;
          if (i < V && bin_of(zs[j], fm) <= J) ++mine_n;
        }
        int tile_n;
        int pos = base_pos + block_exclusive_sum<kThreads>(mine_n, s.i, &tile_n);
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int64_t i = start + static_cast<int64_t>(threadIdx.x) * kItems + j;
          if (i < V && bin_of(zs[j], fm) <= J) {
            if (pos < kCap) {
              cand_z[pos] = zs[j];
              cand_i[pos] = static_cast<int>(i);
            }
            ++pos;
          }
        }
        base_pos += tile_n;
      }
      __syncthreads();
    }
    const SharedSource cand_src{cand_z, cand_i, n};
    // 5. thresholds, then 6. the draw
    auto finish = [&](const auto& src) {
      int64_t kmin = INT64_MAX;
      for (int64_t e = threadIdx.x; e < src.size(); e += kThreads) kmin = min(kmin, order_key(src.z(e)));
      kmin = block_reduce<kThreads>(kmin, Min<int64_t>(), s.l);
      const int64_t key_max = order_key(m);
      int64_t key_k = kmin;
      if (k_on) key_k = search_key(src, m, kmin - 1, key_max, [&](int64_t c, double) { return c < k; }, s);
      int64_t key_t = key_k;
      if (p_on) {
        double total_k;
        if (k_on) {
          int64_t c;
          count_mass_gt(src, m, key_k - 1, s, &c, &total_k);
        } else {
          total_k = static_cast<double>(se);  // every token survives top-k; candidates may not cover them
        }
        const double bound = static_cast<double>(p) * total_k;
        key_t = search_key(src, m, key_k - 1, key_max, [&](int64_t, double w) { return w < bound; }, s);
      }
      double kept = 0.0;
      for (int64_t e = threadIdx.x; e < src.size(); e += kThreads) {
        const float z = src.z(e);
        const float w = expf(z - m);
        if (order_key(z) >= key_t && w >= min_p) kept += static_cast<double>(w);
      }
      total = block_reduce<kThreads>(kept, Sum<double>(), s.d);
      d = draw(src, m, key_t, min_p, u * total, s);
    };
    if (n >= 0) finish(cand_src);
    else finish(row_src);
  }
  if (threadIdx.x == 0) {
    const bool ok = d.token >= 0;
    tokens[r] = ok ? d.token : 0;
    logprobs[r] = ok ? (d.z - m) - lse : NAN;
    filtered[r] = ok ? static_cast<float>(static_cast<double>(d.z) - static_cast<double>(m) - log(total)) : NAN;
    valid_out[r] = ok;
  }
}

}  // namespace

#ifdef IPA_FAST_CPU_EMULATION
const char* launch_sample(const SampleArgs& args) {
  if (args.dtype != kFloat32) return "emulated launch_sample: float32 only";
  emu::launch(sample_kernel<float>, static_cast<unsigned>(args.batch), kThreads, args);
  return nullptr;
}
#else
const char* launch_sample(const SampleArgs& args) {
  if (args.batch <= 0 || args.vocab <= 0) return "launch_sample: empty batch or vocabulary";
  if (args.vocab > INT32_MAX) return "launch_sample: vocabulary larger than 2^31 - 1";
  if (args.batch > INT32_MAX) return "launch_sample: batch larger than 2^31 - 1";
  const dim3 grid(static_cast<unsigned>(args.batch));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(args.stream);
  switch (args.dtype) {
    case kFloat32: sample_kernel<float><<<grid, kThreads, 0, stream>>>(args); break;
    case kFloat16: sample_kernel<__half><<<grid, kThreads, 0, stream>>>(args); break;
    case kBFloat16: sample_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(args); break;
    default: return "launch_sample: dtype must be float32, float16 or bfloat16";
  }
  const cudaError_t err = cudaGetLastError();  // launch errors only: no synchronisation
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

}  // namespace cuda
}  // namespace ipa_fast
