// CUDA backend of ipa_fast.sample: five small kernels, split over vocabulary chunks so that even
// B = 1 spreads over many SMs; every merge runs in a fixed order that depends on V only, so a
// row's result never depends on B (batch invariance).
//
// Semantics are ipa_fast/reference.py's (docs/DESIGN.md §2); z = (sum_k w_k * l_k) / T over K <= kMaxExperts
// experts (read in place: a pointer and a row stride each, in the by-value kernel arguments) in float32 with
// IEEE division, built with --fmad=false. Grid (B, S) for the chunk kernels, S = ceil(V / kChunk):
//   1. chunk_stats  per chunk: max, sum exp(z - max), lowest argmax, NaN/+inf and finite counts.
//   2. chunk_hist   filtered rows: counts of floor(z*R) below floor(m*R) (m = the row max) in NB
//                   bins of 1/R nat, per chunk.
//   3. plan         per row: merges the chunks in chunk order (online softmax), writes greedy and
//                   invalid rows, and bounds the kept set {z >= tau} to bins 0..J (top-k by counts,
//                   top-p by mass bounds, min-p by ln(min_p)); <= kCap tokens there: candidate
//                   path with per-chunk offsets; no filter: ALL; otherwise the raw-row search.
//   4. gather       candidate rows: z and index of the tokens in bins <= J, in index order.
//   5. finish       per row (1024 threads): bisection on the float32 order-preserving integer key
//                   (at most 34 fixed steps) for top-k, then top-p over the top-k mass (float64);
//                   min-p per token; then one Philox uniform (csrc/philox.h) and the first kept
//                   index whose inclusive kept mass (float64, tiles in index order) exceeds
//                   u * total. ALL rows pick their chunk from the chunk masses and scan that chunk.
// Every loop is bounded by V, kCap, S or a constant; the workspace comes from the caller (torch),
// nothing is allocated or synchronised here: graph-capturable.
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
#ifdef IPA_FAST_CPU_EMULATION
constexpr int kChunkThreads = 64;
#else
constexpr int kChunkThreads = 256;              // threads of the per-chunk kernels
#endif
constexpr int kChunkItems = 8;                  // elements per thread of a chunk (8 loads in flight)
constexpr int kChunk = kChunkThreads * kChunkItems;  // vocabulary chunk per block: depends on nothing
constexpr int kMaxChunks = 1024;                // V <= kMaxChunks * kChunk
constexpr int kItems = 4;                       // consecutive elements per thread in a tile
constexpr int kTile = kThreads * kItems;        // index-ordered passes walk the row tile by tile
constexpr int kBins = 64;                       // histogram bins (the last one is the overflow bin)
constexpr float kBinsPerNat = 4.0f;
constexpr int kCap = 16384;                     // candidates per row (global workspace)
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
  const T* e[kMaxExperts];  // the row of each expert with a non-zero weight, in order
  float w[kMaxExperts];
  int n;                    // how many (0: every weight is 0, z = 0)
  float t;
  int64_t vocab;
  __device__ __forceinline__ float z(int64_t i) const {
    float x = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxExperts; ++k) {  // static indices keep e / w in registers
      if (k < n) {
        const float term = w[k] * load_f(e[k], i);  // 1 * l == l: the base of sample() stays exact
        x = k == 0 ? term : x + term;
      }
    }
    return __fdiv_rn(x, t) + 0.0f;  // + 0.0f turns -0.0 into +0.0 so integer keys order like floats
  }
};

// Where the search and the draw read (z, vocabulary index) from: the raw row, one chunk, or the
// candidate buffer.
template <typename T>
struct RowSource {
  Row<T> row;
  __device__ __forceinline__ int64_t size() const { return row.vocab; }
  __device__ __forceinline__ float z(int64_t e) const { return row.z(e); }
  __device__ __forceinline__ int64_t index(int64_t e) const { return e; }
};

template <typename T>
struct ChunkSource {  // one vocabulary chunk of the row
  Row<T> row;
  int64_t start, n;
  __device__ __forceinline__ int64_t size() const { return n; }
  __device__ __forceinline__ float z(int64_t e) const { return row.z(start + e); }
  __device__ __forceinline__ int64_t index(int64_t e) const { return start + e; }
};

struct BufferSource {  // the row's candidates, in vocabulary order
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

// Per-call scratch in device memory, carved by the host from two buffers (see workspace_size).
struct Workspace {
  float *ch_m, *ch_se, *row_m, *row_se, *cand_z;
  int *ch_idx, *ch_bad, *ch_fin, *ch_off, *ch_hist, *row_mode, *row_j, *row_n, *cand_i;
};

enum Mode : int { kDone = 0, kAll = 1, kCand = 2, kRowSearch = 3 };

struct RowParams {
  float temperature, p, min_p;
  int64_t k;
  __device__ __forceinline__ bool valid_params() const { return params_ok(temperature, k, p, min_p); }
};

__device__ __forceinline__ RowParams row_params(const SampleArgs& a, int64_t r) {
  return RowParams{reinterpret_cast<const float*>(a.temperature)[r], reinterpret_cast<const float*>(a.top_p)[r],
                   reinterpret_cast<const float*>(a.min_p)[r], reinterpret_cast<const int64_t*>(a.top_k)[r]};
}

template <typename T>
__device__ __forceinline__ Row<T> make_row(const SampleArgs& a, int64_t r, float temperature) {
  Row<T> row{};
  row.n = 0;
  row.t = temperature > kTemperatureMin ? temperature : kGreedyLogprobTemperature;
  row.vocab = a.vocab;
  const float* weights = reinterpret_cast<const float*>(a.weights);
#pragma unroll
  for (int k = 0; k < kMaxExperts; ++k) {
    if (k < a.num_experts) {
      // a weight of 0 ignores its expert (no 0 * -inf NaN); skipping its +0 term changes at most
      // the sign of a zero z, which the + 0.0f in z() removes
      const float wk = (a.unit_first && k == 0) ? 1.0f : weights[r * a.weight_stride + k - a.unit_first];
      if (wk != 0.0f) {
        row.e[row.n] = reinterpret_cast<const T*>(a.experts[k]) + r * a.expert_strides[k];
        row.w[row.n] = wk;
        ++row.n;
      }
    }
  }
  return row;
}

// 1. per chunk: max, sum exp(z - max), lowest argmax, NaN/+inf and finite counts
template <typename T>
__global__ void __launch_bounds__(kChunkThreads) chunk_stats_kernel(SampleArgs a, Workspace w, int S) {
  __shared__ Scratch s;
  const int64_t r = blockIdx.x, c = blockIdx.y, V = a.vocab;
  const Row<T> row = make_row<T>(a, r, reinterpret_cast<const float*>(a.temperature)[r]);
  float zs[kChunkItems];
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {  // all loads first: 8 x 2 requests in flight per thread
    const int64_t i = c * kChunk + j * kChunkThreads + threadIdx.x;
    zs[j] = i < V ? row.z(i) : -INFINITY;
  }
  float tm = -INFINITY, ts = 0.0f;
  int targ = kNoIndex, tbad = 0, tfin = 0;
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {  // ascending index per thread: the first maximum is kept
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
      targ = static_cast<int>(c * kChunk + j * kChunkThreads + threadIdx.x);
    } else {
      ts += expf(z - tm);
    }
  }
  const float m = block_reduce<kChunkThreads>(tm, Max<float>(), s.f);
  const float se = block_reduce<kChunkThreads>(tm > -INFINITY ? ts * expf(tm - m) : 0.0f, Sum<float>(), s.f);
  const int arg = block_reduce<kChunkThreads>(tm == m ? targ : kNoIndex, Min<int>(), s.i);
  const int bad = block_reduce<kChunkThreads>(tbad, Sum<int>(), s.i);
  const int fin = block_reduce<kChunkThreads>(tfin, Sum<int>(), s.i);
  if (threadIdx.x == 0) {
    const int64_t slot = r * S + c;
    w.ch_m[slot] = m;
    w.ch_se[slot] = se;
    w.ch_idx[slot] = arg;
    w.ch_bad[slot] = bad;
    w.ch_fin[slot] = fin;
  }
}

// 2. per chunk of a filtered row: histogram of floor(z*R) below floor(m*R) (m = the row max)
template <typename T>
__global__ void __launch_bounds__(kChunkThreads) chunk_hist_kernel(SampleArgs a, Workspace w, int S) {
  __shared__ Scratch s;
  __shared__ int hist[kBins];
  const int64_t r = blockIdx.x, c = blockIdx.y, V = a.vocab;
  const RowParams q = row_params(a, r);
  float tm = -INFINITY;
  int tbad = 0, tfin = 0;
  for (int i = threadIdx.x; i < S; i += kChunkThreads) {
    tm = fmaxf(tm, w.ch_m[r * S + i]);
    tbad += w.ch_bad[r * S + i];
    tfin += w.ch_fin[r * S + i];
  }
  const float m = block_reduce<kChunkThreads>(tm, Max<float>(), s.f);
  const bool valid = block_reduce<kChunkThreads>(tbad, Sum<int>(), s.i) == 0 &&
                     block_reduce<kChunkThreads>(tfin, Sum<int>(), s.i) > 0 && q.valid_params();
  const bool filtered = top_k_on(q.k, V) || top_p_on(q.p) || min_p_on(q.min_p);
  if (!valid || is_greedy(q.temperature) || !filtered) return;  // uniform over the block
  for (int b = threadIdx.x; b < kBins; b += kChunkThreads) hist[b] = 0;
  __syncthreads();
  const Row<T> row = make_row<T>(a, r, q.temperature);
  const float fm = floorf(m * kBinsPerNat);
  float zs[kChunkItems];
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {
    const int64_t i = c * kChunk + j * kChunkThreads + threadIdx.x;
    zs[j] = i < V ? row.z(i) : -INFINITY;
  }
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j)
    if (c * kChunk + j * kChunkThreads + threadIdx.x < V) atomicAdd(&hist[bin_of(zs[j], fm)], 1);
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += kChunkThreads) w.ch_hist[(r * S + c) * kBins + b] = hist[b];
}

// 3. per row: merge the chunks in a fixed order, finish greedy and invalid rows, choose the path
// (no filter / candidates / raw-row search) and the candidates' per-chunk offsets.
__global__ void __launch_bounds__(kBins) plan_kernel(SampleArgs a, Workspace w, int S) {
  __shared__ Scratch s;
  __shared__ int hist[kBins];
  __shared__ int chunk_n[kMaxChunks];
  __shared__ int shared_j, shared_n;
  const int64_t r = blockIdx.x, V = a.vocab;
  const RowParams q = row_params(a, r);
  float tm = -INFINITY, ts = 0.0f;
  int tbad = 0, tfin = 0;
  for (int i = threadIdx.x; i < S; i += kBins) {  // online merge, chunk order within a thread
    const float mc = w.ch_m[r * S + i];
    if (mc > tm) {
      ts = ts * expf(tm - mc) + w.ch_se[r * S + i];
      tm = mc;
    } else if (mc > -INFINITY) {
      ts += w.ch_se[r * S + i] * expf(mc - tm);
    }
    tbad += w.ch_bad[r * S + i];
    tfin += w.ch_fin[r * S + i];
  }
  const float m = block_reduce<kBins>(tm, Max<float>(), s.f);
  const float se = block_reduce<kBins>(tm > -INFINITY ? ts * expf(tm - m) : 0.0f, Sum<float>(), s.f);
  int targ = kNoIndex;
  for (int i = threadIdx.x; i < S; i += kBins)
    if (w.ch_m[r * S + i] == m) targ = min(targ, w.ch_idx[r * S + i]);
  const int argmax = block_reduce<kBins>(targ, Min<int>(), s.i);
  const bool valid = block_reduce<kBins>(tbad, Sum<int>(), s.i) == 0 &&
                     block_reduce<kBins>(tfin, Sum<int>(), s.i) > 0 && q.valid_params();
  const float lse = logf(se);  // relative to m: z - m is exact near the max
  const bool k_on = top_k_on(q.k, V), p_on = top_p_on(q.p), mp_on = min_p_on(q.min_p);
  if (!valid || is_greedy(q.temperature)) {
    if (threadIdx.x == 0) {
      reinterpret_cast<int64_t*>(a.tokens)[r] = valid ? argmax : kInvalidToken;
      reinterpret_cast<float*>(a.logprobs)[r] = valid ? -lse : NAN;
      reinterpret_cast<float*>(a.filtered_logprobs)[r] = valid ? 0.0f : NAN;
      reinterpret_cast<bool*>(a.valid)[r] = valid;
      w.row_mode[r] = kDone;
    }
    return;
  }
  if (threadIdx.x == 0) {
    w.row_m[r] = m;
    w.row_se[r] = se;
  }
  if (!(k_on || p_on || mp_on)) {
    if (threadIdx.x == 0) w.row_mode[r] = kAll;
    return;
  }
  {  // the row histogram: bin b summed over chunks in chunk order (integers: exact)
    int h = 0;
    for (int i = 0; i < S; ++i) h += w.ch_hist[(r * S + i) * kBins + threadIdx.x];
    hist[threadIdx.x] = h;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t cum = 0;
    int j_k = kBins - 1, j_p = kBins - 1;
    float above = 0.0f;
    for (int b = 0; b < kBins; ++b) {
      cum += hist[b];
      if (k_on && cum >= q.k && j_k == kBins - 1) j_k = b;
      // mass strictly above bin b is at least `above` (each token there weighs > e^{-(bin+1)/R})
      if (p_on && j_p == kBins - 1 && above * 0.99999f >= q.p * se * 1.00001f) j_p = b - 1;
      if (b < kBins - 1) above += static_cast<float>(hist[b]) * expf(-(b + 1.0f) / kBinsPerNat);
    }
    const int j_mp =
        mp_on ? static_cast<int>(fminf(floorf(1.0f - kBinsPerNat * logf(q.min_p)) + 1.0f, kBins - 1.0f)) : kBins - 1;
    int J;
    if (k_on && p_on) J = j_k;  // top-p renormalises over all of top-k: keep them all in view
    else if (k_on) J = min(j_k, j_mp);
    else J = min(j_p, j_mp);
    int n = 0;
    for (int b = 0; b <= J; ++b) n += hist[b];
    const bool cand = J < kBins - 1 && n <= kCap && fabsf(m) < kMaxAbsLogit;
    shared_j = J;
    shared_n = cand ? n : -1;
    w.row_mode[r] = cand ? kCand : kRowSearch;
    w.row_j[r] = J;
    w.row_n[r] = cand ? n : 0;
  }
  __syncthreads();
  if (shared_n < 0) return;
  const int J = shared_j;
  for (int i = threadIdx.x; i < S; i += kBins) {
    int n = 0;
    for (int b = 0; b <= J; ++b) n += w.ch_hist[(r * S + i) * kBins + b];
    chunk_n[i] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int off = 0;
    for (int i = 0; i < S; ++i) {
      w.ch_off[r * S + i] = off;
      off += chunk_n[i];
    }
  }
}

// 4. per chunk of a candidate row: copy z and index of the tokens in bins <= J, in index order
template <typename T>
__global__ void __launch_bounds__(kChunkThreads) gather_kernel(SampleArgs a, Workspace w, int S) {
  __shared__ Scratch s;
  const int64_t r = blockIdx.x, c = blockIdx.y, V = a.vocab;
  if (w.row_mode[r] != kCand) return;
  const int J = w.row_j[r];
  const float fm = floorf(w.row_m[r] * kBinsPerNat);
  const Row<T> row = make_row<T>(a, r, reinterpret_cast<const float*>(a.temperature)[r]);
  float zs[kChunkItems];
  int mine = 0;
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {  // a thread owns kChunkItems consecutive tokens
    const int64_t i = c * kChunk + threadIdx.x * kChunkItems + j;
    zs[j] = i < V ? row.z(i) : -INFINITY;
    if (i < V && bin_of(zs[j], fm) <= J) ++mine;
  }
  int chunk_total;
  int pos = w.ch_off[r * S + c] + block_exclusive_sum<kChunkThreads>(mine, s.i, &chunk_total);
#pragma unroll
  for (int j = 0; j < kChunkItems; ++j) {
    const int64_t i = c * kChunk + threadIdx.x * kChunkItems + j;
    if (i < V && bin_of(zs[j], fm) <= J) {
      if (pos < kCap) {
        w.cand_z[r * kCap + pos] = zs[j];
        w.cand_i[r * kCap + pos] = static_cast<int>(i);
      }
      ++pos;
    }
  }
}

// 5. per row: thresholds (candidates or the raw row) and the draw; unfiltered rows pick their
// chunk from the chunk masses and scan only that chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads) finish_kernel(SampleArgs a, Workspace w, int S) {
  __shared__ Scratch s;
  __shared__ int shared_c;
  __shared__ double shared_prev, shared_total;
  __shared__ float pair_z[kThreads];
  const int64_t r = blockIdx.x, V = a.vocab;
  const int mode = w.row_mode[r];
  if (mode == kDone) return;
  const RowParams q = row_params(a, r);
  const Row<T> row = make_row<T>(a, r, q.temperature);
  const float m = w.row_m[r], se = w.row_se[r];
  const float lse = logf(se);
  const double u = philox_uniform(static_cast<uint64_t>(reinterpret_cast<const int64_t*>(a.seed)[r]),
                                  static_cast<uint64_t>(reinterpret_cast<const int64_t*>(a.offset)[r]));
  const bool k_on = q.k > 0 && q.k < V, p_on = q.p < 1.0f;
  Drawn d;
  double total;
  if (mode == kAll) {
    if (threadIdx.x == 0) {  // chunk masses in chunk order; the chunk where u * total falls
      double tot = 0.0;
      for (int i = 0; i < S; ++i) {
        const float mc = w.ch_m[r * S + i];
        if (mc > -INFINITY) tot += static_cast<double>(w.ch_se[r * S + i] * expf(mc - m));
      }
      const double target = u * tot;
      double prev = 0.0;
      int chosen = -1, last = -1;
      for (int i = 0; i < S; ++i) {
        const float mc = w.ch_m[r * S + i];
        const double cm = mc > -INFINITY ? static_cast<double>(w.ch_se[r * S + i] * expf(mc - m)) : 0.0;
        if (cm > 0.0) last = i;
        if (chosen < 0 && cm > 0.0 && prev + cm > target) chosen = i;
        if (chosen < 0) prev += cm;
      }
      if (chosen < 0) {  // rounding: the last chunk with mass, entered from its start
        chosen = last;
        prev = 0.0;
        for (int i = 0; i < last; ++i) {
          const float mc = w.ch_m[r * S + i];
          prev += mc > -INFINITY ? static_cast<double>(w.ch_se[r * S + i] * expf(mc - m)) : 0.0;
        }
      }
      shared_c = chosen;
      shared_prev = prev;
      shared_total = tot;
    }
    __syncthreads();
    total = shared_total;
    const int64_t start = static_cast<int64_t>(shared_c) * kChunk;
    const ChunkSource<T> chunk{row, start, min(static_cast<int64_t>(kChunk), V - start)};
    d = draw(chunk, m, INT64_MIN, 0.0f, u * total - shared_prev, s);
  } else {
    auto finish = [&](const auto& src) {
      const int64_t n = src.size();
      int64_t key_k, key_t;
      if (n <= kThreads) {
        // one token per thread: its count and float64 mass of the tokens strictly above it, then
        // the smallest qualifying keys (a handful of reductions instead of ~70 for the search)
        const int t = threadIdx.x;
        const float zt = t < n ? src.z(t) : -INFINITY;
        pair_z[t] = zt;
        __syncthreads();
        const int64_t kt = order_key(zt);
        int64_t cnt = 0;
        double mass = 0.0;
        if (t < n)
          for (int j = 0; j < n; ++j)
            if (order_key(pair_z[j]) > kt) {
              ++cnt;
              mass += static_cast<double>(expf(pair_z[j] - m));
            }
        key_k = block_reduce<kThreads>(t < n && (!k_on || cnt < q.k) ? kt : INT64_MAX, Min<int64_t>(), s.l);
        key_t = key_k;
        if (p_on) {
          const double total_k =
              k_on ? block_reduce<kThreads>(t < n && kt >= key_k ? static_cast<double>(expf(zt - m)) : 0.0,
                                            Sum<double>(), s.d)
                   : static_cast<double>(se);
          const double bound = static_cast<double>(q.p) * total_k;
          key_t = block_reduce<kThreads>(t < n && kt >= key_k && mass < bound ? kt : INT64_MAX, Min<int64_t>(), s.l);
        }
      } else {
        // more tokens: bisection on the key with one counting pass per step
        int64_t kmin = INT64_MAX;
        for (int64_t e = threadIdx.x; e < n; e += kThreads) kmin = min(kmin, order_key(src.z(e)));
        kmin = block_reduce<kThreads>(kmin, Min<int64_t>(), s.l);
        const int64_t key_max = order_key(m);
        key_k = kmin;
        if (k_on) key_k = search_key(src, m, kmin - 1, key_max, [&](int64_t c, double) { return c < q.k; }, s);
        key_t = key_k;
        if (p_on) {
          double total_k;
          if (k_on) {
            int64_t c;
            count_mass_gt(src, m, key_k - 1, s, &c, &total_k);
          } else {
            total_k = static_cast<double>(se);  // every token survives top-k; candidates may not cover them
          }
          const double bound = static_cast<double>(q.p) * total_k;
          key_t = search_key(src, m, key_k - 1, key_max, [&](int64_t, double mass) { return mass < bound; }, s);
        }
      }
      double kept = 0.0;
      for (int64_t e = threadIdx.x; e < src.size(); e += kThreads) {
        const float z = src.z(e);
        const float wz = expf(z - m);
        if (order_key(z) >= key_t && wz >= q.min_p) kept += static_cast<double>(wz);
      }
      total = block_reduce<kThreads>(kept, Sum<double>(), s.d);
      d = draw(src, m, key_t, q.min_p, u * total, s);
    };
    if (mode == kCand) finish(BufferSource{w.cand_z + r * kCap, w.cand_i + r * kCap, w.row_n[r]});
    else finish(RowSource<T>{row});
  }
  if (threadIdx.x == 0) {
    const bool ok = d.token >= 0;
    reinterpret_cast<int64_t*>(a.tokens)[r] = ok ? d.token : kInvalidToken;
    reinterpret_cast<float*>(a.logprobs)[r] = ok ? (d.z - m) - lse : NAN;
    reinterpret_cast<float*>(a.filtered_logprobs)[r] =
        ok ? static_cast<float>(static_cast<double>(d.z) - static_cast<double>(m) - log(total)) : NAN;
    reinterpret_cast<bool*>(a.valid)[r] = ok;
  }
}

int num_chunks(int64_t vocab) { return static_cast<int>((vocab + kChunk - 1) / kChunk); }

Workspace carve(const SampleArgs& a) {
  const int64_t B = a.batch, S = num_chunks(a.vocab);
  float* f = reinterpret_cast<float*>(a.workspace_f32);
  int* i = reinterpret_cast<int*>(a.workspace_i32);
  Workspace w;
  w.ch_m = f; f += B * S;
  w.ch_se = f; f += B * S;
  w.row_m = f; f += B;
  w.row_se = f; f += B;
  w.cand_z = f;
  w.ch_idx = i; i += B * S;
  w.ch_bad = i; i += B * S;
  w.ch_fin = i; i += B * S;
  w.ch_off = i; i += B * S;
  w.ch_hist = i; i += B * S * kBins;
  w.row_mode = i; i += B;
  w.row_j = i; i += B;
  w.row_n = i; i += B;
  w.cand_i = i;
  return w;
}

}  // namespace

void workspace_size(int64_t batch, int64_t vocab, int64_t* n_f32, int64_t* n_i32) {
  const int64_t S = num_chunks(vocab);
  *n_f32 = batch * (2 * S + 2 + kCap);
  *n_i32 = batch * (S * (4 + kBins) + 3 + kCap);
}

const char* check_args(const SampleArgs& args) {
  if (args.batch <= 0 || args.vocab <= 0) return "launch_sample: empty batch or vocabulary";
  if (args.vocab > static_cast<int64_t>(kMaxChunks) * kChunk) return "launch_sample: vocabulary too large";
  if (args.batch > INT32_MAX) return "launch_sample: batch larger than 2^31 - 1";
  if (args.workspace_f32 == 0 || args.workspace_i32 == 0) return "launch_sample: no workspace";
  if (args.dtype != kFloat32 && args.dtype != kFloat16 && args.dtype != kBFloat16)
    return "launch_sample: dtype must be float32, float16 or bfloat16";
  if (args.num_experts < 1 || args.num_experts > kMaxExperts) return "launch_sample: 1 to kMaxExperts experts";
  if (args.unit_first != 0 && args.unit_first != 1) return "launch_sample: unit_first must be 0 or 1";
  for (int k = 0; k < args.num_experts; ++k)
    if (args.experts[k] == 0) return "launch_sample: null expert pointer";
  if (args.weights == 0 && !(args.unit_first == 1 && args.num_experts == 1)) return "launch_sample: no weights";
  return nullptr;
}

#ifdef IPA_FAST_CPU_EMULATION
const char* launch_sample(const SampleArgs& args) {
  if (const char* err = check_args(args)) return err;
  if (args.dtype != kFloat32) return "emulated launch_sample: float32 only";
  const Workspace w = carve(args);
  const int S = num_chunks(args.vocab);
  const unsigned B = static_cast<unsigned>(args.batch);
  emu::launch(chunk_stats_kernel<float>, B, S, kChunkThreads, args, w, S);
  emu::launch(chunk_hist_kernel<float>, B, S, kChunkThreads, args, w, S);
  emu::launch(plan_kernel, B, 1, kBins, args, w, S);
  emu::launch(gather_kernel<float>, B, S, kChunkThreads, args, w, S);
  emu::launch(finish_kernel<float>, B, 1, kThreads, args, w, S);
  return nullptr;
}
#else
template <typename T>
void launch_all(const SampleArgs& args, cudaStream_t stream) {
  const Workspace w = carve(args);
  const int S = num_chunks(args.vocab);
  const unsigned B = static_cast<unsigned>(args.batch);
  const dim3 chunks(B, static_cast<unsigned>(S));  // x: row (up to 2^31 - 1), y: chunk (<= 1024)
  chunk_stats_kernel<T><<<chunks, kChunkThreads, 0, stream>>>(args, w, S);
  chunk_hist_kernel<T><<<chunks, kChunkThreads, 0, stream>>>(args, w, S);
  plan_kernel<<<B, kBins, 0, stream>>>(args, w, S);
  gather_kernel<T><<<chunks, kChunkThreads, 0, stream>>>(args, w, S);
  finish_kernel<T><<<B, kThreads, 0, stream>>>(args, w, S);
}

const char* launch_sample(const SampleArgs& args) {
  if (const char* err = check_args(args)) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(args.stream);
  switch (args.dtype) {
    case kFloat32: launch_all<float>(args, stream); break;
    case kFloat16: launch_all<__half>(args, stream); break;
    default: launch_all<__nv_bfloat16>(args, stream); break;
  }
  const cudaError_t err = cudaGetLastError();  // launch errors only: no synchronisation
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

}  // namespace cuda
}  // namespace ipa_fast
