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
//
// Two builds of the row code (csrc/cpu/sampler_impl.inc, included twice below): a portable
// scalar one, and on x86-64 with GCC / Clang an AVX2 + FMA + F16C one compiled through function
// target attributes, so a portable build carries both and picks one at load from the CPU's
// features (set_isa overrides it). Both perform the same IEEE operations in the same order (the
// scalar sums keep the vector lanes' shape), so they give the same tokens and log-probs.
#include "cpu/sampler.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "philox.h"

// The AVX2 build needs GCC / Clang function targets on x86; elsewhere only the scalar one exists.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define IPA_FAST_HAVE_AVX2 1
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

// Exact for every half (the vector path's F16C conversion gives the same floats).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float mag = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
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
  p.ok = params_ok(p.temperature, p.top_k, p.top_p, p.min_p);  // csrc/rules.h; NaN fails
  p.greedy = is_greedy(p.temperature);
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
static_assert(kBuckets1 * kHistCopies >= kBuckets2 && kBuckets2 >= kBuckets3,
              "levels 2 and 3 reuse level 1's histogram");

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


size_t dtype_size(int dt) { return dt == kFloat32 ? 4 : 2; }

float expert_weight(const SamplerArgs& args, int64_t row, int k) {
  if (args.unit_first && k == 0) return 1.0f;
  return args.weights[row * args.weight_stride + k - args.unit_first];
}

#ifdef IPA_FAST_HAVE_AVX2
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

// A vector loop's eight sums, kept by the scalar build: lane j adds the elements i = j mod 8 of
// the 8-wide groups in order; the lanes merge as the vector code does, first lane j with lane
// j + 4 (the two 128-bit halves), then ((0 + 1) + (2 + 3)).
template <typename T>
struct Lanes8 {
  T l[8] = {};
  void add(const float* x) {
    for (int j = 0; j < 8; ++j) l[j] += x[j];
  }
  T total() const { return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])); }
};

void write_invalid(const SamplerArgs& args, int64_t row) {
  args.tokens[row] = kInvalidToken;
  args.logprobs[row] = static_cast<float>(kNaN);
  args.filtered_logprobs[row] = static_cast<float>(kNaN);
  args.valid[row] = false;
}

// ------------------------------------------------------------------------------------------
// The two builds of the row code, and the choice between them.

#define IPA_FAST_ISA scalar
#define IPA_FAST_TARGET
#include "cpu/sampler_impl.inc"
#undef IPA_FAST_TARGET
#undef IPA_FAST_ISA

#ifdef IPA_FAST_HAVE_AVX2
#define IPA_FAST_ISA avx2
#define IPA_FAST_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))
#define IPA_FAST_AVX2 1
#include "cpu/sampler_impl.inc"
#undef IPA_FAST_AVX2
#undef IPA_FAST_TARGET
#undef IPA_FAST_ISA
#endif

enum Isa : int { kScalar = 0, kAvx2 = 1 };

// AVX2, FMA and F16C (and POPCNT, which every AVX2 CPU has), with the OS saving the YMM
// registers (__builtin_cpu_supports("avx2") checks that).
bool cpu_runs_avx2() {
#ifdef IPA_FAST_HAVE_AVX2
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

const bool kCpuRunsAvx2 = cpu_runs_avx2();
std::atomic<int> g_isa{kCpuRunsAvx2 ? kAvx2 : kScalar};

}  // namespace

float exp_nonpositive(float x) { return exp_scalar(x); }

void sample(const SamplerArgs& args, int num_threads) {
#ifdef IPA_FAST_HAVE_AVX2
  if (g_isa.load(std::memory_order_relaxed) == kAvx2) return avx2::sample(args, num_threads);
#endif
  scalar::sample(args, num_threads);
}

double read_pass(const void* base, int base_dtype, const void* adapter, int adapter_dtype, int64_t batch,
                 int64_t vocab, int num_threads) {
#ifdef IPA_FAST_HAVE_AVX2
  if (g_isa.load(std::memory_order_relaxed) == kAvx2)
    return avx2::read_pass(base, base_dtype, adapter, adapter_dtype, batch, vocab, num_threads);
#endif
  return scalar::read_pass(base, base_dtype, adapter, adapter_dtype, batch, vocab, num_threads);
}

std::vector<std::string> isas() {
  std::vector<std::string> out{"scalar"};
  if (kCpuRunsAvx2) out.emplace_back("avx2");
  return out;
}

std::string isa() { return g_isa.load(std::memory_order_relaxed) == kAvx2 ? "avx2" : "scalar"; }

bool set_isa(const std::string& name) {
  if (name == "scalar") {
    g_isa.store(kScalar, std::memory_order_relaxed);
    return true;
  }
  if (name == "avx2" && kCpuRunsAvx2) {
    g_isa.store(kAvx2, std::memory_order_relaxed);
    return true;
  }
  return false;
}

}  // namespace cpu
}  // namespace ipa_fast
