/* bfloat16 linear layer for x86-64 CPUs with AVX512-BF16, summed in the order oneDNN sums it.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias). For each output, K is split in blocks of `kb`; each block
 * is summed in fp32 from zero over consecutive pairs of k with vdpbf16ps; the block sums are added in
 * order, then the bias, and the result is rounded to the nearest even bfloat16. Python checks, per
 * weight shape and for the block size it passes, that this reproduces torch's own (oneDNN's) result
 * bit for bit before it uses the kernel.
 *
 * Weights are packed as [ceil(N/64)][ceil(K/2)][64][2] (zero padded): one block of 64 outputs is one
 * contiguous stream, read once for up to six rows of x at a time.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define TILE(MT)                                                                                     \
  static inline void tile##MT(const uint16_t* x, int K, const uint16_t* wb, int kp0, int kp1,          \
                              float* tot, int first) {                                                 \
    __m512 a[MT][4];                                                                                   \
    for (int r = 0; r < MT; r++)                                                                       \
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();                                       \
    for (int kp = kp0; kp < kp1; kp++) {                                                               \
      const uint16_t* w = wb + (int64_t)kp * 128;                                                      \
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32);        \
      __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96);   \
      for (int r = 0; r < MT; r++) {                                                                   \
        uint32_t xp = x[(int64_t)r * K + 2 * kp];                                                      \
        if (2 * kp + 1 < K) xp |= (uint32_t)x[(int64_t)r * K + 2 * kp + 1] << 16;                      \
        __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp);                                            \
        a[r][0] = _mm512_dpbf16_ps(a[r][0], w0, xv);                                                   \
        a[r][1] = _mm512_dpbf16_ps(a[r][1], w1, xv);                                                   \
        a[r][2] = _mm512_dpbf16_ps(a[r][2], w2, xv);                                                   \
        a[r][3] = _mm512_dpbf16_ps(a[r][3], w3, xv);                                                   \
      }                                                                                                \
    }                                                                                                  \
    for (int r = 0; r < MT; r++)                                                                       \
      for (int v = 0; v < 4; v++) {                                                                    \
        float* t = tot + r * 64 + v * 16;                                                              \
        _mm512_storeu_ps(t, first ? a[r][v] : _mm512_add_ps(_mm512_loadu_ps(t), a[r][v]));             \
      }                                                                                                \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

int stablelm_linear_bf16(const uint16_t* x, const uint16_t* wp, const uint16_t* bias, uint16_t* y,
                         int M, int N, int K, int kb, int threads) {
  if (M < 0 || N <= 0 || K <= 0 || kb < 2 || kb % 2 || threads < 1) return 1;
  int NB = (N + 63) / 64, KP = (K + 1) / 2, kbp = kb / 2, failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float small[8 * 64] __attribute__((aligned(64)));
    float* tot = M > 8 ? (float*)_mm_malloc(sizeof(float) * 64 * (size_t)M, 64) : small;
    if (!tot) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int nb = 0; nb < NB; nb++) {
      if (!tot) continue;
      const uint16_t* wb = wp + (int64_t)nb * KP * 128;
      for (int kp0 = 0; kp0 < KP; kp0 += kbp) {
        int kp1 = kp0 + kbp < KP ? kp0 + kbp : KP;
        for (int m = 0; m < M;) {
          int mt = M - m >= 6 ? 6 : M - m;
          const uint16_t* xm = x + (int64_t)m * K;
          float* t = tot + m * 64;
          switch (mt) {
            case 1: tile1(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
            case 2: tile2(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
            case 3: tile3(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
            case 4: tile4(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
            case 5: tile5(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
            default: tile6(xm, K, wb, kp0, kp1, t, kp0 == 0); break;
          }
          m += mt;
        }
      }
      /* Epilogue: + bias in fp32, then vcvtneps2bf16 (round to nearest even), 16 outputs at a time. */
      for (int m = 0; m < M; m++)
        for (int j = 0; j < 64 && nb * 64 + j < N; j += 16) {
          int n = nb * 64 + j, rem = N - n;
          __mmask16 mask = rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1u);
          __m512 v = _mm512_loadu_ps(tot + m * 64 + j);
          if (bias) {
            __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + n));
            v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
          }
          _mm256_mask_storeu_epi16(y + (int64_t)m * N + n, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
    if (tot && tot != small) _mm_free(tot);
  }
  return failed;
}

/* Reads `bytes` (a multiple of 256, 64-byte aligned) with `threads` threads; returns an XOR of what it
 * read, so that the reads cannot be optimized away. The machine's read bandwidth, for benchmarks. */
uint64_t stablelm_read(const uint8_t* p, int64_t bytes, int threads) {
  int64_t lines = bytes / 64;
  uint64_t result = 0;
#pragma omp parallel num_threads(threads)
  {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < lines / 4; i++) {
      const __m512i* q = (const __m512i*)(p + i * 256);
      a0 = _mm512_xor_si512(a0, _mm512_load_si512(q));
      a1 = _mm512_xor_si512(a1, _mm512_load_si512(q + 1));
      a2 = _mm512_xor_si512(a2, _mm512_load_si512(q + 2));
      a3 = _mm512_xor_si512(a3, _mm512_load_si512(q + 3));
    }
    uint64_t r = (uint64_t)_mm512_reduce_or_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
#pragma omp atomic
    result ^= r;
  }
  return result;
}
