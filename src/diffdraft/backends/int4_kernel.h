// A 4-bit matmul for a few rows (docs/native-weights.md, "The integer 4-bit kernel"): y = x W^T with W in
// groups of 32 inputs, w = q * s + m (q in 0..15; m = zero - 8 s), and each row of x rounded per group of 32
// to 15-bit integers a with one scale (d = max |x| / 16383), each split into two bytes, a = 128 h + l (h in
// -128..127, l in 0..127). A group's dot product is then an exact integer sum,
// S = 128 sum_k q_k h_k + sum_k q_k l_k, which the CPU adds four byte products at a time (AVX-512 VNNI's
// vpdpbusd, or AVX2's vpmaddubsw and vpmaddwd, or plain C++ elsewhere); the float part is
// y += d (s S + m sum_k a_k) per group, in a fixed order. (One byte per activation, as llama.cpp rounds
// them, drifted three times as far from float32 on SmolLM2: an outlier in a group of 32 leaves the other
// inputs few levels.) Every row is computed alone: a k-row call gives
// each row the bits a one-row call gives. The 4-bit codes are read once for all the rows of a call (up to
// kRowTile at a time), so extra rows cost only their integer products.
//
// Packed layout, per block of 16 outputs and group of 32 inputs: 256 bytes of codes, where byte 64 p + 4 j + i
// holds output j's code for input 4 p + i in its low nibble and for input 16 + 4 p + i in its high one
// (p = 0..3, i = 0..3), then 16 scales s and 16 offsets m as float16 (in their own tensor). Knows nothing of
// models or torch's other kernels.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace diffdraft_int4 {

constexpr int64_t kGroup = 32;    // inputs per group
constexpr int64_t kBlock = 16;    // outputs per block
constexpr int64_t kRowTile = 8;   // rows that share one read of the codes
constexpr int64_t kCodeBytes = kGroup * kBlock / 2;  // 256 bytes of codes per (block, group)

constexpr float kLevels = 16383.0f;  // a in -16383..16383

// A row's inputs as integers: per group, a_k = round(x_k / d) with d = max |x| / kLevels, kept as its high byte
// h_k = floor(a_k / 128) and low byte l_k = a_k - 128 h_k; the scale d and the sum of the a_k.
struct QuantizedRow {
  const int8_t* high;
  const int8_t* low;
  const float* scales;
  const int32_t* sums;
};

inline void quantize_row(const float* x, int64_t k, int8_t* high, int8_t* low, float* scales, int32_t* sums) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    float top = 0;
    for (int64_t i = 0; i < kGroup; ++i) top = std::max(top, std::fabs(xg[i]));
    const float d = top / kLevels;
    const float inv = d > 0 ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const int32_t a = std::clamp(static_cast<int32_t>(std::nearbyint(xg[i] * inv)), -16383, 16383);
      const int32_t h = a >> 7;  // floor(a / 128): an arithmetic shift
      high[g * kGroup + i] = static_cast<int8_t>(h);
      low[g * kGroup + i] = static_cast<int8_t>(a - 128 * h);
      sum += a;
    }
    scales[g] = d;
    sums[g] = sum;
  }
}

// The 16 integer sums S_j = sum_k q_jk a_k of one (block, group) for one row's bytes a, into out[16].
inline void group_sums_scalar(const uint8_t* codes, const int8_t* a, int32_t* out) {
  for (int64_t j = 0; j < kBlock; ++j) out[j] = 0;
  for (int64_t p = 0; p < 4; ++p)
    for (int64_t j = 0; j < kBlock; ++j)
      for (int64_t i = 0; i < 4; ++i) {
        const uint8_t byte = codes[64 * p + 4 * j + i];
        out[j] += static_cast<int32_t>(byte & 0x0F) * a[4 * p + i] + static_cast<int32_t>(byte >> 4) * a[16 + 4 * p + i];
      }
}

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// out[r, n0 .. n0 + 16 * blocks) for rows r of one tile (rows <= kRowTile).
inline void tile(const uint8_t* codes, const uint16_t* sm, const QuantizedRow* rows, int64_t row_count, int64_t k,
                 int64_t n, int64_t block_begin, int64_t block_end, float* out) {
  const int64_t groups = k / kGroup;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* cb = codes + b * groups * kCodeBytes;
    const uint16_t* sb = sm + b * groups * 2 * kBlock;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
    __m512 acc[kRowTile];
    for (int64_t r = 0; r < row_count; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* cg = cb + g * kCodeBytes;
      __m512i w[8];
      for (int p = 0; p < 4; ++p) {
        const __m512i packed = _mm512_loadu_si512(cg + 64 * p);
        w[p] = _mm512_and_si512(packed, low);
        w[4 + p] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      }
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + g * 2 * kBlock)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + g * 2 * kBlock + kBlock)));
      for (int64_t r = 0; r < row_count; ++r) {
        const int32_t* h = reinterpret_cast<const int32_t*>(rows[r].high + g * kGroup);  // 8 x 4 bytes
        const int32_t* l = reinterpret_cast<const int32_t*>(rows[r].low + g * kGroup);
        __m512i high = _mm512_setzero_si512(), low_sum = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t) {
          high = _mm512_dpbusd_epi32(high, w[t], _mm512_set1_epi32(h[t]));
          low_sum = _mm512_dpbusd_epi32(low_sum, w[t], _mm512_set1_epi32(l[t]));
        }
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(high, 7), low_sum);
        const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s,
                                            _mm512_mul_ps(m, _mm512_set1_ps(static_cast<float>(rows[r].sums[g]))));
        acc[r] = _mm512_fmadd_ps(part, _mm512_set1_ps(rows[r].scales[g]), acc[r]);
      }
    }
    for (int64_t r = 0; r < row_count; ++r) _mm512_storeu_ps(out + r * n + b * kBlock, acc[r]);
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 acc[kRowTile][2];
    for (int64_t r = 0; r < row_count; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* cg = cb + g * kCodeBytes;
      __m256i w[8][2];  // [chunk][outputs 0-7 | 8-15]
      for (int p = 0; p < 4; ++p)
        for (int h = 0; h < 2; ++h) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + 64 * p + 32 * h));
          w[p][h] = _mm256_and_si256(packed, low);
          w[4 + p][h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
        }
      __m256 s[2], m[2];
      for (int h = 0; h < 2; ++h) {
        s[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 2 * kBlock + 8 * h)));
        m[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 2 * kBlock + kBlock + 8 * h)));
      }
      for (int64_t r = 0; r < row_count; ++r) {
        const int32_t* hi = reinterpret_cast<const int32_t*>(rows[r].high + g * kGroup);
        const int32_t* lo = reinterpret_cast<const int32_t*>(rows[r].low + g * kGroup);
        const __m256 d = _mm256_set1_ps(rows[r].scales[g]);
        const __m256 total = _mm256_set1_ps(static_cast<float>(rows[r].sums[g]));
        for (int h = 0; h < 2; ++h) {
          __m256i high = _mm256_setzero_si256(), low_sum = _mm256_setzero_si256();
          for (int t = 0; t < 8; ++t) {  // |products| <= 15 * 128, pairs <= 3840: no int16 saturation
            high = _mm256_add_epi32(high, _mm256_madd_epi16(_mm256_maddubs_epi16(w[t][h], _mm256_set1_epi32(hi[t])), ones));
            low_sum = _mm256_add_epi32(low_sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w[t][h], _mm256_set1_epi32(lo[t])), ones));
          }
          const __m256i sum = _mm256_add_epi32(_mm256_slli_epi32(high, 7), low_sum);
          const __m256 part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), s[h], _mm256_mul_ps(m[h], total));
          acc[r][h] = _mm256_fmadd_ps(part, d, acc[r][h]);
        }
      }
    }
    for (int64_t r = 0; r < row_count; ++r)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + r * n + b * kBlock + 8 * h, acc[r][h]);
#else
    float acc[kRowTile][kBlock] = {};
    int32_t sums[kBlock], low_sums[kBlock];
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* sg = sb + g * 2 * kBlock;
      for (int64_t r = 0; r < row_count; ++r) {
        group_sums_scalar(cb + g * kCodeBytes, rows[r].high + g * kGroup, sums);
        group_sums_scalar(cb + g * kCodeBytes, rows[r].low + g * kGroup, low_sums);
        for (int64_t j = 0; j < kBlock; ++j) sums[j] = sums[j] * 128 + low_sums[j];
        const float total = static_cast<float>(rows[r].sums[g]);
        for (int64_t j = 0; j < kBlock; ++j) {
          const float part = std::fma(static_cast<float>(sums[j]), half_to_float(sg[j]), half_to_float(sg[kBlock + j]) * total);
          acc[r][j] = std::fma(part, rows[r].scales[g], acc[r][j]);
        }
      }
    }
    for (int64_t r = 0; r < row_count; ++r)
      for (int64_t j = 0; j < kBlock; ++j) out[r * n + b * kBlock + j] = acc[r][j];
#endif
  }
}

// codes [N / 16, K / 32, 256] uint8 and sm [N / 16, K / 32, 2, 16] float16 from q [N, K] (0..15), scale and zero
// [N, K / 32] float32.
inline std::vector<at::Tensor> pack(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "codes must be [N, K] uint8");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(n % kBlock == 0 && k % kGroup == 0, "the integer 4-bit kernel needs N % 16 == 0 and K % 32 == 0");
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scale.to(at::kFloat).contiguous(), zc = zero.to(at::kFloat).contiguous();
  const int64_t groups = k / kGroup;
  at::Tensor codes = at::empty({n / kBlock, groups, kCodeBytes}, q.options());
  at::Tensor sm = at::empty({n / kBlock, groups, 2, kBlock}, q.options().dtype(at::kHalf));
  const uint8_t* src = qc.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  at::Half* sm_dst = sm.data_ptr<at::Half>();
  const float* s = sc.data_ptr<float>();
  const float* z = zc.data_ptr<float>();
  for (int64_t b = 0; b < n / kBlock; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* out = dst + (b * groups + g) * kCodeBytes;
      for (int64_t p = 0; p < 4; ++p)
        for (int64_t j = 0; j < kBlock; ++j)
          for (int64_t i = 0; i < 4; ++i) {
            const uint8_t* row = src + (b * kBlock + j) * k + g * kGroup;
            out[64 * p + 4 * j + i] = static_cast<uint8_t>((row[4 * p + i] & 0x0F) | ((row[16 + 4 * p + i] & 0x0F) << 4));
          }
      at::Half* sg = sm_dst + (b * groups + g) * 2 * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t at_ = (b * kBlock + j) * groups + g;
        sg[j] = at::Half(s[at_]);
        sg[kBlock + j] = at::Half(z[at_] - 8.0f * s[at_]);
      }
    }
  return {codes, sm};
}

// y [R, N] float32 = x [R, K] float32 times the packed weight, each row computed alone. Threads split the output
// blocks (never a row's sum), so their number changes no bits.
inline void matmul(const float* x, int64_t rows, int64_t k, const at::Tensor& codes, const at::Tensor& sm, float* y) {
  const int64_t n = codes.size(0) * kBlock, groups = k / kGroup;
  std::vector<int8_t> a_high(rows * k), a_low(rows * k);
  std::vector<float> a_scales(rows * groups);
  std::vector<int32_t> a_sums(rows * groups);
  std::vector<QuantizedRow> quantized(rows);
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(x + r * k, k, a_high.data() + r * k, a_low.data() + r * k, a_scales.data() + r * groups,
                 a_sums.data() + r * groups);
    quantized[r] = {a_high.data() + r * k, a_low.data() + r * k, a_scales.data() + r * groups,
                    a_sums.data() + r * groups};
  }
  const uint8_t* cd = codes.data_ptr<uint8_t>();
  const uint16_t* sd = reinterpret_cast<const uint16_t*>(sm.data_ptr<at::Half>());
  at::parallel_for(0, n / kBlock, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile)
      tile(cd, sd, quantized.data() + r0, std::min(kRowTile, rows - r0), k, n, begin, end, y + r0 * n);
  });
}

}  // namespace diffdraft_int4
