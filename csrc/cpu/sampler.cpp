// The fused tailored sampler on CPU. Per row (semantics: ipa_fast/reference.py):
//
//   pass A  (reads the inputs once)  z = (sum_k w_k * l_k) / T into a row buffer, per chunk:
//           the first two experts fused, each further one added in place (the chunk stays in
//           L1), the last step dividing and taking block and chunk maxima and NaN / +inf.
//   pass B  (row buffer, cache-hot)  w = exp(z - max) into a second buffer; chunk sums in
//           double lanes -> total and logsumexp.
//   finish  candidates that can survive the filters (the top-k bound from block maxima; for
//           top-p a bound guessed from a subsample and verified, else w < (1-p)/V * total; the
//           min-p bound w >= min_p), an exact threshold tau over the candidates (a radix descent
//           on w's float bits, 9 + 11 + 10 bits, then a sort of the few equal-w survivors by z),
//           and one Philox uniform drawn through the inverse CDF of the kept set
//           {z >= tau, w >= min_p} in index order.
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
  float temperature, top_p, min_p;
  int64_t top_k;
  uint64_t seed, offset;
  bool ok, greedy;
};

RowParams row_params(const SamplerArgs& a, int64_t row) {
  RowParams p;
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

// Scratch of the thread that finishes a row: candidates (indices, z, w) and the selection
// histograms. The threshold search is a radix descent on w's float bits (w = exp(z - max) is
// monotone in z): 9 + 11 + 10 bits over w <= 1, then a sort of the equal-w survivors by z.
constexpr int kBuckets1 = 512;  // bits >> 21: exponent + 2 mantissa bits (w <= 1 -> < 509)
constexpr int kBuckets2 = 2048;  // (bits >> 10) & 0x7ff
constexpr int kBuckets3 = 1024;  // bits & 0x3ff
constexpr int kHistCopies = 4;   // interleaved level-1 copies break store-to-load chains

struct FinishScratch {
  std::vector<int32_t> list, list2;
  std::vector<float> cz, cw, bmax;
  std::vector<float> ez, ew;  // the boundary bucket's elements
  std::vector<double> hist_mass, sums;
  std::vector<int32_t> hist_count;
  void ensure(int64_t vocab) {
    if (static_cast<int64_t>(list.size()) < vocab + 8) {
      list.resize(vocab + 8);
      list2.resize(vocab + 8);
      cz.resize(vocab + 8);
      cw.resize(vocab + 8);
      ez.resize(vocab + 8);
      ew.resize(vocab + 8);
      sums.resize(vocab / 64 + 2);
    }
    if (hist_mass.empty()) {
      hist_mass.resize(kBuckets1 * kHistCopies);
      hist_count.resize(kBuckets1 * kHistCopies);
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
//
// One step of the left-to-right mix over a chunk: FIRST steps start from their experts
// (x = w0*l0 + w1*l1, or w0*l0 alone when D1 < 0, or 0 when D0 < 0: every weight is 0),
// later steps add one expert to z (x = z + w0*l0). The FINAL step divides by T and takes the
// block / chunk maxima and the NaN / +inf flag. Products and sums round separately (no FMA:
// the build uses -ffp-contract=off), as the reference does.

template <int D0, int D1, bool FIRST, bool FINAL>
void mix_step(const void* l0, float w0, const void* l1, float w1, int64_t vocab, int64_t chunk, float temperature,
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
    const __m256 vw0 = _mm256_set1_ps(w0), vw1 = _mm256_set1_ps(w1), vt = _mm256_set1_ps(temperature),
                 vinf = _mm256_set1_ps(kInf);
    for (; i + 8 <= b1; i += 8) {
      __m256 x;
      if constexpr (!FIRST) {
        x = _mm256_add_ps(_mm256_loadu_ps(z + i), _mm256_mul_ps(vw0, load8<D0>(l0, i)));
      } else if constexpr (D0 < 0) {
        x = _mm256_setzero_ps();
      } else {
        x = _mm256_mul_ps(vw0, load8<D0>(l0, i));
        if constexpr (D1 >= 0) x = _mm256_add_ps(x, _mm256_mul_ps(vw1, load8<D1>(l1, i)));
      }
      if constexpr (FINAL) {
        if (divide) x = _mm256_div_ps(x, vt);
        vmax = _mm256_max_ps(vmax, x);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(x, vinf, _CMP_NLT_UQ));  // NaN or +inf
      }
      _mm256_storeu_ps(z + i, x);
    }
    if constexpr (FINAL) {
      bmax = hmax8(vmax);
      bad |= _mm256_movemask_ps(vbad) != 0;
    }
#endif
    for (; i < b1; ++i) {
      float x;
      if constexpr (!FIRST) {
        x = z[i] + w0 * load1<D0>(l0, i);
      } else if constexpr (D0 < 0) {
        x = 0.0f;
      } else {
        x = w0 * load1<D0>(l0, i);
        if constexpr (D1 >= 0) x = x + w1 * load1<D1>(l1, i);
      }
      if constexpr (FINAL) {
        if (divide) x = x / temperature;
        bmax = x > bmax ? x : bmax;
        bad |= !(x < kInf);
      }
      z[i] = x;
    }
    if constexpr (FINAL) {
      block_max[b0 / kBlock] = bmax;
      cmax = bmax > cmax ? bmax : cmax;
    }
  }
  if constexpr (FINAL) {
    chunk_max[chunk] = cmax;
    chunk_bad[chunk] = bad;
  }
}

struct MixStep {
  const void* l0;
  float w0;
  const void* l1;
  float w1;
  int64_t vocab, chunk;
  float t;
  float* z;
  float *bm, *cm;
  uint8_t* cb;
};

template <int D0, int D1, bool FIRST, bool FINAL>
void run_step(const MixStep& s) {
  mix_step<D0, D1, FIRST, FINAL>(s.l0, s.w0, s.l1, s.w1, s.vocab, s.chunk, s.t, s.z, s.bm, s.cm, s.cb);
}

template <int D0, bool FIRST, bool FINAL>
void step_d1(const MixStep& s, int d1) {
  switch (d1) {
    case kFloat32: return run_step<D0, kFloat32, FIRST, FINAL>(s);
    case kFloat16: return run_step<D0, kFloat16, FIRST, FINAL>(s);
    case kBFloat16: return run_step<D0, kBFloat16, FIRST, FINAL>(s);
    default: return run_step<D0, -1, FIRST, FINAL>(s);
  }
}

// d0 / d1: the steps' expert dtypes (-1: none). Later steps (FIRST false) take one expert.
template <bool FIRST, bool FINAL>
void step_d0(const MixStep& s, int d0, int d1) {
  if constexpr (FIRST) {
    switch (d0) {
      case kFloat32: return step_d1<kFloat32, true, FINAL>(s, d1);
      case kFloat16: return step_d1<kFloat16, true, FINAL>(s, d1);
      case kBFloat16: return step_d1<kBFloat16, true, FINAL>(s, d1);
      default: return run_step<-1, -1, true, FINAL>(s);  // every weight 0: z = 0
    }
  } else {
    switch (d0) {
      case kFloat16: return run_step<kFloat16, -1, false, FINAL>(s);
      case kBFloat16: return run_step<kBFloat16, -1, false, FINAL>(s);
      default: return run_step<kFloat32, -1, false, FINAL>(s);
    }
  }
}

size_t dtype_size(int dt) { return dt == kFloat32 ? 4 : 2; }

float expert_weight(const SamplerArgs& args, int64_t row, int k) {
  if (args.unit_first && k == 0) return 1.0f;
  return args.weights[row * args.weight_stride + k - args.unit_first];
}

void pass_a_chunk(const SamplerArgs& args, int64_t row, const RowParams& p, int64_t chunk, RowBuffers& rb) {
  const int64_t V = args.vocab;
  // The experts with a non-zero weight, in order: a weight of 0 ignores its expert (no 0 * -inf
  // NaN), as the reference does. Skipping its +0 term changes at most the sign of a zero z.
  int n = 0;
  int active[2] = {-1, -1};
  int last = -1;
  for (int k = 0; k < args.num_experts; ++k)
    if (expert_weight(args, row, k) != 0.0f) {
      if (n < 2) active[n] = k;
      last = k;
      ++n;
    }
  MixStep s{};
  s.vocab = V;
  s.chunk = chunk;
  s.t = p.greedy ? 1.0f : p.temperature;
  s.z = rb.z.data();
  s.bm = rb.block_max.data();
  s.cm = rb.chunk_max.data();
  s.cb = rb.chunk_bad.data();
  auto row_ptr = [&](int k) {
    return static_cast<const void*>(static_cast<const char*>(args.experts[k]) +
                                    row * args.expert_strides[k] * static_cast<int64_t>(dtype_size(args.expert_dtypes[k])));
  };
  const int d0 = active[0] >= 0 ? args.expert_dtypes[active[0]] : -1;
  const int d1 = active[1] >= 0 ? args.expert_dtypes[active[1]] : -1;
  if (active[0] >= 0) {
    s.l0 = row_ptr(active[0]);
    s.w0 = expert_weight(args, row, active[0]);
  }
  if (active[1] >= 0) {
    s.l1 = row_ptr(active[1]);
    s.w1 = expert_weight(args, row, active[1]);
  }
  if (n <= 2) return step_d0<true, true>(s, d0, d1);
  step_d0<true, false>(s, d0, d1);
  s.l1 = nullptr;
  for (int k = active[1] + 1; k <= last; ++k) {
    const float w = expert_weight(args, row, k);
    if (w == 0.0f) continue;
    s.l0 = row_ptr(k);
    s.w0 = w;
    if (k == last) {
      step_d0<false, true>(s, args.expert_dtypes[k], -1);
    } else {
      step_d0<false, false>(s, args.expert_dtypes[k], -1);
    }
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

#ifdef IPA_FAST_AVX2
// For each 8-bit mask, the lanes of its set bits first (ascending), for left-packing.
struct PackTable {
  alignas(32) int32_t idx[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) idx[m][n++] = l;
      for (; n < 8; ++n) idx[m][n] = 0;
    }
  }
};
const PackTable kPack;
#endif

// Candidates: indices i (ascending) with z_i >= z_low and w_i >= w_low.
int64_t collect(const RowBuffers& rb, int64_t vocab, float z_low, float w_low, int32_t* out, float* out_z,
                float* out_w) {
  const float* z = rb.z.data();
  const float* w = rb.w.data();
  int64_t n = 0, i = 0;
#ifdef IPA_FAST_AVX2
  const __m256 vz = _mm256_set1_ps(z_low), vw = _mm256_set1_ps(w_low);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= vocab; i += 8) {
    const __m256 zi = _mm256_loadu_ps(z + i), wi = _mm256_loadu_ps(w + i);
    const __m256 hit = _mm256_and_ps(_mm256_cmp_ps(zi, vz, _CMP_GE_OQ), _mm256_cmp_ps(wi, vw, _CMP_GE_OQ));
    const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(hit));
    // Left-pack the hits (a permutation from the table), store 8 lanes, advance by the count;
    // the buffers have 8 spare entries for the overhang.
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n),
                        _mm256_permutevar8x32_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i)), lane), perm));
    _mm256_storeu_ps(out_z + n, _mm256_permutevar8x32_ps(zi, perm));
    _mm256_storeu_ps(out_w + n, _mm256_permutevar8x32_ps(wi, perm));
    n += __builtin_popcount(bits);
  }
#endif
  for (; i < vocab; ++i)
    if (z[i] >= z_low && w[i] >= w_low) {
      out[n] = static_cast<int32_t>(i);
      out_z[n] = z[i];
      out_w[n++] = w[i];
    }
  return n;
}

// sum of x[0, n) in double: four interleaved accumulators, merged as (a0 + a1) + (a2 + a3).
double sum4(const float* x, int64_t n) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    a0 += x[j];
    a1 += x[j + 1];
    a2 += x[j + 2];
    a3 += x[j + 3];
  }
  if (j < n) a0 += x[j];
  if (j + 1 < n) a1 += x[j + 1];
  if (j + 2 < n) a2 += x[j + 2];
  return (a0 + a1) + (a2 + a3);
}

// A guess (not a bound) for the top-p threshold in w: where every 16th token's mass, walked
// from the top, reaches the fraction p of its own total; returned one octave lower (0 when the
// row is small). The caller verifies it.
float guess_nucleus_bound(const float* w, int64_t vocab, double p) {
  constexpr int64_t kStride = 16;
  if (vocab < 256 * kStride) return 0.0f;
  double hist[kBuckets1] = {};
  double sub_total = 0.0;
  for (int64_t i = 0; i < vocab; i += kStride) {
    hist[float_to_bits(w[i]) >> 21] += w[i];
    sub_total += w[i];
  }
  const double target = p * sub_total;
  double acc = 0.0;
  for (int bkt = kBuckets1 - 1; bkt >= 0; --bkt) {
    acc += hist[bkt];
    if (acc >= target) return bits_to_float(static_cast<uint32_t>(std::max(0, bkt - 4)) << 21);
  }
  return 0.0f;
}

// Walks a histogram from the top bucket down to the one that holds the threshold: by count,
// the first bucket where the count reaches k; by mass, the first where the mass reaches P.
// Updates the count / mass above it; -1 if none does.
int find_boundary(const int32_t* count, const double* mass, int nb, bool by_mass, int64_t k, double P,
                  int64_t* count_above, double* mass_above) {
  for (int bkt = nb - 1; bkt >= 0; --bkt) {
    if (by_mass ? (mass[bkt] > 0.0 && *mass_above + mass[bkt] >= P) : (*count_above + count[bkt] >= k)) return bkt;
    *count_above += count[bkt];
    *mass_above += mass[bkt];
  }
  return -1;
}

// The exact threshold over candidates (cz, cw)[0, n), which hold every token that can be kept:
//   by_mass == false: the k-th largest z (-inf if n < k);
//   by_mass == true : the smallest z value v with mass{z > v} < P (mass = sum of w);
//                     -inf if the candidates' whole mass stays below P (everything kept).
float select_threshold(const float* cz, const float* cw, int64_t n, bool by_mass, int64_t k, double P,
                       FinishScratch& fs) {
  int64_t count_above = 0;
  double mass_above = 0.0;
  // Level 1 over all candidates, with interleaved histogram copies merged in a fixed order.
  double* hm = fs.hist_mass.data();
  int32_t* hc = fs.hist_count.data();
  std::fill(hm, hm + kBuckets1 * kHistCopies, 0.0);
  std::fill(hc, hc + kBuckets1 * kHistCopies, 0);
  // One statistic per mode: by mass a bucket reaching P has a positive mass, hence elements.
  if (by_mass) {
    for (int64_t j = 0; j < n; ++j)
      hm[static_cast<int>(j & (kHistCopies - 1)) * kBuckets1 + static_cast<int>(float_to_bits(cw[j]) >> 21)] += cw[j];
  } else {
    for (int64_t j = 0; j < n; ++j)
      hc[static_cast<int>(j & (kHistCopies - 1)) * kBuckets1 + static_cast<int>(float_to_bits(cw[j]) >> 21)] += 1;
  }
  for (int bkt = 0; bkt < kBuckets1; ++bkt) {
    hc[bkt] = (hc[bkt] + hc[kBuckets1 + bkt]) + (hc[2 * kBuckets1 + bkt] + hc[3 * kBuckets1 + bkt]);
    hm[bkt] = (hm[bkt] + hm[kBuckets1 + bkt]) + (hm[2 * kBuckets1 + bkt] + hm[3 * kBuckets1 + bkt]);
  }
  const int b1 = find_boundary(hc, hm, kBuckets1, by_mass, k, P, &count_above, &mass_above);
  if (b1 < 0) return -kInf;
  float* ez = fs.ez.data();
  float* ew = fs.ew.data();
  int64_t ne = 0;
  int64_t j = 0;
#ifdef IPA_FAST_AVX2
  const __m256i vb1 = _mm256_set1_epi32(b1);
  for (; j + 8 <= n; j += 8) {  // left-pack the boundary bucket's elements
    const __m256 wj = _mm256_loadu_ps(cw + j);
    const __m256i d = _mm256_srli_epi32(_mm256_castps_si256(wj), 21);
    const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(d, vb1))));
    if (!bits) continue;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[bits]));
    _mm256_storeu_ps(ez + ne, _mm256_permutevar8x32_ps(_mm256_loadu_ps(cz + j), perm));
    _mm256_storeu_ps(ew + ne, _mm256_permutevar8x32_ps(wj, perm));
    ne += __builtin_popcount(bits);
  }
#endif
  for (; j < n; ++j) {  // branch-free: write always, advance on a match
    ez[ne] = cz[j];
    ew[ne] = cw[j];
    ne += static_cast<int>(float_to_bits(cw[j]) >> 21) == b1;
  }
  // Levels 2 and 3 refine w's remaining bits inside the boundary bucket.
  for (int level = 2; level <= 3; ++level) {
    const int shift = level == 2 ? 10 : 0, nb = level == 2 ? kBuckets2 : kBuckets3;
    const uint32_t mask = static_cast<uint32_t>(nb - 1);
    std::vector<int32_t> cnt(nb, 0);
    std::vector<double> mass(nb, 0.0);
    for (int64_t e = 0; e < ne; ++e) {
      const int d = static_cast<int>((float_to_bits(ew[e]) >> shift) & mask);
      cnt[d] += 1;
      mass[d] += ew[e];
    }
    const int d = find_boundary(cnt.data(), mass.data(), nb, by_mass, k, P, &count_above, &mass_above);
    if (d < 0) {  // rounding (mass summed in another order): the whole bucket is kept
      float lo = kInf;
      for (int64_t e = 0; e < ne; ++e) lo = std::min(lo, ez[e]);
      return lo;
    }
    int64_t kept = 0;
    for (int64_t e = 0; e < ne; ++e)
      if (static_cast<int>((float_to_bits(ew[e]) >> shift) & mask) == d) {
        ez[kept] = ez[e];
        ew[kept++] = ew[e];
      }
    ne = kept;
  }
  // Every survivor has the same w; distinct z may still share it: order them by z.
  std::sort(ez, ez + ne, std::greater<float>());
  float tau = ne > 0 ? ez[ne - 1] : -kInf;
  const double wv = ne > 0 ? static_cast<double>(ew[0]) : 0.0;
  for (int64_t g = 0; g < ne;) {  // groups of equal z, descending
    int64_t h = g;
    while (h < ne && ez[h] == ez[g]) ++h;
    if (by_mass) {
      if (!(mass_above < P)) break;
      tau = ez[g];
      mass_above += wv * static_cast<double>(h - g);
    } else {
      count_above += h - g;
      if (count_above >= k) return ez[g];
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
  double* cs = thread_finish_scratch().sums.data();  // >= V/64 + 2 >= nchunks entries
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
  double* bs = thread_finish_scratch().sums.data();  // >= V/64 + 2 >= nblocks entries
  double total = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t j0 = blk * kSub, j1 = std::min(n, j0 + kSub);
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      a0 += w[K[j]];
      a1 += w[K[j + 1]];
      a2 += w[K[j + 2]];
      a3 += w[K[j + 3]];
    }
    for (; j < j1; ++j) a0 += w[K[j]];
    bs[blk] = (a0 + a1) + (a2 + a3);
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
      int32_t* J = fs.list.data();
      float* cz = fs.cz.data();
      float* cw = fs.cw.data();
      n = -1;
      if (!k_on && p_on) {
        // Usually much tighter: a bound L guessed from a subsample, kept only if the tokens with
        // w >= L verifiably hold mass >= P (then every token below L has mass >= P above it).
        const double P = static_cast<double>(p.top_p) * total;
        const float guess = guess_nucleus_bound(rb.w.data(), V, static_cast<double>(p.top_p));
        if (guess > w_low) {
          n = collect(rb, V, z_low, guess, J, cz, cw);
          if (!(sum4(cw, n) >= P * (1.0 + 1e-6))) n = -1;  // fall back to the safe bound
        }
      }
      if (n < 0) n = collect(rb, V, z_low, w_low, J, cz, cw);
      if (k_on) {
        tau = select_threshold(cz, cw, n, false, p.top_k, 0.0, fs);
        if (p_on) {
          int64_t n1 = 0;  // the top-k survivors, still ascending
          for (int64_t j = 0; j < n; ++j)
            if (cz[j] >= tau) {
              J[n1] = J[j];
              cz[n1] = cz[j];
              cw[n1++] = cw[j];
            }
          n = n1;
          const double total_k = sum4(cw, n);
          tau = std::max(tau, select_threshold(cz, cw, n, true, 0, static_cast<double>(p.top_p) * total_k, fs));
        }
      } else if (p_on) {
        tau = select_threshold(cz, cw, n, true, 0, static_cast<double>(p.top_p) * total, fs);
      }
    }
    double kept_total = 0.0;
    if (n < 0 || n > V / 8) {
      token = draw_full_row(rb, V, tau, w_min, u, &kept_total);
    } else {
      const int32_t* J = fs.list.data();
      const float* cz = fs.cz.data();
      const float* cw = fs.cw.data();
      int32_t* K = fs.list2.data();
      int64_t nk = 0;
      for (int64_t j = 0; j < n; ++j) {  // branch-free: write always, advance when kept
        K[nk] = J[j];
        nk += (cz[j] >= tau) & (cw[j] >= w_min);
      }
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
