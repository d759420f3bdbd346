// The fused tailored sampler on CPU. Per row (semantics: ipa_fast/reference.py):
//
//   pass A  (reads the inputs once)  z = (b + alpha*a) / T into a row buffer; block and chunk
//           maxima; NaN / +inf detection.
//   pass B  (row buffer, cache-hot)  w = exp(z - max) into a second buffer; chunk sums in
//           double lanes -> total and logsumexp.
//   finish  candidates that can survive the filters (the top-k bound from block maxima, the
//           top-p bound w < (1-p)/V * total, the min-p bound w >= min_p), an exact threshold
//           tau over the candidates (a histogram on w's float bits, then a sort of the one
//           boundary bucket only), and one Philox uniform drawn through the inverse CDF of the
//           kept set {z >= tau, w >= min_p} in index order.
//
// Every reduction has a fixed shape: chunks of kChunk elements, double lanes inside a chunk,
// chunks merged in index order. So a row's result depends only on its own data and V, not
// on the batch or on which thread ran which chunk. All loops are counted (or clear one bit of
// a finite mask per step), so they terminate.
#include "cpu/sampler.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "philox.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define IPA_FAST_AVX2 1
#endif

namespace ipa_fast {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------------------------------
// Element loads: fp32 / fp16 / bf16 read directly, converted to float32 in registers.

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float half_to_float(uint16_t h) {
#ifdef IPA_FAST_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float mag = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <int DT>
inline float load1(const void* p, int64_t i) {
  if constexpr (DT == kFloat32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  }
}

#ifdef IPA_FAST_AVX2
template <int DT>
inline __m256 load8(const void* p, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (DT == kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// (l0 + l1) + (l2 + l3): a fixed order.
inline double hsum4(__m256d v) {
  alignas(32) double l[4];
  _mm256_store_pd(l, v);
  return (l[0] + l[1]) + (l[2] + l[3]);
}
#endif

// ------------------------------------------------------------------------------------------
// exp for x <= 0: Cody-Waite reduction x = n ln2 + r, a degree-7 polynomial (Cephes expf
// coefficients, ~1 ulp), times 2^n. The vector version performs the same IEEE operations in
// the same order, so both give identical bits.

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kNegLn2Hi = -0.693359375f;
constexpr float kNegLn2Lo = 2.12194440e-4f;
constexpr float kExpLow = -87.0f;  // below: 0 (the true value is < 1.7e-38)
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_scalar(float x) {
  if (!(x >= kExpLow)) return 0.0f;  // also -inf
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, kNegLn2Hi, x);
  r = std::fma(n, kNegLn2Lo, r);
  float y = std::fma(kP0, r, kP1);
  y = std::fma(y, r, kP2);
  y = std::fma(y, r, kP3);
  y = std::fma(y, r, kP4);
  y = std::fma(y, r, kP5);
  y = std::fma(y, r * r, r);
  y = y + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return y * bits_to_float(scale);
}

#ifdef IPA_FAST_AVX2
inline __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_GE_OQ);
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(kExpLow));  // keep the integer part sane
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(kNegLn2Hi), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kNegLn2Lo), r);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}
#endif

// ------------------------------------------------------------------------------------------
// Per-row parameters and per-thread scratch.

struct RowParams {
  float alpha, temperature, top_p, min_p;
  int64_t top_k;
  uint64_t seed, offset;
  bool ok, greedy;
};

RowParams row_params(const SamplerArgs& a, int64_t row) {
  RowParams p;
  p.alpha = a.alpha[row];
  p.temperature = a.temperature[row];
  p.top_k = a.top_k[row];
  p.top_p = a.top_p[row];
  p.min_p = a.min_p[row];
  p.seed = static_cast<uint64_t>(a.seed[row]);
  p.offset = static_cast<uint64_t>(a.offset[row]);
  // Written so that NaN parameters fail: comparisons with NaN are false.
  p.ok = p.temperature >= 0.0f && p.top_k >= 0 && p.top_p > 0.0f && p.top_p <= 1.0f && p.min_p >= 0.0f &&
         p.min_p <= 1.0f;
  p.greedy = p.temperature == 0.0f;
  return p;
}

// A row's buffers: z and w (V floats each) plus per-block / per-chunk statistics.
struct RowBuffers {
  std::vector<float> z, w, block_max, chunk_max;
  std::vector<double> chunk_sum;
  std::vector<uint8_t> chunk_bad;
  void ensure(int64_t vocab) {
    const int64_t nchunks = (vocab + kChunk - 1) / kChunk, nblocks = (vocab + kBlock - 1) / kBlock;
    if (static_cast<int64_t>(z.size()) < vocab) {
      z.resize(vocab);
      w.resize(vocab);
    }
    if (static_cast<int64_t>(block_max.size()) < nblocks) block_max.resize(nblocks);
    if (static_cast<int64_t>(chunk_max.size()) < nchunks) {
      chunk_max.resize(nchunks);
      chunk_sum.resize(nchunks);
      chunk_bad.resize(nchunks);
    }
  }
};

// Scratch of the thread that finishes a row: candidate lists and the selection histogram.
constexpr int kBuckets = 512;  // w's float bits >> 21: exponent + 2 mantissa bits; w <= 1 -> < 509
constexpr int kHistCopies = 4;  // interleaved copies break store-to-load chains on equal buckets

struct FinishScratch {
  std::vector<int32_t> list, list2;
  std::vector<float> bmax;
  std::vector<std::pair<float, float>> boundary;  // (z, w) of the boundary bucket
  std::vector<double> hist_mass;
  std::vector<int32_t> hist_count;
  void ensure(int64_t vocab) {
    if (static_cast<int64_t>(list.size()) < vocab) {
      list.resize(vocab);
      list2.resize(vocab);
    }
    if (hist_mass.empty()) {
      hist_mass.resize(kBuckets * kHistCopies);
      hist_count.resize(kBuckets * kHistCopies);
    }
  }
};

RowBuffers& thread_row_buffers() {
  static thread_local RowBuffers buffers;
  return buffers;
}

FinishScratch& thread_finish_scratch() {
  static thread_local FinishScratch scratch;
  return scratch;
}

// ------------------------------------------------------------------------------------------
// Pass A: z for one chunk of a row, block maxima, chunk maximum, NaN / +inf flag.

template <int DB, int DA>
void pass_a_chunk_impl(const void* b, const void* a, int64_t vocab, int64_t chunk, float alpha, float temperature,
                       float* z, float* block_max, float* chunk_max, uint8_t* chunk_bad) {
  const int64_t c0 = chunk * kChunk, c1 = std::min(vocab, c0 + kChunk);
  const bool divide = temperature != 1.0f;  // x / 1 == x exactly
  float cmax = -kInf;
  bool bad = false;
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t b1 = std::min(c1, b0 + kBlock);
    int64_t i = b0;
    float bmax = -kInf;
#ifdef IPA_FAST_AVX2
    __m256 vmax = _mm256_set1_ps(-kInf), vbad = _mm256_setzero_ps();
    const __m256 valpha = _mm256_set1_ps(alpha), vt = _mm256_set1_ps(temperature), vinf = _mm256_set1_ps(kInf);
    for (; i + 8 <= b1; i += 8) {
      __m256 x = load8<DB>(b, i);
      if constexpr (DA >= 0) x = _mm256_add_ps(x, _mm256_mul_ps(valpha, load8<DA>(a, i)));
      if (divide) x = _mm256_div_ps(x, vt);
      _mm256_storeu_ps(z + i, x);
      vmax = _mm256_max_ps(vmax, x);
      vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(x, vinf, _CMP_NLT_UQ));  // NaN or +inf
    }
    bmax = hmax8(vmax);
    bad |= _mm256_movemask_ps(vbad) != 0;
#endif
    for (; i < b1; ++i) {
      float x = load1<DB>(b, i);
      if constexpr (DA >= 0) x = x + alpha * load1<DA>(a, i);
      if (divide) x = x / temperature;
      z[i] = x;
      bmax = x > bmax ? x : bmax;
      bad |= !(x < kInf);
    }
    block_max[b0 / kBlock] = bmax;
    cmax = bmax > cmax ? bmax : cmax;
  }
  chunk_max[chunk] = cmax;
  chunk_bad[chunk] = bad;
}

template <int DB>
void pass_a_dispatch_adapter(const void* b, const void* a, int da, int64_t vocab, int64_t chunk, float alpha,
                             float temperature, float* z, float* bm, float* cm, uint8_t* cb) {
  switch (a ? da : -1) {
    case kFloat32: return pass_a_chunk_impl<DB, kFloat32>(b, a, vocab, chunk, alpha, temperature, z, bm, cm, cb);
    case kFloat16: return pass_a_chunk_impl<DB, kFloat16>(b, a, vocab, chunk, alpha, temperature, z, bm, cm, cb);
    case kBFloat16: return pass_a_chunk_impl<DB, kBFloat16>(b, a, vocab, chunk, alpha, temperature, z, bm, cm, cb);
    default: return pass_a_chunk_impl<DB, -1>(b, nullptr, vocab, chunk, alpha, temperature, z, bm, cm, cb);
  }
}

size_t dtype_size(int dt) { return dt == kFloat32 ? 4 : 2; }

void pass_a_chunk(const SamplerArgs& args, int64_t row, const RowParams& p, int64_t chunk, RowBuffers& rb) {
  const int64_t V = args.vocab;
  const void* b = static_cast<const char*>(args.base) + row * V * dtype_size(args.base_dtype);
  // alpha == 0 ignores the adapter (no 0 * -inf NaN), as the reference does.
  const void* a = (args.adapter && p.alpha != 0.0f)
                      ? static_cast<const char*>(args.adapter) + row * V * dtype_size(args.adapter_dtype)
                      : nullptr;
  const float t = p.greedy ? 1.0f : p.temperature;
  float* z = rb.z.data();
  switch (args.base_dtype) {
    case kFloat16:
      return pass_a_dispatch_adapter<kFloat16>(b, a, args.adapter_dtype, V, chunk, p.alpha, t, z, rb.block_max.data(),
                                               rb.chunk_max.data(), rb.chunk_bad.data());
    case kBFloat16:
      return pass_a_dispatch_adapter<kBFloat16>(b, a, args.adapter_dtype, V, chunk, p.alpha, t, z, rb.block_max.data(),
                                                rb.chunk_max.data(), rb.chunk_bad.data());
    default:
      return pass_a_dispatch_adapter<kFloat32>(b, a, args.adapter_dtype, V, chunk, p.alpha, t, z, rb.block_max.data(),
                                               rb.chunk_max.data(), rb.chunk_bad.data());
  }
}

// Pass B: w = exp(z - m) for one chunk, and the chunk's sum in double lanes.
void pass_b_chunk(int64_t vocab, int64_t chunk, float m, RowBuffers& rb) {
  const int64_t c0 = chunk * kChunk, c1 = std::min(vocab, c0 + kChunk);
  const float* z = rb.z.data();
  float* w = rb.w.data();
  int64_t i = c0;
  double sum = 0.0;
#ifdef IPA_FAST_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; i + 8 <= c1; i += 8) {
    const __m256 wi = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm));
    _mm256_storeu_ps(w + i, wi);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(wi)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(wi, 1)));
  }
  sum = hsum4(_mm256_add_pd(acc0, acc1));
#endif
  double tail = 0.0;
  for (; i < c1; ++i) {
    w[i] = exp_scalar(z[i] - m);
    tail += w[i];
  }
  rb.chunk_sum[chunk] = sum + tail;
}

// ------------------------------------------------------------------------------------------
// Finishing a row: thresholds and the draw.

// Candidates: indices i (ascending) with z_i >= z_low and w_i >= w_low.
int64_t collect(const RowBuffers& rb, int64_t vocab, float z_low, float w_low, int32_t* out) {
  const float* z = rb.z.data();
  const float* w = rb.w.data();
  int64_t n = 0, i = 0;
#ifdef IPA_FAST_AVX2
  const __m256 vz = _mm256_set1_ps(z_low), vw = _mm256_set1_ps(w_low);
  for (; i + 8 <= vocab; i += 8) {
    const __m256 hit = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + i), vz, _CMP_GE_OQ),
                                     _mm256_cmp_ps(_mm256_loadu_ps(w + i), vw, _CMP_GE_OQ));
    unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(hit));
    while (bits) {  // clears one of at most 8 bits per step
      out[n++] = static_cast<int32_t>(i + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
#endif
  for (; i < vocab; ++i)
    if (z[i] >= z_low && w[i] >= w_low) out[n++] = static_cast<int32_t>(i);
  return n;
}

inline int bucket_of(float w) { return static_cast<int>(float_to_bits(w) >> 21); }

// The exact threshold over the candidate list J (ascending indices):
//   by_mass == false: the k-th largest z (-inf if |J| < k);
//   by_mass == true : the smallest z value v with mass{z > v} < P (mass = sum of w over J);
//                     -inf if the whole list's mass stays below P (everything kept).
// Elements are bucketed by w's float bits (monotone in z); only the boundary bucket is sorted.
float select_threshold(const RowBuffers& rb, const int32_t* J, int64_t n, bool by_mass, int64_t k, double P,
                       FinishScratch& fs) {
  const float* z = rb.z.data();
  const float* w = rb.w.data();
  double* hm = fs.hist_mass.data();
  int32_t* hc = fs.hist_count.data();
  std::fill(hm, hm + kBuckets * kHistCopies, 0.0);
  std::fill(hc, hc + kBuckets * kHistCopies, 0);
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[J[j]];
    const int slot = static_cast<int>(j & (kHistCopies - 1)) * kBuckets + bucket_of(wj);
    hc[slot] += 1;
    hm[slot] += wj;
  }
  int64_t count_above = 0;
  double mass_above = 0.0;
  int boundary = -1;
  for (int bkt = kBuckets - 1; bkt >= 0; --bkt) {
    int64_t cnt = 0;
    for (int c = 0; c < kHistCopies; ++c) cnt += hc[c * kBuckets + bkt];
    const double mass = (hm[bkt] + hm[kBuckets + bkt]) + (hm[2 * kBuckets + bkt] + hm[3 * kBuckets + bkt]);
    if (by_mass ? (cnt > 0 && mass_above + mass >= P) : (count_above + cnt >= k)) {
      boundary = bkt;
      break;
    }
    count_above += cnt;
    mass_above += mass;
  }
  if (boundary < 0) return -kInf;
  auto& E = fs.boundary;
  E.clear();
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[J[j]];
    if (bucket_of(wj) == boundary) E.emplace_back(z[J[j]], wj);
  }
  std::sort(E.begin(), E.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  float tau = E.empty() ? -kInf : E.back().first;
  const int64_t ne = static_cast<int64_t>(E.size());
  for (int64_t g = 0; g < ne;) {  // groups of equal z, descending
    int64_t h = g;
    double group_mass = 0.0;
    while (h < ne && E[h].first == E[g].first) group_mass += E[h++].second;
    if (by_mass) {
      if (!(mass_above < P)) break;
      tau = E[g].first;
      mass_above += group_mass;
    } else {
      count_above += h - g;
      if (count_above >= k) return E[g].first;
    }
    g = h;
  }
  return tau;
}

// Draw over the kept set of the whole row, {i : z_i >= tau and w_i >= w_min}: kept mass per
// chunk in double lanes, merged in chunk order; then the inverse CDF inside the chunk.
// Returns the token and sets *kept_total.
int64_t draw_full_row(const RowBuffers& rb, int64_t vocab, float tau, float w_min, double u, double* kept_total) {
  const float* z = rb.z.data();
  const float* w = rb.w.data();
  const int64_t nchunks = (vocab + kChunk - 1) / kChunk;
  auto kept = [&](int64_t i) { return z[i] >= tau && w[i] >= w_min; };
  std::vector<double>& sums = thread_finish_scratch().hist_mass;  // >= kBuckets*4 entries, reused
  std::vector<double> big;
  double* cs = sums.data();
  if (nchunks > static_cast<int64_t>(sums.size())) {
    big.resize(nchunks);
    cs = big.data();
  }
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * kChunk, c1 = std::min(vocab, c0 + kChunk);
    int64_t i = c0;
    double s = 0.0;
#ifdef IPA_FAST_AVX2
    const __m256 vt = _mm256_set1_ps(tau), vw = _mm256_set1_ps(w_min);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (; i + 8 <= c1; i += 8) {
      const __m256 wi = _mm256_loadu_ps(w + i);
      const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + i), vt, _CMP_GE_OQ),
                                        _mm256_cmp_ps(wi, vw, _CMP_GE_OQ));
      const __m256 wk = _mm256_and_ps(wi, keep);
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(wk)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(wk, 1)));
    }
    s = hsum4(_mm256_add_pd(acc0, acc1));
#endif
    double tail = 0.0;
    for (; i < c1; ++i)
      if (kept(i)) tail += w[i];
    cs[c] = s + tail;
    total += cs[c];
  }
  *kept_total = total;
  const double target = u * total;
  double cum = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * kChunk, c1 = std::min(vocab, c0 + kChunk);
    if (!(cum + cs[c] > target)) {
      cum += cs[c];
      continue;
    }
    int64_t last = -1;
    for (int64_t i = c0; i < c1; ++i) {
      if (!kept(i) || !(w[i] > 0.0f)) continue;
      cum += w[i];
      last = i;
      if (cum > target) return i;
    }
    if (last >= 0) return last;  // rounding: the in-chunk running sum fell short of the chunk's sum
  }
  for (int64_t i = vocab - 1; i >= 0; --i)  // rounding at the very end: the last kept token
    if (kept(i) && w[i] > 0.0f) return i;
  return 0;
}

// Draw over a kept list K (ascending indices): blocks of 64 entries summed with four
// interleaved accumulators, blocks merged in order; inverse CDF inside the crossing block.
int64_t draw_list(const RowBuffers& rb, const int32_t* K, int64_t n, double u, double* kept_total) {
  constexpr int64_t kSub = 64;
  const float* w = rb.w.data();
  const int64_t nblocks = (n + kSub - 1) / kSub;
  std::vector<double>& sums = thread_finish_scratch().hist_mass;
  std::vector<double> big;
  double* bs = sums.data();
  if (nblocks > static_cast<int64_t>(sums.size())) {
    big.resize(nblocks);
    bs = big.data();
  }
  double total = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t j0 = blk * kSub, j1 = std::min(n, j0 + kSub);
    double a[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t j = j0; j < j1; ++j) a[j & 3] += w[K[j]];
    bs[blk] = (a[0] + a[1]) + (a[2] + a[3]);
    total += bs[blk];
  }
  *kept_total = total;
  const double target = u * total;
  double cum = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t j0 = blk * kSub, j1 = std::min(n, j0 + kSub);
    if (!(cum + bs[blk] > target)) {
      cum += bs[blk];
      continue;
    }
    int64_t last = -1;
    for (int64_t j = j0; j < j1; ++j) {
      if (!(w[K[j]] > 0.0f)) continue;
      cum += w[K[j]];
      last = K[j];
      if (cum > target) return K[j];
    }
    if (last >= 0) return last;
  }
  for (int64_t j = n - 1; j >= 0; --j)
    if (w[K[j]] > 0.0f) return K[j];
  return n > 0 ? K[0] : 0;
}

void write_invalid(const SamplerArgs& args, int64_t row) {
  args.tokens[row] = 0;
  args.logprobs[row] = static_cast<float>(kNaN);
  args.filtered_logprobs[row] = static_cast<float>(kNaN);
  args.valid[row] = false;
}

// Everything after passes A and B, single-threaded for the row.
void finish_row(const SamplerArgs& args, int64_t row, const RowParams& p, const RowBuffers& rb) {
  const int64_t V = args.vocab;
  const int64_t nchunks = (V + kChunk - 1) / kChunk, nblocks = (V + kBlock - 1) / kBlock;
  float m = -kInf;
  bool bad = false;
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    m = std::max(m, rb.chunk_max[c]);
    bad |= rb.chunk_bad[c] != 0;
    total += rb.chunk_sum[c];
  }
  if (bad || !(m > -kInf)) return write_invalid(args, row);
  const float* z = rb.z.data();
  const double lse = static_cast<double>(m) + std::log(total);

  int64_t token = 0;
  double filtered = 0.0;
  if (p.greedy) {
    for (int64_t i = 0; i < V; ++i)  // the max exists: the loop returns at the first maximum
      if (z[i] == m) {
        token = i;
        break;
      }
  } else {
    FinishScratch& fs = thread_finish_scratch();
    fs.ensure(V);
    const bool k_on = p.top_k > 0 && p.top_k < V, p_on = p.top_p < 1.0f, mp_on = p.min_p > 0.0f;
    const double u = philox_uniform(p.seed, p.offset);
    const float w_min = mp_on ? p.min_p : 0.0f;  // min-p: keep w = exp(z - max) >= min_p
    float tau = -kInf;
    int64_t n = -1;  // candidates in fs.list; -1: the whole row
    if (k_on || p_on || mp_on) {
      float z_low = -kInf, w_low = 0.0f;
      if (k_on) {
        // k distinct blocks have maxima >= the k-th largest block maximum, so the k-th largest
        // z is at least that. (Top-p and min-p are applied inside the top-k survivors below.)
        if (nblocks >= p.top_k) {
          fs.bmax.assign(rb.block_max.begin(), rb.block_max.begin() + nblocks);
          std::nth_element(fs.bmax.begin(), fs.bmax.begin() + (p.top_k - 1), fs.bmax.end(), std::greater<float>());
          z_low = fs.bmax[p.top_k - 1];
        }
      } else {
        // A token with pi < (1-p)/V is never in the nucleus (all such tokens together hold
        // less than 1-p); the 0.999 margin covers rounding.
        if (p_on) w_low = static_cast<float>(0.999 * (1.0 - static_cast<double>(p.top_p)) / V * total);
        w_low = std::max(w_low, w_min);
      }
      n = collect(rb, V, z_low, w_low, fs.list.data());
      int32_t* J = fs.list.data();
      if (k_on) {
        tau = select_threshold(rb, J, n, false, p.top_k, 0.0, fs);
        if (p_on) {
          int64_t n1 = 0;  // the top-k survivors, still ascending
          double total_k = 0.0;
          for (int64_t j = 0; j < n; ++j)
            if (z[J[j]] >= tau) J[n1++] = J[j];
          n = n1;
          double a[4] = {0.0, 0.0, 0.0, 0.0};
          for (int64_t j = 0; j < n; ++j) a[j & 3] += rb.w[J[j]];
          total_k = (a[0] + a[1]) + (a[2] + a[3]);
          tau = std::max(tau, select_threshold(rb, J, n, true, 0, static_cast<double>(p.top_p) * total_k, fs));
        }
      } else if (p_on) {
        tau = select_threshold(rb, J, n, true, 0, static_cast<double>(p.top_p) * total, fs);
      }
    }
    double kept_total = 0.0;
    if (n < 0 || n > V / 8) {
      token = draw_full_row(rb, V, tau, w_min, u, &kept_total);
    } else {
      int32_t* J = fs.list.data();
      int32_t* K = fs.list2.data();
      int64_t nk = 0;
      for (int64_t j = 0; j < n; ++j)
        if (z[J[j]] >= tau && rb.w[J[j]] >= w_min) K[nk++] = J[j];
      token = draw_list(rb, K, nk, u, &kept_total);
    }
    filtered = (static_cast<double>(z[token]) - static_cast<double>(m)) - std::log(kept_total);
  }
  args.tokens[row] = token;
  args.logprobs[row] = static_cast<float>(static_cast<double>(z[token]) - lse);
  args.filtered_logprobs[row] = static_cast<float>(filtered);
  args.valid[row] = true;
}

float merge_max(const RowBuffers& rb, int64_t nchunks, bool* bad) {
  float m = -kInf;
  bool b = false;
  for (int64_t c = 0; c < nchunks; ++c) {
    m = std::max(m, rb.chunk_max[c]);
    b |= rb.chunk_bad[c] != 0;
  }
  *bad = b;
  return m;
}

// One row on one thread.
void sample_row(const SamplerArgs& args, int64_t row, RowBuffers& rb) {
  const RowParams p = row_params(args, row);
  if (!p.ok) return write_invalid(args, row);
  const int64_t nchunks = (args.vocab + kChunk - 1) / kChunk;
  for (int64_t c = 0; c < nchunks; ++c) pass_a_chunk(args, row, p, c, rb);
  bool bad;
  const float m = merge_max(rb, nchunks, &bad);
  if (bad || !(m > -kInf)) return write_invalid(args, row);
  for (int64_t c = 0; c < nchunks; ++c) pass_b_chunk(args.vocab, c, m, rb);
  finish_row(args, row, p, rb);
}

}  // namespace

float exp_nonpositive(float x) { return exp_scalar(x); }

void sample(const SamplerArgs& args, int num_threads) {
  const int64_t B = args.batch, V = args.vocab;
  if (B <= 0 || V <= 0) return;
  const int threads = std::max(1, num_threads);
  const int64_t nchunks = (V + kChunk - 1) / kChunk;
  const bool tiny = B * V < (1 << 15);  // not worth waking a thread team
  if (threads == 1 || tiny) {
    RowBuffers& rb = thread_row_buffers();
    rb.ensure(V);
    for (int64_t row = 0; row < B; ++row) sample_row(args, row, rb);
    return;
  }
  if (B >= threads || nchunks < 2) {
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, B)))
    {
      RowBuffers& rb = thread_row_buffers();
      rb.ensure(V);
#pragma omp for schedule(dynamic, 1)
      for (int64_t row = 0; row < B; ++row) sample_row(args, row, rb);
    }
    return;
  }
  // Few rows, several threads: the team splits each row's chunks (same chunk arithmetic, so
  // the same bits as one thread), one thread finishes the row.
  RowBuffers& rb = thread_row_buffers();  // the calling thread's, shared with the team
  rb.ensure(V);
  const int team = static_cast<int>(std::min<int64_t>(threads, nchunks));
#pragma omp parallel num_threads(team)
  {
    for (int64_t row = 0; row < B; ++row) {
      const RowParams p = row_params(args, row);  // the same on every thread
      if (!p.ok) {
#pragma omp single
        write_invalid(args, row);
        continue;
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < nchunks; ++c) pass_a_chunk(args, row, p, c, rb);
      bool bad;
      const float m = merge_max(rb, nchunks, &bad);  // every thread, after the barrier
      if (bad || !(m > -kInf)) {
#pragma omp single
        write_invalid(args, row);
        continue;
      }
#pragma omp for schedule(static)
      for (int64_t c = 0; c < nchunks; ++c) pass_b_chunk(V, c, m, rb);
#pragma omp single
      finish_row(args, row, p, rb);
    }
  }
}

double read_pass(const void* base, int base_dtype, const void* adapter, int adapter_dtype, int64_t batch,
                 int64_t vocab, int num_threads) {
  const int64_t nchunks = (vocab + kChunk - 1) / kChunk;
  const int64_t units = batch * nchunks;
  double total = 0.0;
  auto read_one = [&](const void* t, int dt, int64_t row, int64_t c0, int64_t c1) -> double {
    const void* r = static_cast<const char*>(t) + row * vocab * dtype_size(dt);
    float s = 0.0f;
    int64_t i = c0;
#ifdef IPA_FAST_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= c1; i += 8) {
      __m256 x = dt == kFloat32 ? load8<kFloat32>(r, i) : dt == kFloat16 ? load8<kFloat16>(r, i) : load8<kBFloat16>(r, i);
      acc = _mm256_add_ps(acc, x);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
#endif
    for (; i < c1; ++i) s += dt == kFloat32 ? load1<kFloat32>(r, i) : dt == kFloat16 ? load1<kFloat16>(r, i) : load1<kBFloat16>(r, i);
    return s;
  };
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static) reduction(+ : total)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t row = u / nchunks, c = u % nchunks;
    const int64_t c0 = c * kChunk, c1 = std::min(vocab, c0 + kChunk);
    total += read_one(base, base_dtype, row, c0, c1);
    if (adapter) total += read_one(adapter, adapter_dtype, row, c0, c1);
  }
  return total;
}

}  // namespace cpu
}  // namespace ipa_fast
