// Fused Distribution Focal Loss rows on the CPU, compiled once per SIMD level: each row
// is read once, for its max, its sum of exponentials and its target bins' logits, from
// which its loss and (when asked) its gradient follow; rows of weight 0 skip all of it but
// a finiteness check. Threads and the deterministic chunk sums live in dfl_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace stable_dfl {
// SIMD overloads of the math helpers, declared before dfl_row.h's templates use them: ATen's
// vector operations for any type, then the float overloads each level replaces them with.
template <typename T>
using SimdVec = at::vec::Vectorized<T>;
template <typename T>
inline SimdVec<T> math_log(const SimdVec<T>& x) {
  return x.log();
}
template <typename T>
inline SimdVec<T> math_floor(const SimdVec<T>& x) {
  return x.floor();
}
template <typename T>
inline SimdVec<T> math_max(const SimdVec<T>& a, const SimdVec<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline SimdVec<T> math_min(const SimdVec<T>& a, const SimdVec<T>& b) {
  return at::vec::minimum(a, b);
}
template <typename T>
inline SimdVec<T> math_neg(const SimdVec<T>& x) {
  return x.neg();
}
template <typename T>
inline SimdVec<T> keep_if_ge(const SimdVec<T>& a, const SimdVec<T>& b, const SimdVec<T>& value) {
  return value & (a >= b);
}
template <typename T>
inline SimdVec<T> keep_if_gt(const SimdVec<T>& a, const SimdVec<T>& b, const SimdVec<T>& value) {
  return value & (a > b);
}

// max(a, b) for the row max: unlike at::vec::maximum it need not carry a NaN, since a NaN or
// infinite logit makes its row NaN through the poison term anyway.
template <typename T>
inline SimdVec<T> max_of_finite(const SimdVec<T>& a, const SimdVec<T>& b) {
  return at::vec::maximum(a, b);
}

// a - b where lane == target, a elsewhere: the target bins' terms of the gradient.
template <typename T>
inline SimdVec<T> minus_where_equal(const SimdVec<T>& a, const SimdVec<T>& lane,
                                    const SimdVec<T>& target, const SimdVec<T>& b) {
  return a - (b & (lane == target));
}

// e^x for x <= 0 (a logit minus its row max). The float overloads compute e^x = p 2^n with
// x = n ln 2 + r, |r| <= ln 2 / 2, and p ~ e^r by exp_u20's polynomial (~1e-6 relative error,
// exact at 0). n is rounded by adding the shifter 1.5 * 2^23, whose float has an ulp of 1: the
// sum's low mantissa bits are then n (two's complement), and shifted into the exponent field
// and added to p's bits as integers they scale p by 2^n exactly, with no float-to-int
// conversion and no multiply (p is in [0.7, 1.42], so p 2^n stays normal for n >= -125).
// Every level gives 0 where 2^n would leave the normal range (x below about -87, -inf and NaN
// included), so no subnormal reaches the gradient math (which some CPUs run a hundred times
// slower); a NaN x comes only from a non-finite row, which the poison term makes NaN.
template <typename T>
inline SimdVec<T> exp_nonpositive(const SimdVec<T>& x) {
  return x.exp_u20();
}
constexpr float kExpShifter = 12582912.0f;  // 1.5 * 2^23
constexpr float kLog2e = 1.44269504f;
constexpr float kExpPoly[6] = {0.00828929059f, 0.0418978221f, 0.166676521f,
                               0.499991506f,   0.999999701f,  1.0f};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Raw registers rather than Vectorized members, which the compiler kept storing to the stack.
#if defined(CPU_CAPABILITY_AVX512)
using FloatRegister = __m512;
#else
using FloatRegister = __m256;
#endif
struct ExpReduced {
  FloatRegister shifted;  // n + kExpShifter, whose low bits hold n
  FloatRegister n;
  FloatRegister p;
};
// With FMA the reduction r = x - n ln 2 is one rounding away from exact: one constant for ln 2.
inline ExpReduced exp_reduce(const SimdVec<float>& x) {
  using Vec = SimdVec<float>;
  const Vec shifted = at::vec::fmadd(x, Vec(kLog2e), Vec(kExpShifter));
  const Vec n = shifted - Vec(kExpShifter);
  const Vec r = at::vec::fmadd(n, Vec(-0.693147182f), x);
  Vec p = at::vec::fmadd(r, Vec(kExpPoly[0]), Vec(kExpPoly[1]));
  for (int k = 2; k < 6; ++k) p = at::vec::fmadd(r, p, Vec(kExpPoly[k]));
  return {shifted, n, p};
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline SimdVec<float> max_of_finite(const SimdVec<float>& a, const SimdVec<float>& b) {
  return _mm512_max_ps(a, b);
}
// One compare into a mask register and one masked subtraction, instead of materialising the
// compare as a vector to AND with.
inline SimdVec<float> minus_where_equal(const SimdVec<float>& a, const SimdVec<float>& lane,
                                        const SimdVec<float>& target, const SimdVec<float>& b) {
  return _mm512_mask_sub_ps(a, _mm512_cmp_ps_mask(lane, target, _CMP_EQ_OQ), a, b);
}
// 2^n applied by one masked vscalefps.
inline SimdVec<float> exp_nonpositive(const SimdVec<float>& x) {
  const ExpReduced e = exp_reduce(x);
  const __mmask16 normal = _mm512_cmp_ps_mask(e.n, _mm512_set1_ps(-126.0f), _CMP_GT_OQ);
  return _mm512_maskz_scalef_ps(normal, e.p, e.n);
}

#elif defined(CPU_CAPABILITY_AVX2)
inline SimdVec<float> max_of_finite(const SimdVec<float>& a, const SimdVec<float>& b) {
  return _mm256_max_ps(a, b);
}
inline SimdVec<float> exp_nonpositive(const SimdVec<float>& x) {
  const ExpReduced e = exp_reduce(x);
  const __m256i n_in_exponent = _mm256_slli_epi32(_mm256_castps_si256(e.shifted), 23);
  const __m256 scaled =
      _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e.p), n_in_exponent));
  const __m256 normal = _mm256_cmp_ps(e.n, _mm256_set1_ps(-126.0f), _CMP_GT_OQ);
  return _mm256_and_ps(scaled, normal);
}

#else
// Below AVX2 ATen's generic vector computes its exp by calling libm lane by lane, and on x86-64
// (SSE2 is part of it) its compares, max, min and floor are scalar code too (a NaN test and a
// memset per lane): there, those helpers are SSE2 instructions on each half of the 8 lanes, and
// the exps of a block are SSE2 code of their own (sum_of_exps, below). Elsewhere ATen's own
// vectors (NEON on ARM) serve the helpers, and exp is a lane loop the compiler vectorises for
// whatever SIMD the target has (log is one on every level, below).

#if defined(__SSE2__)
// op applied to each SSE register's worth (4 lanes) of the vectors.
template <typename Op, typename... Vecs>
inline SimdVec<float> by_sse_halves(Op op, const Vecs&... vectors) {
  constexpr int kSseLanes = 4;
  static_assert(SimdVec<float>::size() % kSseLanes == 0, "whole SSE registers");
  SimdVec<float> out;
  for (int h = 0; h < SimdVec<float>::size(); h += kSseLanes) {
    _mm_storeu_ps(static_cast<float*>(out) + h,
                  op(_mm_loadu_ps(static_cast<const float*>(vectors) + h)...));
  }
  return out;
}

// maxps and minps return their second operand where either is NaN; a NaN target, the only
// NaN these see, makes its row NaN through the poison term whatever they return.
inline SimdVec<float> math_max(const SimdVec<float>& a, const SimdVec<float>& b) {
  return by_sse_halves([](__m128 x, __m128 y) { return _mm_max_ps(x, y); }, a, b);
}
inline SimdVec<float> max_of_finite(const SimdVec<float>& a, const SimdVec<float>& b) {
  return math_max(a, b);
}
inline SimdVec<float> math_min(const SimdVec<float>& a, const SimdVec<float>& b) {
  return by_sse_halves([](__m128 x, __m128 y) { return _mm_min_ps(x, y); }, a, b);
}
// floor without SSE4.1's roundps: truncation to int32, minus 1 where that rounded up. x with
// |x| >= 2^23 (an integer already) and NaN are returned as they are; -0 becomes +0, which the
// two-hot weights (the only use) cannot tell apart.
inline SimdVec<float> math_floor(const SimdVec<float>& x) {
  return by_sse_halves(
      [](__m128 v) {
        const __m128 truncated = _mm_cvtepi32_ps(_mm_cvttps_epi32(v));
        const __m128 floored =
            _mm_sub_ps(truncated, _mm_and_ps(_mm_cmpgt_ps(truncated, v), _mm_set1_ps(1.0f)));
        const __m128 magnitude = _mm_andnot_ps(_mm_set1_ps(-0.0f), v);
        const __m128 as_is = _mm_cmpnlt_ps(magnitude, _mm_set1_ps(8388608.0f));  // or NaN
        return _mm_or_ps(_mm_and_ps(as_is, v), _mm_andnot_ps(as_is, floored));
      },
      x);
}
inline SimdVec<float> keep_if_ge(const SimdVec<float>& a, const SimdVec<float>& b,
                                 const SimdVec<float>& value) {
  return by_sse_halves(
      [](__m128 x, __m128 y, __m128 v) { return _mm_and_ps(v, _mm_cmpge_ps(x, y)); }, a, b, value);
}
inline SimdVec<float> keep_if_gt(const SimdVec<float>& a, const SimdVec<float>& b,
                                 const SimdVec<float>& value) {
  return by_sse_halves(
      [](__m128 x, __m128 y, __m128 v) { return _mm_and_ps(v, _mm_cmpgt_ps(x, y)); }, a, b, value);
}
inline SimdVec<float> minus_where_equal(const SimdVec<float>& a, const SimdVec<float>& lane,
                                        const SimdVec<float>& target, const SimdVec<float>& b) {
  return by_sse_halves([](__m128 x, __m128 l, __m128 t,
                          __m128 y) { return _mm_sub_ps(x, _mm_and_ps(y, _mm_cmpeq_ps(l, t))); },
                       a, lane, target, b);
}
#else
// value where keep, else 0, as a bit mask: the compiler would not vectorise a ?: of floats (it
// may not evaluate or compare floats speculatively).
inline float lane_where(bool keep, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= keep ? 0xffffffffu : 0u;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

// Without FMA, ln 2 is split in two (Cody-Waite): the product by its high part is exact, so
// the reduction loses no accuracy.
inline SimdVec<float> exp_nonpositive(const SimdVec<float>& x) {
  constexpr int kLanes = SimdVec<float>::size();
  alignas(64) float in[kLanes];
  alignas(64) float out[kLanes];
  x.store(in);
  for (int i = 0; i < kLanes; ++i) {
    const float shifted = in[i] * kLog2e + kExpShifter;
    const float n = shifted - kExpShifter;
    const float r = (in[i] - n * 0.693145751953125f) - n * 1.42860682e-6f;
    float p = r * kExpPoly[0] + kExpPoly[1];
    for (int k = 2; k < 6; ++k) p = r * p + kExpPoly[k];
    uint32_t shifted_bits;
    uint32_t p_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
    std::memcpy(&p_bits, &p, sizeof(p_bits));
    p_bits += shifted_bits << 23;
    float scaled;
    std::memcpy(&scaled, &p_bits, sizeof(scaled));
    out[i] = lane_where(n > -126.0f, scaled);
  }
  return SimdVec<float>::loadu(out);
}
#endif  // __SSE2__
#endif

// For the one log a row takes, of its sum of exps: a normal number in [1, n_bins], or NaN.
// Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by a degree-9 polynomial
// in f = m - 1; under 1 ulp on [1, 128]. A lane loop the compiler vectorises for the level's
// SIMD, inlined: ATen's log is a call into Sleef on AVX2/AVX-512 (around which the block's live
// registers are spilled) and libm lane by lane below them.
inline SimdVec<float> math_log(const SimdVec<float>& x) {
  constexpr int kLanes = SimdVec<float>::size();
  constexpr float kLogPoly[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                 -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                 2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
  alignas(64) float in[kLanes];
  alignas(64) float out[kLanes];
  x.store(in);
  for (int i = 0; i < kLanes; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &in[i], sizeof(bits));
    const uint32_t mantissa_bits = (bits & 0x007fffffu) | 0x3f000000u;  // m in [0.5, 1)
    float m;
    std::memcpy(&m, &mantissa_bits, sizeof(m));
    // Integer and multiply selections rather than ?:, as in lane_where.
    const int32_t below_sqrt_half = m < 0.707106781f;
    const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126 - below_sqrt_half);
    const float f = (m - 1.0f) + m * static_cast<float>(below_sqrt_half);
    // The polynomial by Estrin's scheme (pairs, then powers f^2, f^4, f^8): about a third of
    // Horner's chain of 8 dependent multiply-adds, which no other work of the row can hide.
    const float z = f * f;
    const float z2 = z * z;
    const float low = (kLogPoly[5] * f + kLogPoly[6]) * z + (kLogPoly[7] * f + kLogPoly[8]);
    const float high = (kLogPoly[1] * f + kLogPoly[2]) * z + (kLogPoly[3] * f + kLogPoly[4]);
    float y = (kLogPoly[0] * z2 + high) * z2 + low;
    y = y * f * z + e * -2.12194440e-4f - 0.5f * z;
    out[i] = (f + y + e * 0.693359375f) + (in[i] - in[i]);  // + (x - x): NaN stays NaN
  }
  return SimdVec<float>::loadu(out);
}

// The sum over a block's bins of e^(x - max), each kept in place of its logit when keep_exp
// (for the gradient), plus the poison term sum_j x_j * 0: NaN for a NaN or infinite logit. The
// exp is exact at 0, so a finite row's sum is >= 1. Two sum chains, of the even and the odd
// bins, so that an add need not wait for the one before it.
template <typename T>
SimdVec<T> sum_of_exps(T* cols, const SimdVec<T>& max, int n_bins, bool keep_exp) {
  using Vec = SimdVec<T>;
  constexpr int kLanes = Vec::size();
  const Vec zero(T(0));
  Vec sum_even = zero;
  Vec sum_odd = zero;
  Vec poison = zero;
  const auto exp_of_bin = [&](int bin) {
    const Vec x = Vec::loadu(cols + bin * kLanes);
    poison = at::vec::fmadd(x, zero, poison);
    const Vec e = exp_nonpositive(x - max);
    if (keep_exp) e.store(cols + bin * kLanes);
    return e;
  };
  int j = 0;
  for (; j + 2 <= n_bins; j += 2) {
    sum_even = sum_even + exp_of_bin(j);
    sum_odd = sum_odd + exp_of_bin(j + 1);
  }
  if (j < n_bins) sum_even = sum_even + exp_of_bin(j);
  return (sum_even + sum_odd) + poison;
}

#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512) && defined(__SSE2__)
// 2^f for |f| <= 1/2, minimax for relative error (under 1e-7; exact at 0).
constexpr float kExp2Poly[6] = {1.32647273e-3f, 9.67151299e-3f, 5.55073358e-2f,
                                2.40222424e-1f, 6.93147004e-1f, 1.0f};

// Ends a step of the exps: the compiler keeps each register's value here, where it would
// otherwise fold a chain of single-use values into one expression and emit it at its use, one
// register's chain after another.
#if defined(__GNUC__)
#define SDFL_KEEP_STEP(value) __asm__("" : "+x"(value))
#else
#define SDFL_KEEP_STEP(value) (void)0
#endif

// The exps of kRegisters SSE registers of a block (two registers of 4 rows each per bin),
// added to their half's sum. SSE2 has no FMA and two-operand instructions (a copy for each
// value used twice), and its exps are bound by the count of instructions, so they take the
// fewest: e^d = 2^t with t = d log2(e) = n + f, n = round(t), f = t - n, takes 4 operations to
// f where the two-constant Cody-Waite reduction (the lane loop's, without FMA) takes 7. Rounding
// t costs 2^f a relative error of |t| 2^-24 (1e-6 at d = -20), at most 1e-7 relative to the
// row's largest exp and so to the sum (>= 1). The poison term is ORed in rather than added, off
// the adders. Each step is taken for every register before the next, so that the CPU always
// has independent operations at hand: in all, 1.4x as fast as a lane loop's exps, chain after
// chain.
template <int kRegisters>
C10_ALWAYS_INLINE void sse_exps(float* x_at, const __m128 (&max)[2], bool keep_exp,
                                __m128 (&sum)[2], __m128 (&poison)[2]) {
  const __m128 shifter = _mm_set1_ps(kExpShifter);
  __m128 t[kRegisters];
  __m128 shifted[kRegisters];
  __m128 p[kRegisters];
#pragma GCC unroll 8
  for (int k = 0; k < kRegisters; ++k) {
    const __m128 x = _mm_loadu_ps(x_at + 4 * k);
    // x * 0 is +-0 for a finite x, NaN for a NaN or infinite one.
    poison[k % 2] = _mm_or_ps(_mm_mul_ps(x, _mm_setzero_ps()), poison[k % 2]);
    t[k] = _mm_sub_ps(x, max[k % 2]);
    SDFL_KEEP_STEP(t[k]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRegisters; ++k) {
    t[k] = _mm_mul_ps(t[k], _mm_set1_ps(kLog2e));
    SDFL_KEEP_STEP(t[k]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRegisters; ++k) {
    shifted[k] = _mm_add_ps(t[k], shifter);
    SDFL_KEEP_STEP(shifted[k]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRegisters; ++k) {
    t[k] = _mm_sub_ps(t[k], _mm_sub_ps(shifted[k], shifter));  // f = t - n
    p[k] = _mm_add_ps(_mm_mul_ps(t[k], _mm_set1_ps(kExp2Poly[0])), _mm_set1_ps(kExp2Poly[1]));
    SDFL_KEEP_STEP(p[k]);
  }
#pragma GCC unroll 4
  for (int c = 2; c < 6; ++c) {
#pragma GCC unroll 8
    for (int k = 0; k < kRegisters; ++k) {
      p[k] = _mm_add_ps(_mm_mul_ps(p[k], t[k]), _mm_set1_ps(kExp2Poly[c]));
      SDFL_KEEP_STEP(p[k]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRegisters; ++k) {
    // 2^n by adding n to p's exponent bits; 0 where 2^n would leave the normal range (n <=
    // -126, that is shifted <= shifter - 126).
    const __m128i scaled =
        _mm_add_epi32(_mm_castps_si128(p[k]), _mm_slli_epi32(_mm_castps_si128(shifted[k]), 23));
    const __m128 normal = _mm_cmpgt_ps(shifted[k], _mm_set1_ps(kExpShifter - 126.0f));
    const __m128 e = _mm_and_ps(_mm_castsi128_ps(scaled), normal);
    if (keep_exp) _mm_storeu_ps(x_at + 4 * k, e);
    sum[k % 2] = _mm_add_ps(sum[k % 2], e);
  }
}
#undef SDFL_KEEP_STEP

// Below AVX2 on x86-64, the block's 8 lanes are two SSE registers per bin, taken two bins (4
// registers, as many as stay in the 16 SSE registers) at a time.
inline SimdVec<float> sum_of_exps(float* cols, const SimdVec<float>& max, int n_bins,
                                  bool keep_exp) {
  static_assert(SimdVec<float>::size() == 8, "two SSE registers per bin");
  const __m128 max_halves[2] = {_mm_loadu_ps(static_cast<const float*>(max)),
                                _mm_loadu_ps(static_cast<const float*>(max) + 4)};
  __m128 sum[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
  __m128 poison[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
  int j = 0;
  for (; j + 2 <= n_bins; j += 2) sse_exps<4>(cols + j * 8, max_halves, keep_exp, sum, poison);
  if (j < n_bins) sse_exps<2>(cols + j * 8, max_halves, keep_exp, sum, poison);
  SimdVec<float> total;
  for (int h = 0; h < 2; ++h)
    _mm_storeu_ps(static_cast<float*>(total) + 4 * h, _mm_add_ps(sum[h], poison[h]));
  return total;
}
#endif

}  // namespace stable_dfl

#include "../dfl_row.h"

namespace stable_dfl::cpu {
namespace {

// Below AVX2 the vector helpers are lane loops, which the compiler may keep out of line, each
// call then sending its vectors through memory (50% slower as measured): the kernel passes
// inline every call, however large. Above, the intrinsics inline as they are.
#if defined(__GNUC__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define SDFL_FLATTEN __attribute__((flatten))
#else
#define SDFL_FLATTEN
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The 16 x 16 fp32 transpose of ATen's transpose_block (32-bit and 64-bit unpacks, then two
// rounds of 128-bit lane shuffles), forced inline on registers: where the compiler leaves
// ATen's as a call, the block goes through memory, copied twice.
C10_ALWAYS_INLINE void transpose_16x16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto unpack_pairs = [](__m512 a, __m512 b, bool high) {
    const __m512d a_pairs = _mm512_castps_pd(a);
    const __m512d b_pairs = _mm512_castps_pd(b);
    return _mm512_castpd_ps(high ? _mm512_unpackhi_pd(a_pairs, b_pairs)
                                 : _mm512_unpacklo_pd(a_pairs, b_pairs));
  };
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 4) {
    r[i] = unpack_pairs(t[i], t[i + 2], false);
    r[i + 1] = unpack_pairs(t[i], t[i + 2], true);
    r[i + 2] = unpack_pairs(t[i + 1], t[i + 3], false);
    r[i + 3] = unpack_pairs(t[i + 1], t[i + 3], true);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 8) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// The 8 x 8 fp32 transpose in registers: 32-bit unpacks, 64-bit shuffles, 128-bit lane swaps.
C10_ALWAYS_INLINE void transpose_8x8(__m256 (&r)[8]) {
  __m256 t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n. ATen's transpose of a run-time
// size is SIMD on AVX-512 only; fp32 tiles of whole SIMD blocks (a full block of 16 bins) take
// ATen's fixed-size 8 x 8 SIMD transpose on AVX2 and SSE's 4 x 4 one below it (SSE2 is part of
// x86-64) instead of the scalar loop.
template <typename T>
inline void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int m, int n) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (m % 8 == 0 && n % 8 == 0) {
      for (int i = 0; i < m; i += 8) {
        for (int j = 0; j < n; j += 8) {
          at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i,
                                              ld_dst);
        }
      }
      return;
    }
  }
#elif defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (m == 16 && n == 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
      transpose_16x16(r);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * ld_dst, r[j]);
      return;
    }
  }
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (m % 4 == 0 && n % 4 == 0) {
      for (int i = 0; i < m; i += 4) {
        for (int j = 0; j < n; j += 4) {
          __m128 r0 = _mm_loadu_ps(src + (i + 0) * ld_src + j);
          __m128 r1 = _mm_loadu_ps(src + (i + 1) * ld_src + j);
          __m128 r2 = _mm_loadu_ps(src + (i + 2) * ld_src + j);
          __m128 r3 = _mm_loadu_ps(src + (i + 3) * ld_src + j);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(dst + (j + 0) * ld_dst + i, r0);
          _mm_storeu_ps(dst + (j + 1) * ld_dst + i, r1);
          _mm_storeu_ps(dst + (j + 2) * ld_dst + i, r2);
          _mm_storeu_ps(dst + (j + 3) * ld_dst + i, r3);
        }
      }
      return;
    }
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, m, n);
}

// Rows are processed in blocks of one SIMD vector's width, transposed so that
// each lane holds one row: the max, exp, sum and the per-row scalar math of
// dfl_row.h all run vertically, with no horizontal reductions.
// A call takes a batch of up to batch_rows() rows in three passes: the reductions of every
// block (max, sum of exps, target logits), then the per-row tail of every block (log, loss,
// gradient terms), then, when asked, the gradients. The tail is a chain of dependent
// operations (the log's polynomial above all); run block after block in a short loop, the
// chains of several blocks overlap, where after each block's reductions they would not.
// kBins > 0 fixes the bin count at compile time (the common 16), so that the loops over bins
// unroll and their accumulators stay in registers; kBins == 0 takes it at run time.
template <typename scalar_t, typename acc_t, int kBins>
struct BlockKernel {
  using Vec = at::vec::Vectorized<acc_t>;
  using Index = at::vec::int_same_size_t<acc_t>;
  using IndexVec = at::vec::Vectorized<Index>;
  static constexpr int kLanes = Vec::size();
  static_assert(IndexVec::size() == kLanes, "one gather index per lane");
  // A batch is up to two blocks, as many as the staged values of one block of the widest rows
  // hold. More crowd the rows being read out of L1: four measured no faster, sixteen slower
  // than one.
  static constexpr int kStagedValues = kMaxBins * kLanes;
  static constexpr int kMaxBlocks = 2;
  static constexpr int kMaxRows = kMaxBlocks * kLanes;

  const int dynamic_bins;
  const int blocks_per_batch;
  const Vec log_eps;
  const Vec upper_limit;
  // staged[b * n_bins * kLanes + j * kLanes + i]: bin j of row i of the batch's block b
  // (logits, then exps, then gradient).
  alignas(64) acc_t staged[kStagedValues];
  // Per row of the batch: its max logit, its sum of exps (NaN for a non-finite row), the
  // logits of its two target bins, and the terms of its gradient (dfl_row.h's RowResult).
  alignas(64) acc_t row_max[kMaxRows];
  alignas(64) acc_t sum_exp[kMaxRows];
  alignas(64) acc_t x_left[kMaxRows];
  alignas(64) acc_t x_right[kMaxRows];
  alignas(64) acc_t bin_left[kMaxRows];
  alignas(64) acc_t grad_scale[kMaxRows];
  alignas(64) acc_t grad_left[kMaxRows];
  alignas(64) acc_t grad_right[kMaxRows];
  alignas(64) acc_t lanes[kLanes];
  // Row-major [kLanes, n_bins] staging tile for fp16/bf16 rows widened to acc_t.
  alignas(64) acc_t tile[kMaxBins * kLanes];

  // Element offset of each lane's row in a block of kLanes rows.
  const IndexVec full_row_starts;

  BlockKernel(int n_bins, acc_t log_eps_)
      : dynamic_bins(n_bins),
        blocks_per_batch(std::min(kMaxBlocks, kStagedValues / (n_bins * kLanes))),
        log_eps(log_eps_),
        upper_limit(target_upper_limit<acc_t>(n_bins)),
        full_row_starts(partial_row_starts(kLanes, n_bins)) {}

  // Row offsets of a block of `count` rows; lanes past `count` point at the first row.
  static IndexVec partial_row_starts(int count, int n_bins) {
    alignas(64) Index starts[kLanes];
    for (int i = 0; i < kLanes; ++i) starts[i] = i < count ? static_cast<Index>(i * n_bins) : 0;
    return IndexVec::loadu(starts);
  }

  // Loads up to kLanes values, zero-filling the lanes past `count`. A full block loads them
  // directly: a vector load of lanes just written one by one would wait for the stores.
  Vec load_lanes(const acc_t* values, int count) {
    if (count == kLanes) return Vec::loadu(values);
    for (int i = 0; i < kLanes; ++i) lanes[i] = i < count ? values[i] : acc_t(0);
    return Vec::loadu(lanes);
  }

  // The 32 bits of bins bins[i] and bins[i] + 1 of row i of a block of 16-bit rows (the low
  // half bins[i]), for the levels that widen such a pair in registers.
  static int32_t pair_bits(const scalar_t* logits, int i, int n_bins, const int32_t* bins) {
    int32_t bits;
    std::memcpy(&bits, logits + i * n_bins + bins[i], sizeof(bits));
    return bits;
  }

  // The logits of bins bin_left and bin_left + 1 of each of the block's `count` row-major rows
  // (`logits` as the caller holds them, `rows` widened to acc_t); lanes past `count` read the
  // block's first row.
  std::pair<Vec, Vec> target_logits(const scalar_t* logits, const acc_t* rows,
                                    const IndexVec& bin_left, int count, int n_bins) const {
#if defined(CPU_CAPABILITY_AVX512)
    // fp16/bf16: one 32-bit gather of the adjacent pair from the 16-bit rows, whose low half is
    // bin_left and high half bin_left + 1 (bin_left <= n_bins - 2: inside the row).
    if constexpr (std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2) {
      if (count == kLanes) {
        const __m512i pairs =
            _mm512_i32gather_epi32(full_row_starts + bin_left, static_cast<const void*>(logits), 2);
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          return {_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)),
                  _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xffff0000)))};
        } else {
          return {_mm512_cvtph_ps(_mm512_cvtepi32_epi16(pairs)),
                  _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(pairs, 16)))};
        }
      }
    }
#endif
#if defined(CPU_CAPABILITY_AVX2)
    // fp16/bf16: eight 4-byte loads of the adjacent pair from the 16-bit rows (low half bin_left,
    // high half bin_left + 1), widened in registers. fp32: eight 8-byte loads of the pair and
    // four shuffles. Both faster than gathers, which are slow on many AVX2 CPUs.
    if constexpr (std::is_same_v<acc_t, float>) {
      if (count == kLanes) {
        alignas(32) int32_t bins[kLanes];
        bin_left.store(bins);
        if constexpr (sizeof(scalar_t) == 2) {
          const auto pair = [&](int i) { return pair_bits(logits, i, n_bins, bins); };
          const __m256i pairs = _mm256_setr_epi32(pair(0), pair(1), pair(2), pair(3), pair(4),
                                                  pair(5), pair(6), pair(7));
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            return {_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)),
                    _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xffff0000)))};
          } else {
            // Each 128-bit lane's low halves, then its high halves; then the lanes' low halves
            // together and their high halves together: 8 x fp16 each.
            const __m256i halves = _mm256_shuffle_epi8(
                pairs, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1,
                                        4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
            const __m256i grouped = _mm256_permute4x64_epi64(halves, _MM_SHUFFLE(3, 1, 2, 0));
            return {_mm256_cvtph_ps(_mm256_castsi256_si128(grouped)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256(grouped, 1))};
          }
        } else {
          const auto pair = [&](int i) { return rows + i * n_bins + bins[i]; };
          const auto load_two_pairs = [&](int i) {
            const __m128 low = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(pair(i))));
            return _mm_loadh_pi(low, reinterpret_cast<const __m64*>(pair(i + 1)));
          };
          // [l0 r0 l1 r1 | l4 r4 l5 r5] and [l2 r2 l3 r3 | l6 r6 l7 r7]
          const __m256 rows_0145 =
              _mm256_insertf128_ps(_mm256_castps128_ps256(load_two_pairs(0)), load_two_pairs(4), 1);
          const __m256 rows_2367 =
              _mm256_insertf128_ps(_mm256_castps128_ps256(load_two_pairs(2)), load_two_pairs(6), 1);
          return {_mm256_shuffle_ps(rows_0145, rows_2367, _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm256_shuffle_ps(rows_0145, rows_2367, _MM_SHUFFLE(3, 1, 3, 1))};
        }
      }
    }
#endif
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512) && defined(__SSE2__)
    // bf16 below AVX2 on x86-64 (whose full blocks of 16 bins are widened in registers, with no
    // fp32 rows): 4-byte loads of the adjacent pair from the 16-bit rows, widened by a shift and
    // a mask.
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, at::BFloat16>) {
      if (count == kLanes) {
        alignas(32) int32_t bins[kLanes];
        bin_left.store(bins);
        const auto pair = [&](int i) { return pair_bits(logits, i, n_bins, bins); };
        Vec left;
        Vec right;
        for (int h = 0; h < kLanes; h += 4) {
          const __m128i pairs = _mm_setr_epi32(pair(h), pair(h + 1), pair(h + 2), pair(h + 3));
          _mm_storeu_ps(static_cast<float*>(left) + h, _mm_castsi128_ps(_mm_slli_epi32(pairs, 16)));
          _mm_storeu_ps(static_cast<float*>(right) + h,
                        _mm_castsi128_ps(_mm_and_si128(pairs, _mm_set1_epi32(0xffff0000))));
        }
        return {left, right};
      }
    }
#endif
    (void)logits;
    const IndexVec row_start =
        count == kLanes ? full_row_starts : partial_row_starts(count, n_bins);
    return {at::vec::gather<sizeof(acc_t)>(rows, row_start + bin_left),
            at::vec::gather<sizeof(acc_t)>(rows, row_start + bin_left + IndexVec(1))};
  }

  // Full blocks of fp16/bf16 rows of 16 bins on AVX-512 and AVX2: widened to fp32 and
  // transposed in registers straight into the staged block cols, with no row-major fp32 copy in
  // between (target_logits reads such blocks from the 16-bit rows). False elsewhere.
  bool widen_transposed(const scalar_t* logits, int count, acc_t* cols) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBins == 16 && kLanes == 16 && std::is_same_v<acc_t, float>) {
      if (count != kLanes) return false;
      __m512 block[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(logits + i * 16));
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          block[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        } else {
          block[i] = _mm512_cvtph_ps(raw);
        }
      }
      transpose_16x16(block);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(cols + j * kLanes, block[j]);
      return true;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kBins == 16 && kLanes == 8 && std::is_same_v<acc_t, float>) {
      if (count != kLanes) return false;
      __m256 low_bins[8];   // bins 0-7 of each row
      __m256 high_bins[8];  // bins 8-15
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const auto* row = reinterpret_cast<const __m128i*>(logits + i * 16);
        const __m128i raw_low = _mm_loadu_si128(row);
        const __m128i raw_high = _mm_loadu_si128(row + 1);
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          low_bins[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw_low), 16));
          high_bins[i] =
              _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw_high), 16));
        } else {
          low_bins[i] = _mm256_cvtph_ps(raw_low);
          high_bins[i] = _mm256_cvtph_ps(raw_high);
        }
      }
      transpose_8x8(low_bins);
      transpose_8x8(high_bins);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        _mm256_storeu_ps(cols + j * kLanes, low_bins[j]);
        _mm256_storeu_ps(cols + (j + 8) * kLanes, high_bins[j]);
      }
      return true;
    }
#elif defined(__SSE2__)
    // bf16 below AVX2 on x86-64: a bf16 is the high half of its fp32, so each 4 bins of a row
    // widen by one unpack with zeros; then SSE's 4 x 4 transposes.
    if constexpr (kBins == 16 && kLanes == 8 && std::is_same_v<acc_t, float> &&
                  std::is_same_v<scalar_t, at::BFloat16>) {
      if (count != kLanes) return false;
      const __m128i zero = _mm_setzero_si128();
      for (int i = 0; i < kLanes; i += 4) {
        __m128 bins[4][4];  // bins[q][r]: bins 4q to 4q + 3 of row i + r
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const auto* row = reinterpret_cast<const __m128i*>(logits + (i + r) * 16);
          const __m128i raw_low = _mm_loadu_si128(row);
          const __m128i raw_high = _mm_loadu_si128(row + 1);
          bins[0][r] = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, raw_low));
          bins[1][r] = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, raw_low));
          bins[2][r] = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, raw_high));
          bins[3][r] = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, raw_high));
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          _MM_TRANSPOSE4_PS(bins[q][0], bins[q][1], bins[q][2], bins[q][3]);
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b) _mm_storeu_ps(cols + (4 * q + b) * kLanes + i, bins[q][b]);
        }
      }
      return true;
    }
#endif
    (void)logits;
    (void)count;
    (void)cols;
    return false;
  }

  int batch_rows() const { return blocks_per_batch * kLanes; }

  // Rows [0, count) of the batch starting at `logits`, count <= batch_rows(); writes each
  // row's loss to loss_out[i] and, when grad is not null, the rows' gradients.
  void operator()(const scalar_t* logits, const acc_t* target, const acc_t* weight, int count,
                  acc_t* loss_out, scalar_t* grad) {
    const int n_bins = kBins > 0 ? kBins : dynamic_bins;
    const bool keep_exp = grad != nullptr;
    for (int first = 0; first < count; first += kLanes) {
      reduce_block(logits + static_cast<int64_t>(first) * n_bins, target + first,
                   std::min(kLanes, count - first), first, keep_exp);
    }
    for (int first = 0; first < count; first += kLanes) {
      finish_block(target + first, weight != nullptr ? weight + first : nullptr,
                   std::min(kLanes, count - first), first, loss_out + first, keep_exp);
    }
    if (grad == nullptr) return;
    for (int first = 0; first < count; first += kLanes) {
      write_gradient_block(std::min(kLanes, count - first), first,
                           grad + static_cast<int64_t>(first) * n_bins);
    }
  }

  // The first pass over the block of `count` rows that is the batch's rows [first, first +
  // count): transposed into its staged block, its max, its sum of exps (the exps kept in the
  // staged block when keep_exp) and its target bins' logits.
  SDFL_FLATTEN void reduce_block(const scalar_t* logits, const acc_t* target, int count, int first,
                                 bool keep_exp) {
    const int n_bins = kBins > 0 ? kBins : dynamic_bins;
    acc_t* cols = staged + first * n_bins;
    // The block's rows are contiguous: widen them in one vectorised pass (or in registers, as
    // they are transposed), then transpose the tile with SIMD shuffles. rows: the widened rows,
    // null where they went to cols directly.
    const acc_t* rows = nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows = logits;
    } else if (!widen_transposed(logits, count, cols)) {
      at::vec::convert(logits, tile, static_cast<int64_t>(count) * n_bins);
      rows = tile;
    }
    if (rows != nullptr) transpose_tile<acc_t>(rows, n_bins, cols, kLanes, count, n_bins);
    for (int i = count; i < kLanes; ++i) {
      for (int j = 0; j < n_bins; ++j) cols[j * kLanes + i] = acc_t(0);
    }
    const Vec zero(acc_t(0));
    const Vec one(acc_t(1));
    const TwoHot<Vec> th = two_hot(load_lanes(target, count), zero, one, upper_limit);

    // Four independent max chains and two sum chains over the bins: with a single chain each
    // max and add would wait on the latency of the one before it.
    const Vec first_bin = Vec::loadu(cols);
    Vec max_chain[4] = {first_bin, first_bin, first_bin, first_bin};
    int j = 1;
    for (; j + 4 <= n_bins; j += 4) {
      for (int k = 0; k < 4; ++k)
        max_chain[k] = max_of_finite(max_chain[k], Vec::loadu(cols + (j + k) * kLanes));
    }
    for (; j < n_bins; ++j)
      max_chain[0] = max_of_finite(max_chain[0], Vec::loadu(cols + j * kLanes));
    const Vec max = max_of_finite(max_of_finite(max_chain[0], max_chain[1]),
                                  max_of_finite(max_chain[2], max_chain[3]));
    max.store(row_max + first);

    // The two target bins' logits, read from the row-major rows; the clamp keeps the index in
    // range for a NaN target, whose row the poison term makes NaN.
    const IndexVec left_index = at::vec::minimum(
        at::vec::maximum(at::vec::convert_to_int_of_same_size(th.left), IndexVec(0)),
        IndexVec(static_cast<Index>(n_bins - 2)));
    const auto [left, right] = target_logits(logits, rows, left_index, count, n_bins);
    left.store(x_left + first);
    right.store(x_right + first);

    sum_of_exps(cols, max, n_bins, keep_exp).store(sum_exp + first);
  }

  // The per-row tail of the batch's rows [first, first + count): their losses and, when
  // keep_terms, their gradient terms.
  SDFL_FLATTEN void finish_block(const acc_t* target, const acc_t* weight, int count, int first,
                                 acc_t* loss_out, bool keep_terms) {
    const Vec zero(acc_t(0));
    const Vec one(acc_t(1));
    const Vec t = load_lanes(target, count);
    const Vec w = weight != nullptr ? load_lanes(weight, count) : one;
    // Recomputed from the target (a few operations) rather than kept per row since the first pass.
    const TwoHot<Vec> th = two_hot(t, zero, one, upper_limit);
    const Vec max = Vec::loadu(row_max + first);
    const RowResult<Vec> r =
        finish_row(th, Vec::loadu(x_left + first) - max, Vec::loadu(x_right + first) - max,
                   Vec::loadu(sum_exp + first), w, t, log_eps);
    r.loss.store(loss_out, count);
    if (!keep_terms) return;
    th.left.store(bin_left + first);
    r.grad_scale.store(grad_scale + first);
    r.grad_left.store(grad_left + first);
    r.grad_right.store(grad_right + first);
  }

  // The gradients of the batch's rows [first, first + count), from the exps kept in their
  // staged block, written row-major to grad.
  SDFL_FLATTEN void write_gradient_block(int count, int first, scalar_t* grad) {
    const int n_bins = kBins > 0 ? kBins : dynamic_bins;
    acc_t* cols = staged + first * n_bins;
    const Vec one(acc_t(1));
    const Vec left = Vec::loadu(bin_left + first);
    const Vec right = left + one;
    const Vec scale = Vec::loadu(grad_scale + first);
    const Vec minus_left = Vec::loadu(grad_left + first);
    const Vec minus_right = Vec::loadu(grad_right + first);
    for (int j = 0; j < n_bins; ++j) {
      const Vec bin(static_cast<acc_t>(j));
      const Vec e = Vec::loadu(cols + j * kLanes);
      const Vec g = minus_where_equal(minus_where_equal(e * scale, bin, left, minus_left), bin,
                                      right, minus_right);
      g.store(cols + j * kLanes);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      transpose_tile<acc_t>(cols, kLanes, grad, n_bins, n_bins, count);
    } else {
      transpose_tile<acc_t>(cols, kLanes, tile, n_bins, n_bins, count);
      at::vec::convert(tile, grad, static_cast<int64_t>(count) * n_bins);
    }
  }
};

// True when none of values[0, count) is NaN or infinite, i.e. has all exponent bits set.
// Eight bytes at a time with integer arithmetic (which vectorises without reassociating
// floating point): each lane's exponent bits are XORed with the all-ones exponent, and the
// classic has-a-zero-lane test flags a lane that became 0.
template <typename scalar_t>
bool all_finite(const scalar_t* values, int64_t count) {
  constexpr uint64_t kLaneOne = sizeof(scalar_t) == 8   ? 1ULL
                                : sizeof(scalar_t) == 4 ? 0x0000000100000001ULL
                                                        : 0x0001000100010001ULL;
  constexpr uint64_t kLaneExponent =
      sizeof(scalar_t) == 8   ? 0x7ff0000000000000ULL
      : sizeof(scalar_t) == 4 ? 0x7f800000ULL
                              : (std::is_same_v<scalar_t, at::Half> ? 0x7c00ULL : 0x7f80ULL);
  constexpr uint64_t kExponent = kLaneExponent * kLaneOne;
  constexpr uint64_t kSignBits = (1ULL << (8 * sizeof(scalar_t) - 1)) * kLaneOne;
  const auto* bytes = reinterpret_cast<const unsigned char*>(values);
  const int64_t n_bytes = count * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t n_words = n_bytes / 8;
  const auto flags = [](uint64_t word) {
    const uint64_t y = (word & kExponent) ^ kExponent;  // a lane is 0 where it is not finite
    return (y - kLaneOne) & ~y & kSignBits;
  };
  uint64_t found = 0;
  for (int64_t k = 0; k < n_words; ++k) {
    uint64_t word;
    std::memcpy(&word, bytes + 8 * k, 8);
    found |= flags(word);
  }
  if (n_bytes > 8 * n_words) {  // zero-filled lanes read as finite
    uint64_t word = 0;
    std::memcpy(&word, bytes + 8 * n_words, static_cast<size_t>(n_bytes - 8 * n_words));
    found |= flags(word);
  }
  return found == 0;
}

// The sum of a chunk's row losses in double, the rows taken in order into four interleaved
// partial sums: with one running sum each addition would wait on the one before it. The order
// is fixed, so a chunk's sum has the same bits whatever the thread count.
class RowLossSum {
 public:
  template <typename T>
  void add(const T* values, int count) {
    int k = 0;
    for (; k < count && added_ % 4 != 0; ++k, ++added_) partial_[added_ % 4] += values[k];
    double p0 = partial_[0], p1 = partial_[1], p2 = partial_[2], p3 = partial_[3];
    for (; k + 4 <= count; k += 4, added_ += 4) {
      p0 += static_cast<double>(values[k]);
      p1 += static_cast<double>(values[k + 1]);
      p2 += static_cast<double>(values[k + 2]);
      p3 += static_cast<double>(values[k + 3]);
    }
    partial_[0] = p0;
    partial_[1] = p1;
    partial_[2] = p2;
    partial_[3] = p3;
    for (; k < count; ++k, ++added_) partial_[added_ % 4] += values[k];
  }
  double total() const { return (partial_[0] + partial_[1]) + (partial_[2] + partial_[3]); }

 private:
  double partial_[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t added_ = 0;
};

template <typename scalar_t, int kBins>
struct RowsTyped {
  using acc_t = at::opmath_type<scalar_t>;
  using Kernel = BlockKernel<scalar_t, acc_t, kBins>;

  const int n_bins;
  // A row's size, a constant where kBins fixes it (row copies then compile to a few moves).
  size_t row_bytes() const { return sizeof(scalar_t) * (kBins > 0 ? kBins : n_bins); }
  const scalar_t* pred;
  const acc_t* target;
  const acc_t* weight;
  acc_t* row_loss;
  scalar_t* grad;
  Kernel kernel;

  explicit RowsTyped(const DflForwardArgs& args)
      : n_bins(kBins > 0 ? kBins : args.n_bins),
        pred(static_cast<const scalar_t*>(args.pred)),
        target(static_cast<const acc_t*>(args.target)),
        weight(static_cast<const acc_t*>(args.weight)),
        row_loss(static_cast<acc_t*>(args.row_loss)),
        grad(static_cast<scalar_t*>(args.grad)),
        kernel(args.n_bins, static_cast<acc_t>(args.log_eps)) {}

  // Every row through the kernel, a batch of consecutive rows at a time.
  double all_rows(int64_t begin, int64_t end) {
    alignas(64) acc_t batch_loss[Kernel::kMaxRows];
    RowLossSum sum;
    for (int64_t i = begin; i < end; i += kernel.batch_rows()) {
      const int count = static_cast<int>(std::min<int64_t>(kernel.batch_rows(), end - i));
      acc_t* loss_out = row_loss != nullptr ? row_loss + i : batch_loss;
      kernel(pred + i * n_bins, target + i, weight != nullptr ? weight + i : nullptr, count,
             loss_out, grad != nullptr ? grad + i * n_bins : nullptr);
      sum.add(loss_out, count);
    }
    return sum.total();
  }

  // Rows of weight 0 (masked-out anchors) have loss 0 and gradient 0 unless their logits
  // or target are not finite (then NaN, as in the reference): no exp, no log, only one
  // finiteness sweep over the range and the zero writes. The other rows are gathered a batch
  // at a time into the kernel, whose lanes are independent, so each row gets the bits it
  // would get anyway; the sum takes them in row order.
  double weighted_rows(int64_t begin, int64_t end) {
    const int64_t n_rows = end - begin;
    if (std::count(weight + begin, weight + end, acc_t(0)) == 0) return all_rows(begin, end);
    const bool range_finite =
        all_finite(pred + begin * n_bins, n_rows * n_bins) && all_finite(target + begin, n_rows);
    if (row_loss != nullptr) std::fill_n(row_loss + begin, n_rows, acc_t(0));
    if (grad != nullptr) std::fill_n(grad + begin * n_bins, n_rows * n_bins, scalar_t(0));
    const double poison = range_finite ? 0.0 : poison_zero_weight_rows(begin, end);

    alignas(64) scalar_t gathered_pred[Kernel::kStagedValues];
    alignas(64) scalar_t gathered_grad[Kernel::kStagedValues];
    alignas(64) acc_t gathered_target[Kernel::kMaxRows];
    alignas(64) acc_t gathered_weight[Kernel::kMaxRows];
    alignas(64) acc_t batch_loss[Kernel::kMaxRows];
    int64_t rows[Kernel::kMaxRows];
    RowLossSum sum;
    int64_t i = begin;
    while (true) {
      int count = 0;
      // Branch-free: every index is written and kept where the weight is not 0 (NaN weights
      // too: they poison their row); a branch would mispredict at every foreground edge.
      for (; i < end && count < kernel.batch_rows(); ++i) {
        rows[count] = i;
        count += weight[i] != acc_t(0) ? 1 : 0;
      }
      if (count == 0) break;
      const int64_t first = rows[0];
      if (rows[count - 1] - first == count - 1) {  // consecutive rows: no copy
        kernel(pred + first * n_bins, target + first, weight + first, count, batch_loss,
               grad != nullptr ? grad + first * n_bins : nullptr);
      } else {
        for (int k = 0; k < count; ++k) {
          std::memcpy(gathered_pred + k * n_bins, pred + rows[k] * n_bins, row_bytes());
          gathered_target[k] = target[rows[k]];
          gathered_weight[k] = weight[rows[k]];
        }
        kernel(gathered_pred, gathered_target, gathered_weight, count, batch_loss,
               grad != nullptr ? gathered_grad : nullptr);
        if (grad != nullptr) {
          for (int k = 0; k < count; ++k) {
            std::memcpy(grad + rows[k] * n_bins, gathered_grad + k * n_bins, row_bytes());
          }
        }
      }
      sum.add(batch_loss, count);
      if (row_loss != nullptr) {
        for (int k = 0; k < count; ++k) row_loss[rows[k]] = batch_loss[k];
      }
    }
    return sum.total() + poison;
  }

  // The rows of weight 0 in [begin, end) whose logits or target are not finite: NaN loss
  // and gradient. Returns their sum (NaN, or 0 when there is none).
  double poison_zero_weight_rows(int64_t begin, int64_t end) {
    constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
    double sum = 0.0;
    for (int64_t r = begin; r < end; ++r) {
      if (weight[r] != acc_t(0) ||
          (all_finite(pred + r * n_bins, n_bins) && all_finite(target + r, 1))) {
        continue;
      }
      if (row_loss != nullptr) row_loss[r] = kNaN;
      if (grad != nullptr) std::fill_n(grad + r * n_bins, n_bins, static_cast<scalar_t>(kNaN));
      sum += static_cast<double>(kNaN);
    }
    return sum;
  }
};

template <typename scalar_t, int kBins>
double forward_rows_binned(const DflForwardArgs& args, int64_t begin, int64_t end);

// row_weight[r] = group_weight[(first_row + r) / group_rows] for r < n_rows.
template <typename acc_t>
void spread_group_weights(const acc_t* group_weight, int64_t group_rows, int64_t first_row,
                          int64_t n_rows, acc_t* row_weight) {
  int64_t group = first_row / group_rows;
  int64_t row = 0;
  if (const int64_t in_group = first_row - group * group_rows; in_group > 0) {
    row = std::min(group_rows - in_group, n_rows);  // the rest of a group the range starts in
    std::fill_n(row_weight, row, group_weight[group++]);
  }
  if (group_rows == 4) {  // an anchor's four sides: a fixed-size loop, one vector store a group
    for (; row + 4 <= n_rows; row += 4, ++group) {
      for (int side = 0; side < 4; ++side) row_weight[row + side] = group_weight[group];
    }
  }
  for (; row < n_rows; row += group_rows, ++group) {
    std::fill_n(row_weight + row, std::min(group_rows, n_rows - row), group_weight[group]);
  }
}

// Rows [begin, end) whose weights are shared by groups of consecutive rows (an anchor's four
// sides): each row's weight is written out for the range, and the range runs as rows of their
// own, with the bits that the same weights given per row get.
template <typename scalar_t, int kBins>
double grouped_weight_rows(const DflForwardArgs& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_rows = end - begin;
  // On the stack for ranges up to the rows of one of dfl_cpu.cpp's chunks.
  c10::SmallVector<acc_t, 256> row_weight;
  row_weight.resize_for_overwrite(static_cast<size_t>(n_rows));
  spread_group_weights(static_cast<const acc_t*>(args.weight), args.rows_per_weight, begin, n_rows,
                       row_weight.data());
  DflForwardArgs range = args;
  range.pred = static_cast<const scalar_t*>(args.pred) + begin * args.n_bins;
  range.target = static_cast<const acc_t*>(args.target) + begin;
  range.weight = row_weight.data();
  range.rows_per_weight = 1;
  if (args.row_loss != nullptr) range.row_loss = static_cast<acc_t*>(args.row_loss) + begin;
  if (args.grad != nullptr) range.grad = static_cast<scalar_t*>(args.grad) + begin * args.n_bins;
  return forward_rows_binned<scalar_t, kBins>(range, 0, n_rows);
}

template <typename scalar_t, int kBins>
double forward_rows_binned(const DflForwardArgs& args, int64_t begin, int64_t end) {
  if (args.weight != nullptr && args.rows_per_weight > 1) {
    return grouped_weight_rows<scalar_t, kBins>(args, begin, end);
  }
  RowsTyped<scalar_t, kBins> rows(args);
  return rows.weight != nullptr ? rows.weighted_rows(begin, end) : rows.all_rows(begin, end);
}

// 16 bins (reg_max 16, YOLOv8 onwards) gets its own instantiation; any other count the
// generic one.
template <typename scalar_t>
double forward_rows_typed(const DflForwardArgs& args, int64_t begin, int64_t end) {
  return args.n_bins == 16 ? forward_rows_binned<scalar_t, 16>(args, begin, end)
                           : forward_rows_binned<scalar_t, 0>(args, begin, end);
}

}  // namespace

double dfl_forward_rows(const DflForwardArgs& args, int64_t begin, int64_t end) {
  double sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "dfl_forward_cpu",
                                  [&] { sum = forward_rows_typed<scalar_t>(args, begin, end); });
  return sum;
}

}  // namespace stable_dfl::cpu
