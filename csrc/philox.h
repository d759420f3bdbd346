// Philox-4x32-10 (Salmon et al. 2011) and the sampler's per-row uniform. Shared by the C++ CPU
// and CUDA kernels; no torch headers. See ipa_fast/rng.py for the stream's definition.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define IPA_HD __host__ __device__ __forceinline__
#else
#define IPA_HD inline
#endif

namespace ipa_fast {

struct Philox4 {
  uint32_t x[4];
};

IPA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

IPA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, &hi0, &lo0);
    mulhilo32(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// u in (0, 1): ((x0 << 21 | x1 >> 11) + 0.5) * 2^-53 with key = seed, counter = (offset, 0, 0).
IPA_HD double philox_uniform(uint64_t seed, uint64_t offset) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits53 = (static_cast<uint64_t>(r.x[0]) << 21) | (r.x[1] >> 11);
  return (static_cast<double>(bits53) + 0.5) * 0x1.0p-53;
}

}  // namespace ipa_fast
