/* Linear layers for x86-64 CPUs with AVX-512: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * Weights are packed as [ceil(N/64)][ceil(K/P)][64][P] (zero padded; P = 2 for bfloat16, 1 for float32):
 * one block of 64 outputs is one contiguous stream, read once for up to six rows of x at a time. For
 * each output, K is split in blocks of `kb`; each block is summed in fp32 from zero, the block sums
 * are added in order, then the bias.
 *
 * bfloat16 (AVX512-BF16): each block is summed over consecutive pairs of k with vdpbf16ps and the
 * result rounded to the nearest even bfloat16: the order oneDNN sums in, so that Python can check, per
 * weight shape and for the block size it passes, that this reproduces torch's result bit for bit.
 * float32 (AVX512F): each block is summed with one FMA per k, in order.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* What differs between the two element types: the element, the vector of weights one instruction
 * takes, how x[r, k .. k+P) is broadcast, the multiply-add into fp32, and how a result is stored. */
typedef uint16_t elem_bf16;
typedef float elem_f32;
#define P_bf16 2
#define P_f32 1
#define LOAD_bf16(p) ((__m512bh)_mm512_loadu_si512(p))
#define LOAD_f32(p) _mm512_loadu_ps(p)
#define MAC_bf16(acc, w, xv) _mm512_dpbf16_ps(acc, w, xv)
#define MAC_f32(acc, w, xv) _mm512_fmadd_ps(w, xv, acc)

static inline __m512bh bcast_bf16(const uint16_t* x, int K, int s) {
  uint32_t pair = x[2 * s];
  if (2 * s + 1 < K) pair |= (uint32_t)x[2 * s + 1] << 16;
  return (__m512bh)_mm512_set1_epi32((int)pair);
}

static inline __m512 bcast_f32(const float* x, int K, int s) {
  (void)K;
  return _mm512_set1_ps(x[s]);
}

/* 16 outputs: + bias in fp32, then (bf16) vcvtneps2bf16, rounding to the nearest even. */
static inline void store_bf16(uint16_t* y, const uint16_t* bias, __m512 v, __mmask16 mask) {
  if (bias) {
    __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias));
    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
  }
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline void store_f32(float* y, const float* bias, __m512 v, __mmask16 mask) {
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(y, mask, v);
}

/* MT rows x 64 outputs over steps [s0, s1) of P k each: sums from zero in registers, then stores
 * (first block) or adds them to the running totals. */
#define TILE(KIND, MT)                                                                                 \
  static inline void tile_##KIND##_##MT(const elem_##KIND* x, int K, const elem_##KIND* wb, int s0,     \
                                        int s1, float* tot, int first) {                               \
    __m512 a[MT][4];                                                                                   \
    for (int r = 0; r < MT; r++)                                                                       \
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();                                       \
    for (int s = s0; s < s1; s++) {                                                                    \
      const elem_##KIND* w = wb + (int64_t)s * 64 * P_##KIND;                                          \
      const int step = 16 * P_##KIND;                                                                  \
      __typeof__(LOAD_##KIND(w)) w0 = LOAD_##KIND(w), w1 = LOAD_##KIND(w + step);                      \
      __typeof__(w0) w2 = LOAD_##KIND(w + 2 * step), w3 = LOAD_##KIND(w + 3 * step);                   \
      for (int r = 0; r < MT; r++) {                                                                   \
        __typeof__(w0) xv = bcast_##KIND(x + (int64_t)r * K, K, s);                                     \
        a[r][0] = MAC_##KIND(a[r][0], w0, xv);                                                         \
        a[r][1] = MAC_##KIND(a[r][1], w1, xv);                                                         \
        a[r][2] = MAC_##KIND(a[r][2], w2, xv);                                                         \
        a[r][3] = MAC_##KIND(a[r][3], w3, xv);                                                         \
      }                                                                                                \
    }                                                                                                  \
    for (int r = 0; r < MT; r++)                                                                       \
      for (int v = 0; v < 4; v++) {                                                                    \
        float* t = tot + r * 64 + v * 16;                                                              \
        _mm512_storeu_ps(t, first ? a[r][v] : _mm512_add_ps(_mm512_loadu_ps(t), a[r][v]));             \
      }                                                                                                \
  }

/* stablelm_linear_<kind>(x, packed W, bias or NULL, y, M, N, K, kb, threads): 0 on success, 1 when a
 * work buffer could not be allocated, 2 on bad arguments (nothing is written then). */
#define LINEAR(KIND)                                                                                   \
  TILE(KIND, 1)                                                                                        \
  TILE(KIND, 2)                                                                                        \
  TILE(KIND, 3)                                                                                        \
  TILE(KIND, 4)                                                                                        \
  TILE(KIND, 5)                                                                                        \
  TILE(KIND, 6)                                                                                        \
  int stablelm_linear_##KIND(const elem_##KIND* x, const elem_##KIND* wp, const elem_##KIND* bias,     \
                             elem_##KIND* y, int M, int N, int K, int kb, int threads) {               \
    const int P = P_##KIND;                                                                            \
    if (M < 0 || N <= 0 || K <= 0 || kb < P || kb % P || threads < 1) return 2;                        \
    if (M == 0) return 0;                                                                              \
    int NB = (N + 63) / 64, S = (K + P - 1) / P, kbs = kb / P, failed = 0;                             \
    /* Running totals, 64 per row: on the stack for up to 8 rows (decoding), else allocated here. */   \
    float** buffers = 0;                                                                               \
    if (M > 8) {                                                                                       \
      if (!(buffers = (float**)calloc((size_t)threads, sizeof(float*)))) return 1;                     \
      for (int i = 0; i < threads && !failed; i++)                                                    \
        failed = !(buffers[i] = (float*)_mm_malloc(sizeof(float) * 64 * (size_t)M, 64));               \
    }                                                                                                  \
    if (!failed) {                                                                                     \
      _Pragma("omp parallel num_threads(NB < threads ? NB : threads)")                                 \
      {                                                                                                \
      float small[8 * 64] __attribute__((aligned(64)));                                                \
      float* tot = buffers ? buffers[omp_get_thread_num()] : small;                                    \
      _Pragma("omp for schedule(static)")                                                              \
      for (int nb = 0; nb < NB; nb++) {                                                                \
        const elem_##KIND* wb = wp + (int64_t)nb * S * 64 * P;                                         \
        for (int s0 = 0; s0 < S; s0 += kbs) {                                                          \
          int s1 = s0 + kbs < S ? s0 + kbs : S;                                                        \
          for (int m = 0; m < M;) {                                                                    \
            int mt = M - m >= 6 ? 6 : M - m;                                                           \
            const elem_##KIND* xm = x + (int64_t)m * K;                                                \
            float* t = tot + m * 64;                                                                   \
            switch (mt) {                                                                              \
              case 1: tile_##KIND##_1(xm, K, wb, s0, s1, t, s0 == 0); break;                           \
              case 2: tile_##KIND##_2(xm, K, wb, s0, s1, t, s0 == 0); break;                           \
              case 3: tile_##KIND##_3(xm, K, wb, s0, s1, t, s0 == 0); break;                           \
              case 4: tile_##KIND##_4(xm, K, wb, s0, s1, t, s0 == 0); break;                           \
              case 5: tile_##KIND##_5(xm, K, wb, s0, s1, t, s0 == 0); break;                           \
              default: tile_##KIND##_6(xm, K, wb, s0, s1, t, s0 == 0); break;                          \
            }                                                                                          \
            m += mt;                                                                                   \
          }                                                                                            \
        }                                                                                              \
        for (int m = 0; m < M; m++)                                                                    \
          for (int j = 0; j < 64 && nb * 64 + j < N; j += 16) {                                        \
            int n = nb * 64 + j, rem = N - n;                                                          \
            __mmask16 mask = rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1u);            \
            store_##KIND(y + (int64_t)m * N + n, bias ? bias + n : 0, _mm512_loadu_ps(tot + m * 64 + j), \
                         mask);                                                                        \
          }                                                                                            \
      }                                                                                                \
      }                                                                                                \
    }                                                                                                  \
    if (buffers) {                                                                                     \
      for (int i = 0; i < threads; i++)                                                                \
        if (buffers[i]) _mm_free(buffers[i]);                                                          \
      free(buffers);                                                                                   \
    }                                                                                                  \
    return failed;                                                                                     \
  }

LINEAR(bf16)
LINEAR(f32)

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
