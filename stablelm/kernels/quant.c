/* Weight-only quantized linear layers: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ b), activations in
 * float32 or bfloat16, the sums in float32, one rounding to the activations' dtype at the end.
 *
 * Formats (see stablelm/quantization/formats.py, which quantizes and documents them):
 * - int8: W int8 [N, K] row-major, symmetric, one float32 scale per output: w[n, k] = q[n, k] * s[n].
 * - int4: W uint8 [N, K / 2], groups of `group` k (a multiple of 64) with a bfloat16 scale and minimum
 *   each ([N, K / group]): w = q * s + min, q in 0..15. Within each run of 64 k, byte j (0..31) holds
 *   q[k0 + j] in its low nibble and q[k0 + 32 + j] in its high nibble, so that the low nibbles of 32
 *   bytes are 32 consecutive k (one vector of x, no shuffling of x or of the nibbles).
 *
 * Kernels (one source with its parts quant_int.h, quant_amx.h and quant_screen.h, compiled per
 * instruction set like linear.c: VW = 16 floats with AVX-512, 8 with AVX2):
 * - one row of x (decoding): q8_one, q4_one_vnni, q4_one_f32: several rows of W far apart streamed at
 *   once, each with a software prefetch (see q8_one); the others below serve 2 to 8 rows. On AVX2 with
 *   bfloat16 x: q8_one_i16, q4_one_i16, integer sums over x made int16 per block (see x_to_i16); with
 *   AVX512-VNNI, q4_one_vnni the same way for int4.
 * - q8: per output, VW-wide float32 partial sums of q * x (int8 widened to int32, converted), times
 *   s[n] at the end. 4 outputs and up to MR rows at once, each weight vector converted once.
 * - q4 (float32): the same over nibbles; each group's partial sums are scaled as the group ends, the
 *   minimum's share (min_g * sum of the group's x) added per output at the end.
 * - q4 (AVX512-BF16, bfloat16 x, 2 to 8 rows): the nibbles become the bfloat16 numbers 128 + q by OR-ing in 0x4300
 *   (bfloat16 represents every integer up to 256 exactly), and vdpbf16ps sums pairs of them against x;
 *   the group's sum minus 128 * (its x summed) is q . x. Two instructions per 64 nibbles to decode.
 * - dequant: rows [n0, n1) of W to bfloat16 or float32 (prefill: tiles of the weight dequantized into
 *   the cache, then torch's matrix product; the `dequantize` API).
 *
 * Every kernel returns 0, 1 when a work buffer cannot be allocated, 2 on bad arguments (nothing
 * written). Work is split over blocks of outputs on `threads` OpenMP threads (torch's pool).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "spans.h" /* decoding's outputs dealt in spans as threads come free */

#if defined(__AVX512F__)
#define VW 16
#define MRMAX 4
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vset1(v) _mm512_set1_ps(v)
#define vstore(p, v) _mm512_storeu_ps(p, v)
/* VW int8 at p as floats */
static inline vf vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
/* VW bytes at p: their low and high nibbles as floats */
static inline void vload_u4(const uint8_t* p, vf* lo, vf* hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#else
#define VW 8
#define MRMAX 2
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vset1(v) _mm256_set1_ps(v)
#define vstore(p, v) _mm256_storeu_ps(p, v)
static inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline void vload_u4(const uint8_t* p, vf* lo, vf* hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
static inline float vsum(vf v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#endif

#define NB 4 /* outputs per inner block */

#define XF32 0
#define XBF16 1
/* or-ed into `type`: one row goes through the kernels of several rows (`q8_block`, `q4_block*`), which sum
 * a row alike for any row count and at any place in the call; the decoding kernels of one row sum it in
 * another order (a server that must give a row the same bits alone and in a batch asks for this) */
#define XBATCH 4
/* or-ed into `type` (bfloat16 x): 2 to 16 rows on AMX tiles (quant_amx; ignored with XBATCH) */
#define XAMX 8
/* or-ed into `type` (int8, 2 to 8 rows): each row summed as the one-row kernel sums a lone row
 * (`q8_lone_rows`), the weights read once for all rows: speculative decoding's check gives each draft
 * position the decoding step's bits. Refused (2) where the one-row kernel sums otherwise (bfloat16 x on
 * AVX2: integer sums, q8_one_i16) */
#define XLONE 16

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t round_bf16(float f) { /* to nearest even, NaN as torch makes it */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float load_one(const void* p, int type, int64_t i) {
  return type == XBF16 ? from_bf16(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
static inline void store_one(void* p, int type, int64_t i, float v) {
  if (type == XBF16)
    ((uint16_t*)p)[i] = round_bf16(v);
  else
    ((float*)p)[i] = v;
}

/* x (M rows of K, stride ldx, in `type`) as float32, rows of K */
static float* x_to_f32(const void* x, int type, int M, int K, int ldx) {
  float* xf = (float*)aligned_alloc(64, ((size_t)M * K * 4 + 63) / 64 * 64);
  if (!xf) return NULL;
  for (int m = 0; m < M; m++) {
    float* row = xf + (size_t)m * K;
    if (type == XBF16) { /* bfloat16 to float32 is a shift: in vectors (decoding calls this per layer) */
      const uint16_t* src = (const uint16_t*)x + (int64_t)m * ldx;
      int k = 0;
      for (; k + 8 <= K; k += 8)
        _mm256_storeu_si256((__m256i*)(row + k),
                            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + k))), 16));
      for (; k < K; k++) row[k] = from_bf16(src[k]);
    } else {
      memcpy(row, (const float*)x + (int64_t)m * ldx, (size_t)K * 4);
    }
  }
  return xf;
}

/* ---- int8 ------------------------------------------------------------------------------------------ */
static inline __attribute__((always_inline)) void q8_block(const float* xf, int K, int mr, const int8_t* w,
                                                           const float* s, int nn, float out[NB][MRMAX]) {
  vf acc[NB][MRMAX];
  for (int j = 0; j < NB; j++)
    for (int m = 0; m < MRMAX; m++) acc[j][m] = vzero();
  const int8_t* r[NB];
  for (int j = 0; j < NB; j++) r[j] = w + (size_t)(j < nn ? j : 0) * K;
  int k = 0;
  for (; k + VW <= K; k += VW) {
    vf xv[MRMAX];
    for (int m = 0; m < MRMAX; m++)
      if (m < mr) xv[m] = vload(xf + (size_t)m * K + k);
    if ((k & 63) == 0)
      for (int j = 0; j < NB; j++) _mm_prefetch((const char*)(r[j] + (size_t)NB * K + k), _MM_HINT_T0);
    for (int j = 0; j < NB; j++) {
      vf wv = vload_i8(r[j] + k);
      for (int m = 0; m < MRMAX; m++)
        if (m < mr) acc[j][m] = vfma(wv, xv[m], acc[j][m]);
    }
  }
  for (int j = 0; j < NB; j++)
    for (int m = 0; m < mr; m++) {
      float t = vsum(acc[j][m]);
      for (int kk = k; kk < K; kk++) t += (float)r[j][kk] * xf[(size_t)m * K + kk];
      out[j][m] = j < nn ? t * s[j] : 0.0f;
    }
}

/* One row of x (decoding). Reading W from memory at one thread is bound by how many cache lines are in
   flight, not by the arithmetic: the kernels read STREAMS (int4: Q4V, Q4F, Q4I) rows at once that lie far
   apart (row t of each quarter of a span of ONE_ROW_CHUNK outputs), each with a software prefetch PFD bytes
   ahead of its reads (AVX2's float32 int4 kernel: Q4F). Measured on the 3B shape with cold weights
   (benchmarks/quant_kernels.py, docs/quantization.md): int8 +8-30% over 4 adjacent rows with the next 4
   prefetched; one stream (one row after another) was slower than either, and prefetching 4-8 KB ahead
   or into L2 only was no better. The macros can be set with -D for such experiments. */
#ifndef PFD
#define PFD 2048
#endif
/* How the kernels ask for weights PFD bytes on: into L1 (T0) or into L2 (T1) by `quant_prefetch`, which
 * stablelm.kernels.prefetch times once per process (on a Zen 4 EPYC, one row of 2560 x 6912 at one
 * thread: int8 1.26x and int4 1.37x with T1; T0 was the rule before, from an AMX Xeon). A build with
 * -DPFH=... fixes the hint (benchmarks/quant_kernels.py --define). The bits never depend on it. */
static int quant_prefetch = 0;
void stablelm_quant_set_prefetch(int mode) { quant_prefetch = mode; }
int stablelm_quant_prefetch(void) { return quant_prefetch; }
#ifdef PFH
#define QPF(p) _mm_prefetch((const char*)(p), PFH)
#else
#define QPF(p)                                                                                         \
  do {                                                                                                 \
    if (quant_prefetch) _mm_prefetch((const char*)(p), _MM_HINT_T1);                                   \
    else _mm_prefetch((const char*)(p), _MM_HINT_T0);                                                  \
  } while (0)
#endif
#ifndef STREAMS
#define STREAMS 4
#endif
/* Rows of W each thread takes at a time in decoding (its streams lie in that span): long spans keep each
   stream reading on from where it was. Spans of 64 rows broke every stream after 16 rows; 1024 rows
   read int4 weights 1.9x as fast (27 -> 53 G weights/s cold on one thread of an AVX512-BF16 EPYC) and
   int8 1.14x, the same on AVX2 code (int8 1.16x, int4 unchanged). */
#ifndef ONE_ROW_CHUNK
#define ONE_ROW_CHUNK 1024
#endif
#define Q8U (STREAMS >= 4 ? 2 : 8 / STREAMS) /* sums per stream: 8 in all */
/* rows n0..n1 of W for M (<= 8) rows of x (float32, rows K apart), each row's sums as q8_one sums a lone
 * row (streams and leftover rows alike): two chains over alternate runs of VW inputs, a last run into the
 * first, the two added and their lanes summed, the last K % VW one by one, times the row's scale; row n
 * of x's row m to out[m * N + n - n0] (float32) */
static void q8_lone_rows(const float* xf, int M, int K, const int8_t* w, const float* s, int n0, int n1, float* out,
                         int N) {
  for (int n = n0; n < n1; n++) {
    const int8_t* r = w + (size_t)n * K;
    vf a0[8], a1[8];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = vzero();
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
      if ((k & 63) == 0) QPF(r + k + PFD);
      vf w0 = vload_i8(r + k), w1 = vload_i8(r + k + VW);
      for (int m = 0; m < M; m++) {
        a0[m] = vfma(w0, vload(xf + (size_t)m * K + k), a0[m]);
        a1[m] = vfma(w1, vload(xf + (size_t)m * K + k + VW), a1[m]);
      }
    }
    for (; k + VW <= K; k += VW) {
      vf w0 = vload_i8(r + k);
      for (int m = 0; m < M; m++) a0[m] = vfma(w0, vload(xf + (size_t)m * K + k), a0[m]);
    }
    for (int m = 0; m < M; m++) {
      float v = vsum(vadd(a0[m], a1[m]));
      for (int kk = k; kk < K; kk++) v += (float)r[kk] * xf[(size_t)m * K + kk];
      out[(size_t)m * N + (n - n0)] = v * s[n];
    }
  }
}

static void q8_one(const float* xf, int K, const int8_t* w, const float* s, int n0, int n1, float* out) {
  int len = (n1 - n0) / STREAMS, nr = n1 - n0 - len * STREAMS;
  for (int t = 0; t < len; t++) {
    const int8_t* r[STREAMS];
    vf acc[STREAMS][Q8U][1];
    enum { U = Q8U };
    for (int i = 0; i < STREAMS; i++) {
      r[i] = w + (size_t)(n0 + i * len + t) * K;
      for (int u = 0; u < U; u++) acc[i][u][0] = vzero();
    }
    int k = 0;
    for (; k + U * VW <= K; k += U * VW) {
      for (int i = 0; i < STREAMS; i++)
        for (int l = 0; l < U * VW; l += 64) QPF(r[i] + k + l + PFD);
      for (int u = 0; u < U; u++) {
        vf xv = vload(xf + k + u * VW);
        for (int i = 0; i < STREAMS; i++) acc[i][u][0] = vfma(vload_i8(r[i] + k + u * VW), xv, acc[i][u][0]);
      }
    }
    for (int i = 0; i < STREAMS; i++) {
      int kk = k;
      for (; kk + VW <= K; kk += VW) acc[i][0][0] = vfma(vload_i8(r[i] + kk), vload(xf + kk), acc[i][0][0]);
      vf a = acc[i][0][0];
      for (int u = 1; u < U; u++) a = vadd(a, acc[i][u][0]);
      float v = vsum(a);
      for (; kk < K; kk++) v += (float)r[i][kk] * xf[kk];
      out[i * len + t] = v * s[n0 + i * len + t];
    }
  }
  q8_lone_rows(xf, 1, K, w, s, n1 - nr, n1, out + (n1 - nr - n0), 0); /* the rows left over: the same sums */
}

/* One row's N outputs split into `parts` contiguous ranges of `per` (a multiple of 16), one per thread. */
static inline int one_row_split(int N, int threads, int* per) {
  int p = (N + threads - 1) / threads;
  *per = (p + 15) / 16 * 16;
  return (N + *per - 1) / *per;
}

static int x_to_i16(const float* xf, int K, int B, int bits, int16_t* x16, float* xinv);
#if !defined(__AVX512F__)
#define XB8 128
static void q8_one_i16(const float* xf, const int16_t* x16, const float* xinv, int K, const int8_t* w, const float* s,
                       int n0, int n1, float* out);
#endif

#if defined(__AVX512BF16__)
/* int4 to bfloat16: a group's 16 values (q * scale + minimum, rounded once) as a vpermw table */
static inline __m512i q4_bf16_table(uint16_t scale, uint16_t minimum) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 v = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(from_bf16(scale))), _mm512_set1_ps(from_bf16(minimum)));
  return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
}
/* one run of 64 inputs (32 bytes at q: low nibbles inputs 0-31, high 32-63) looked up in `table`, to o */
static inline void q4_bf16_run(const uint8_t* q, __m512i table, uint16_t* o) {
  const __m512i low = _mm512_set1_epi16(15);
  __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q));
  _mm512_storeu_si512(o, _mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table));
  _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
}
#endif

#include "quant_amx.h" /* 2 to 16 rows on AMX tiles (quant_amx) */

int stablelm_q8_linear(const void* x, int type, int M, int K, int ldx, void* y, int N, const int8_t* w,
                       const float* s, const void* b, int threads) {
  int batch = type & XBATCH, amx = type & XAMX, lone = type & XLONE;
  type &= ~(XBATCH | XAMX | XLONE);
  if (M <= 0 || K <= 0 || N <= 0 || (type != XF32 && type != XBF16) || ldx < K) return 2;
  if (lone && (M < 2 || M > 8 || batch || amx)) return 2;
#if !defined(__AVX512F__)
  if (lone && type == XBF16) return 2;
#endif
  if (lone) {
    float* xf = x_to_f32(x, type, M, K, ldx);
    float* o = (float*)malloc((size_t)M * N * sizeof(float));
    if (!xf || !o) {
      free(xf), free(o);
      return 1;
    }
    int per, parts = one_row_split(N, threads, &per);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int p = 0; p < parts; p++) {
      int n0 = p * per, n1 = n0 + per < N ? n0 + per : N;
      q8_lone_rows(xf, M, K, w, s, n0, n1, o + n0, N);
      for (int m = 0; m < M; m++)
        for (int j = n0; j < n1; j++)
          store_one(y, type, (int64_t)m * N + j, o[(size_t)m * N + j] + (b ? load_one(b, type, j) : 0.0f));
    }
    free(xf), free(o);
    return 0;
  }
  if (amx && type != XBF16) return 2;
#if !defined(QUANT_AMX)
  if (amx) return 2;
#else
  if (amx && !batch && M > 1 && M <= 16) {
    int status = quant_amx((const uint16_t*)x, M, K, ldx, y, N, w, s, NULL, NULL, 0, (const uint16_t*)b, threads);
    if (status >= 0) return status;
  }
#endif
  float* xf = x_to_f32(x, type, M, K, ldx);
  if (!xf) return 1;
  if (M == 1 && !batch) {
    int16_t* x16 = NULL;
    float* xinv = NULL;
#if !defined(__AVX512F__)
    if (type == XBF16) { /* AVX2: integer sums over int16 x (q8_one_i16) */
      x16 = (int16_t*)malloc((size_t)K * 2);
      xinv = (float*)malloc(((size_t)K / XB8 + 1) * sizeof(float));
      if (!x16 || !xinv) {
        free(xf), free(x16), free(xinv);
        return 1;
      }
      if (!x_to_i16(xf, K, XB8, 15, x16, xinv)) free(x16), x16 = NULL;
    }
#endif
    spans_t sp = {0, N};
#pragma omp parallel num_threads(threads)
    {
      float out[ONE_ROW_CHUNK];
      int c, c1;
      while (take_span(&sp, threads, 16, ONE_ROW_CHUNK, &c, &c1)) {
#if !defined(__AVX512F__)
        if (x16)
          q8_one_i16(xf, x16, xinv, K, w, s, c, c1, out);
        else
#endif
          q8_one(xf, K, w, s, c, c1, out);
        for (int j = c; j < c1; j++) store_one(y, type, j, out[j - c] + (b ? load_one(b, type, j) : 0.0f));
      }
    }
    free(xf), free(x16), free(xinv);
    return 0;
  }
  int blocks = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(blocks < threads ? blocks : threads) schedule(static)
  for (int blk = 0; blk < blocks; blk++) {
    int n0 = blk * NB, nn = N - n0 < NB ? N - n0 : NB;
    float out[NB][MRMAX];
    for (int m0 = 0; m0 < M; m0 += MRMAX) {
      int mr = M - m0 < MRMAX ? M - m0 : MRMAX;
      const float* xm = xf + (size_t)m0 * K;
      switch (mr) { /* constant row counts: the accumulators stay in registers */
        case 1: q8_block(xm, K, 1, w + (size_t)n0 * K, s + n0, nn, out); break;
#if MRMAX >= 2
        case 2: q8_block(xm, K, 2, w + (size_t)n0 * K, s + n0, nn, out); break;
#endif
#if MRMAX >= 4
        case 3: q8_block(xm, K, 3, w + (size_t)n0 * K, s + n0, nn, out); break;
        case 4: q8_block(xm, K, 4, w + (size_t)n0 * K, s + n0, nn, out); break;
#endif
      }
      for (int j = 0; j < nn; j++)
        for (int m = 0; m < mr; m++) {
          float v = out[j][m] + (b ? load_one(b, type, n0 + j) : 0.0f);
          store_one(y, type, (int64_t)(m0 + m) * N + n0 + j, v);
        }
    }
  }
  free(xf);
  return 0;
}

/* ---- int4 ------------------------------------------------------------------------------------------ */
/* sums of x over each group: xs[m * G + g] */
static void group_sums(const float* xf, int M, int K, int group, float* xs) {
  /* each group's sum in order from zero; eight groups' chains side by side (one chain waits on the
     adder's latency: ~3 us a call for K = 2560, paid once per layer per token while the other threads wait) */
  int G = K / group;
  for (int m = 0; m < M; m++) {
    const float* row = xf + (size_t)m * K;
    float* out = xs + (size_t)m * G;
    int g0 = 0;
    for (; g0 + 8 <= G; g0 += 8) {
      float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < group; k++)
        for (int j = 0; j < 8; j++) t[j] += row[(size_t)(g0 + j) * group + k];
      for (int j = 0; j < 8; j++) out[g0 + j] = t[j];
    }
    for (int g = g0; g < G; g++) {
      float t = 0.0f;
      for (int k = g * group; k < (g + 1) * group; k++) t += row[k];
      out[g] = t;
    }
  }
}

static inline __attribute__((always_inline)) void q4_block(const float* xf, const float* xs, int K, int group,
                                                           int mr, const uint8_t* w, const uint16_t* sc,
                                                           const uint16_t* mn, int nn, float out[NB][MRMAX]) {
  int G = K / group, half = K / 2;
  float acc[NB][MRMAX][VW] __attribute__((aligned(64)));
  for (int j = 0; j < NB; j++)
    for (int m = 0; m < MRMAX; m++) vstore(acc[j][m], vzero());
  for (int g = 0; g < G; g++) {
    vf ga[NB][MRMAX];
    for (int j = 0; j < NB; j++)
      for (int m = 0; m < MRMAX; m++) ga[j][m] = vzero();
    for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
      for (int c = 0; c < 32; c += VW) {
        vf xlo[MRMAX], xhi[MRMAX];
        for (int m = 0; m < MRMAX; m++)
          if (m < mr) {
            xlo[m] = vload(xf + (size_t)m * K + k0 + c);
            xhi[m] = vload(xf + (size_t)m * K + k0 + 32 + c);
          }
        if (c == 0 && (k0 & 127) == 0)
          for (int j = 0; j < NB; j++)
            _mm_prefetch((const char*)(w + (size_t)(NB + j) * half + k0 / 2), _MM_HINT_T0);
        for (int j = 0; j < NB; j++) {
          int row = j < nn ? j : 0;
          vf lo, hi;
          vload_u4(w + (size_t)row * half + k0 / 2 + c, &lo, &hi);
          for (int m = 0; m < MRMAX; m++)
            if (m < mr) ga[j][m] = vfma(hi, xhi[m], vfma(lo, xlo[m], ga[j][m]));
        }
      }
    }
    for (int j = 0; j < NB; j++) {
      vf sv = vset1(from_bf16(sc[(size_t)(j < nn ? j : 0) * G + g]));
      for (int m = 0; m < MRMAX; m++)
        if (m < mr) vstore(acc[j][m], vfma(ga[j][m], sv, vload(acc[j][m])));
    }
  }
  for (int j = 0; j < NB; j++)
    for (int m = 0; m < mr; m++) {
      float t = vsum(vload(acc[j][m]));
      if (j < nn)
        for (int g = 0; g < G; g++) t += from_bf16(mn[(size_t)j * G + g]) * xs[m * G + g];
      out[j][m] = j < nn ? t : 0.0f;
    }
}

#if defined(__AVX512F__)
static inline __m512 bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
#endif
#if defined(__AVX512BF16__)
/* x as bfloat16 pairs; the group's sums of x are those of the bfloat16 values, so 128 * sum cancels
   the offset exactly as the products were summed (up to float32 rounding). The scaled group sums are
   added to accumulators in memory (registers hold the groups' sums). */
static inline __attribute__((always_inline)) void q4_block_bf16(const uint16_t* xb, const float* xs, int K,
                                                                int group, int mr, const uint8_t* w,
                                                                const uint16_t* sc, const uint16_t* mn, int nn,
                                                                float out[NB][MRMAX]) {
  int G = K / group, half = K / 2;
  const __m512i low = _mm512_set1_epi16(15), bias = _mm512_set1_epi16(0x4300);
  const uint8_t* r[NB];
  for (int j = 0; j < NB; j++) r[j] = w + (size_t)(j < nn ? j : 0) * half;
  float accm[NB][MRMAX][16] __attribute__((aligned(64)));
  __m512 acc1[NB];
  for (int j = 0; j < NB; j++) {
    acc1[j] = _mm512_setzero_ps();
    for (int m = 0; m < MRMAX; m++) _mm512_store_ps(accm[j][m], _mm512_setzero_ps());
  }
  for (int g = 0; g < G; g++) {
    __m512 ga[NB][MRMAX], gb[NB];
    for (int j = 0; j < NB; j++) {
      gb[j] = _mm512_setzero_ps();
      for (int m = 0; m < MRMAX; m++) ga[j][m] = _mm512_setzero_ps();
    }
    for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
      __m512bh xlo[MRMAX], xhi[MRMAX];
      for (int m = 0; m < MRMAX; m++)
        if (m < mr) {
          xlo[m] = (__m512bh)_mm512_loadu_si512(xb + (size_t)m * K + k0);
          xhi[m] = (__m512bh)_mm512_loadu_si512(xb + (size_t)m * K + k0 + 32);
        }
      if ((k0 & 127) == 0)
        for (int j = 0; j < NB; j++) _mm_prefetch((const char*)(r[j] + (size_t)NB * half + k0 / 2), _MM_HINT_T0);
      for (int j = 0; j < NB; j++) {
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(r[j] + k0 / 2)));
        __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(bytes, low, bias, 0xEA); /* (a & b) | c */
        __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), bias);
        if (mr == 1) {
          ga[j][0] = _mm512_dpbf16_ps(ga[j][0], lo, xlo[0]);
          gb[j] = _mm512_dpbf16_ps(gb[j], hi, xhi[0]);
        } else
          for (int m = 0; m < MRMAX; m++)
            if (m < mr) ga[j][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ga[j][m], lo, xlo[m]), hi, xhi[m]);
      }
    }
    for (int j = 0; j < NB; j++) {
      __m512 sv = _mm512_set1_ps(from_bf16(sc[(size_t)(j < nn ? j : 0) * G + g]));
      if (mr == 1)
        acc1[j] = _mm512_fmadd_ps(_mm512_add_ps(ga[j][0], gb[j]), sv, acc1[j]);
      else
        for (int m = 0; m < MRMAX; m++)
          if (m < mr) _mm512_store_ps(accm[j][m], _mm512_fmadd_ps(ga[j][m], sv, _mm512_load_ps(accm[j][m])));
    }
  }
  for (int j = 0; j < NB; j++)
    for (int m = 0; m < mr; m++) {
      float t = _mm512_reduce_add_ps(mr == 1 ? acc1[j] : _mm512_load_ps(accm[j][m]));
      if (j < nn) { /* sum over groups of (min - 128 s) * (x summed), 16 groups at a time */
        __m512 c = _mm512_setzero_ps();
        for (int g = 0; g < G; g += 16) {
          __mmask16 live = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1u);
          __m512 sv = bf16x16(_mm256_maskz_loadu_epi16(live, sc + (size_t)j * G + g));
          __m512 mv = bf16x16(_mm256_maskz_loadu_epi16(live, mn + (size_t)j * G + g));
          __m512 xv = _mm512_maskz_loadu_ps(live, xs + m * G + g);
          c = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(128.0f), sv, mv), xv, c);
        }
        t += _mm512_reduce_add_ps(c);
      }
      out[j][m] = j < nn ? t : 0.0f;
    }
}
#endif

/* One row of x, float32 sums (AVX2, or float32 activations): as q4_block, Q4F rows far apart at once
   (see q8_one). */
#ifndef Q4F
#define Q4F (VW == 16 ? 4 : 3) /* AVX2 (16 registers): 3 measured faster than 2 or 4 */
#endif
static inline __attribute__((always_inline)) void q4_rows_f32(const float* xf, const float* xs, int K, int group,
                                                              const uint8_t* w, const uint16_t* sc, const uint16_t* mn,
                                                              const int S, const int* rows, float* out) {
  int G = K / group, half = K / 2;
  const uint8_t* r[Q4F];
  vf acc[Q4F];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * half, acc[i] = vzero();
  for (int g = 0; g < G; g++) {
    vf ga[Q4F][2];
    for (int i = 0; i < S; i++) ga[i][0] = ga[i][1] = vzero();
    for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64)
      for (int c = 0; c < 32; c += VW) {
        vf xlo = vload(xf + k0 + c), xhi = vload(xf + k0 + 32 + c);
        for (int i = 0; i < S; i++) {
          if (c == 0 && (k0 & 127) == 0) QPF(r[i] + k0 / 2 + PFD);
          vf lo, hi;
          vload_u4(r[i] + k0 / 2 + c, &lo, &hi);
          ga[i][0] = vfma(lo, xlo, ga[i][0]);
          ga[i][1] = vfma(hi, xhi, ga[i][1]);
        }
      }
    for (int i = 0; i < S; i++) acc[i] = vfma(vadd(ga[i][0], ga[i][1]), vset1(from_bf16(sc[(size_t)rows[i] * G + g])), acc[i]);
  }
  for (int i = 0; i < S; i++) {
    float t = vsum(acc[i]);
    for (int g = 0; g < G; g++) t += from_bf16(mn[(size_t)rows[i] * G + g]) * xs[g];
    out[i] = t;
  }
}

static void q4_one_f32(const float* xf, const float* xs, int K, int group, const uint8_t* w, const uint16_t* sc,
                       const uint16_t* mn, int n0, int n1, float* out) {
  int len = (n1 - n0) / Q4F;
  for (int t = 0; t < len; t++) {
    int rows[Q4F];
    float o[Q4F];
    for (int i = 0; i < Q4F; i++) rows[i] = n0 + i * len + t;
    q4_rows_f32(xf, xs, K, group, w, sc, mn, Q4F, rows, o);
    for (int i = 0; i < Q4F; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q4F; n < n1; n++) q4_rows_f32(xf, xs, K, group, w, sc, mn, 1, &n, out + (n - n0));
}

#include "quant_int.h" /* integer sums over x made int16: AVX2, AVX-VNNI, AVX512-VNNI */

/* mode: bits of the kernels the CPU can run, bfloat16 x only; 0: float32 sums (AVX2: q4_one_i16 for one
   row). 1: 2 to 8 rows by AVX512-BF16 sums (q4_block_bf16). 2: one row by VNNI integer sums (q4_one_vnni
   with AVX512-VNNI, q4_one_avxvnni with AVX-VNNI). Without the bits (or, for one row, with Inf or NaN in
   x), the float32 kernels. XAMX in `type` comes first (quant_amx). */
int stablelm_q4_linear(const void* x, int type, int M, int K, int ldx, void* y, int N, const uint8_t* w,
                       const uint16_t* sc, const uint16_t* mn, int group, const void* b, int mode, int threads) {
  int batch = type & XBATCH, amx = type & XAMX;
  type &= ~(XBATCH | XAMX);
  if (M <= 0 || K <= 0 || N <= 0 || (type != XF32 && type != XBF16) || ldx < K) return 2;
  if (group <= 0 || group % 64 || K % group) return 2;
  if (mode < 0 || mode > 3 || ((mode || amx) && type != XBF16)) return 2;
#if !defined(__AVX512BF16__)
  if (mode & 1) return 2;
#endif
#if !defined(QUANT_AMX)
  if (amx) return 2;
#else
  if (amx && !batch && M >= ((mode & 2) ? 4 : 2) && M <= 16) { /* 2-3 rows: q4_multi_vnni is faster */
    int status = quant_amx((const uint16_t*)x, M, K, ldx, y, N, w, NULL, sc, mn, group, (const uint16_t*)b, threads);
    if (status >= 0) return status;
  }
#endif
#if !defined(__AVX512F__) && !defined(HAVE_AVXVNNI)
  if (mode & 2) return 2;
#endif
  int G = K / group;
  float* xf = x_to_f32(x, type, M, K, ldx);
  float* xs = (float*)malloc((size_t)M * G * sizeof(float));
  uint16_t* xb = NULL;
  if (mode & 1) xb = (uint16_t*)malloc((size_t)M * K * 2);
  if (!xf || !xs || ((mode & 1) && !xb)) {
    free(xf), free(xs), free(xb);
    return 1;
  }
  group_sums(xf, M, K, group, xs);
  if (xb)
    for (int m = 0; m < M; m++) memcpy(xb + (size_t)m * K, (const uint16_t*)x + (size_t)m * ldx, (size_t)K * 2);
  int blocks = (N + NB - 1) / NB, half = K / 2;
  /* 2 to 8 rows by the one-row kernel's integer sums, each row as it alone gets them: VNNI (mode 2), and
     on AVX2 bfloat16 rows in groups of up to 256 (q4_one_i16's condition; before 2026-12-07 these took the
     float32 sums below, 1.5-1.7x slower at 2-4 rows of the 3B shape's layers on a Zen 3) */
#if defined(__AVX512F__)
  int int_rows = (mode & 2) != 0;
#else
  int int_rows = (mode & 2) || (type == XBF16 && group <= 256);
#endif
  if (int_rows && M > 1 && M <= 8) {
    int st = q4_linear_int_rows(xf, xs, M, K, y, N, w, sc, mn, group, b, mode, threads);
    free(xf), free(xs), free(xb);
    return st;
  }
  /* a lone row of a batch takes the one-row kernel: the same sums as in any batch */
  if (M == 1 && (!batch || int_rows)) {
    int16_t* x16 = NULL;
    float* xinv = NULL;
#if !defined(__AVX512F__)
    if (type == XBF16 && (group <= 256 || (mode & 2))) { /* AVX2: integer sums over x's two int8 digits */
      x16 = (int16_t*)malloc((size_t)K * 4);
      xinv = (float*)malloc((size_t)G * sizeof(float));
      if (!x16 || !xinv) {
        free(xf), free(xs), free(xb), free(x16), free(xinv);
        return 1;
      }
      if (x_to_i16(xf, K, group, 14, x16, xinv)) {
        int8_t *xh = (int8_t*)(x16 + K), *xl = xh + K; /* the digits after x16 */
        for (int k = 0; k < K; k++) {
          int l = ((x16[k] + 128) & 255) - 128;
          xl[k] = (int8_t)l, xh[k] = (int8_t)((x16[k] - l) / 256);
        }
      } else
        free(x16), x16 = NULL;
    }
#endif
#if defined(__AVX512F__)
    int8_t *vh = NULL, *vl = NULL; /* AVX512-VNNI: x's digits (q4_digits_vnni) */
    if (mode & 2) {
      int Kp = (K + 127) / 128 * 128;
      x16 = (int16_t*)malloc((size_t)K * 2 + (size_t)Kp * 2);
      xinv = (float*)malloc((size_t)G * sizeof(float));
      if (!x16 || !xinv) {
        free(xf), free(xs), free(xb), free(x16), free(xinv);
        return 1;
      }
      if (x_to_i16(xf, K, group, 14, x16, xinv)) { /* else (Inf or NaN in x) the other kernels */
        vh = (int8_t*)(x16 + K), vl = vh + Kp;
        q4_digits_vnni(x16, K, vh, vl);
      }
    }
#endif
    spans_t sp = {0, N};
#pragma omp parallel num_threads(threads)
    {
      float out[ONE_ROW_CHUNK];
      int c, c1;
      while (take_span(&sp, threads, 16, ONE_ROW_CHUNK, &c, &c1)) {
#if defined(__AVX512F__)
        if (vh)
          q4_one_vnni(vh, vl, xinv, xs, K, group, w, sc, mn, c, c1, out);
        else
#endif
#if defined(HAVE_AVXVNNI)
        if (x16 && (mode & 2))
          q4_one_avxvnni((const int8_t*)(x16 + K), (const int8_t*)(x16 + K) + K, xinv, xs, K, group, w, sc, mn, c, c1, out);
        else
#endif
#if !defined(__AVX512F__)
        if (x16)
          q4_one_i16((const int8_t*)(x16 + K), (const int8_t*)(x16 + K) + K, xinv, xs, K, group, w, sc, mn, c, c1, out);
        else
#endif
          q4_one_f32(xf, xs, K, group, w, sc, mn, c, c1, out);
        for (int j = c; j < c1; j++) store_one(y, type, j, out[j - c] + (b ? load_one(b, type, j) : 0.0f));
      }
    }
    free(xf), free(xs), free(xb), free(x16), free(xinv);
    return 0;
  }
#pragma omp parallel for num_threads(blocks < threads ? blocks : threads) schedule(static)
  for (int blk = 0; blk < blocks; blk++) {
    int n0 = blk * NB, nn = N - n0 < NB ? N - n0 : NB;
    const uint8_t* wb = w + (size_t)n0 * half;
    const uint16_t *sb = sc + (size_t)n0 * G, *mb = mn + (size_t)n0 * G;
    float out[NB][MRMAX];
    for (int m0 = 0; m0 < M; m0 += MRMAX) {
      int mr = M - m0 < MRMAX ? M - m0 : MRMAX;
      const float* xm = xf + (size_t)m0 * K;
      const float* xsm = xs + (size_t)m0 * G;
#if defined(__AVX512BF16__)
      if (mode & 1) {
        const uint16_t* xbm = xb + (size_t)m0 * K;
        switch (mr) {
          case 1: q4_block_bf16(xbm, xsm, K, group, 1, wb, sb, mb, nn, out); break;
          case 2: q4_block_bf16(xbm, xsm, K, group, 2, wb, sb, mb, nn, out); break;
          case 3: q4_block_bf16(xbm, xsm, K, group, 3, wb, sb, mb, nn, out); break;
          case 4: q4_block_bf16(xbm, xsm, K, group, 4, wb, sb, mb, nn, out); break;
        }
      } else
#endif
      {
        switch (mr) {
          case 1: q4_block(xm, xsm, K, group, 1, wb, sb, mb, nn, out); break;
#if MRMAX >= 2
          case 2: q4_block(xm, xsm, K, group, 2, wb, sb, mb, nn, out); break;
#endif
#if MRMAX >= 4
          case 3: q4_block(xm, xsm, K, group, 3, wb, sb, mb, nn, out); break;
          case 4: q4_block(xm, xsm, K, group, 4, wb, sb, mb, nn, out); break;
#endif
        }
      }
      for (int j = 0; j < nn; j++)
        for (int m = 0; m < mr; m++) {
          float v = out[j][m] + (b ? load_one(b, type, n0 + j) : 0.0f);
          store_one(y, type, (int64_t)(m0 + m) * N + n0 + j, v);
        }
    }
  }
  free(xf), free(xs), free(xb);
  return 0;
}

/* ---- dequantization: rows [n0, n1) into out ([n1 - n0, K], `type`), w = q * s (+ min), in float32,
   then one rounding (to nearest even) -------------------------------------------------------------- */
static inline void vstore_out(void* out, int type, int64_t i, vf v) {
  if (type == XF32) {
    vstore((float*)out + i, v);
    return;
  }
#if VW == 16
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#else
  __m256i u = _mm256_castps_si256(v);
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  u = _mm256_srli_epi32(u, 16);
  __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128((__m128i*)((uint16_t*)out + i), h);
#endif
}

int stablelm_q8_dequant(const int8_t* w, const float* s, int K, int n0, int n1, void* out, int type, int threads) {
  if (K <= 0 || n0 < 0 || n1 < n0 || (type != XF32 && type != XBF16)) return 2;
  int rows = n1 - n0;
#pragma omp parallel for num_threads(rows < threads ? (rows > 0 ? rows : 1) : threads) schedule(static)
  for (int r = 0; r < rows; r++) {
    const int8_t* q = w + (size_t)(n0 + r) * K;
    float sr = s[n0 + r];
    int k = 0;
#if defined(__AVX512BF16__)
    if (type == XBF16)
      for (; k + VW <= K; k += VW)
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + (int64_t)r * K + k), (__m256i)_mm512_cvtneps_pbh(vmul(vload_i8(q + k), vset1(sr))));
#endif
    for (; k + VW <= K; k += VW) vstore_out(out, type, (int64_t)r * K + k, vmul(vload_i8(q + k), vset1(sr)));
    for (; k < K; k++) store_one(out, type, (int64_t)r * K + k, (float)q[k] * sr);
  }
  return 0;
}

int stablelm_q4_dequant(const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int group, int K, int n0, int n1,
                        void* out, int type, int threads) {
  if (K <= 0 || n0 < 0 || n1 < n0 || group <= 0 || group % 64 || K % group || (type != XF32 && type != XBF16))
    return 2;
  int rows = n1 - n0, G = K / group;
#pragma omp parallel for num_threads(rows < threads ? (rows > 0 ? rows : 1) : threads) schedule(static)
  for (int r = 0; r < rows; r++) {
    const uint8_t* q = w + (size_t)(n0 + r) * (K / 2);
    const uint16_t *sr = sc + (size_t)(n0 + r) * G, *mr = mn + (size_t)(n0 + r) * G;
#if defined(__AVX512BF16__)
    if (type == XBF16) { /* per group, the 16 values as bfloat16 (rounded once), looked up with vpermw */
      uint16_t* o = (uint16_t*)out + (int64_t)r * K;
      for (int g = 0; g < G; g++) {
        __m512i table = q4_bf16_table(sr[g], mr[g]);
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) q4_bf16_run(q + k0 / 2, table, o + k0);
      }
      continue;
    }
#endif
    for (int k0 = 0; k0 < K; k0 += 64) {
      vf sv = vset1(from_bf16(sr[k0 / group])), mv = vset1(from_bf16(mr[k0 / group]));
      for (int c = 0; c < 32; c += VW) {
        vf lo, hi;
        vload_u4(q + k0 / 2 + c, &lo, &hi);
        vstore_out(out, type, (int64_t)r * K + k0 + c, vadd(vmul(lo, sv), mv));
        vstore_out(out, type, (int64_t)r * K + k0 + 32 + c, vadd(vmul(hi, sv), mv));
      }
    }
  }
  return 0;
}

/* whether the AVX512-BF16 int4 kernels (mode 1) were compiled in */
int stablelm_q4_has_bf16(void) {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

/* y (M x N) = x (M rows of K, ldx apart) @ dequant(W)^T + b, x, y and b bfloat16, on AMX-BF16 tiles (prefill,
   quant_prefill_amx): int8 with s (group 0), int4 with sc, mn, group. -1 where it cannot run here (not compiled
   in, K not a multiple of 32, Linux refused the tiles): then dequantize and multiply. */
int stablelm_quant_prefill(const void* x, int M, int K, int ldx, void* y, int N, const void* w, const float* s,
                           const uint16_t* sc, const uint16_t* mn, int group, const void* b, int threads) {
  if (M <= 0 || K <= 0 || N <= 0 || ldx < K || threads <= 0) return 2;
  if (group && (group % 64 || K % group)) return 2;
#if defined(QUANT_AMX_BF16)
  return quant_prefill_amx((const uint16_t*)x, M, K, ldx, (uint16_t*)y, N, w, s, sc, mn, group, (const uint16_t*)b,
                           threads);
#else
  return -1;
#endif
}

/* whether the AMX-BF16 prefill kernel (stablelm_quant_prefill) was compiled in */
int stablelm_quant_has_amx_bf16(void) {
#if defined(QUANT_AMX_BF16)
  return 1;
#else
  return 0;
#endif
}

/* whether the AMX kernels (XAMX) were compiled in */
int stablelm_quant_has_amx(void) {
#if defined(QUANT_AMX)
  return 1;
#else
  return 0;
#endif
}

/* whether the VNNI int4 kernel (mode 2: AVX512-VNNI at the avx512 level, AVX-VNNI at avx2) was compiled in */
int stablelm_q4_has_vnni(void) {
#if defined(__AVX512F__) || defined(HAVE_AVXVNNI)
  return 1;
#else
  return 0;
#endif
}

#include "quant_screen.h" /* the int8 screen of a bfloat16 LM head (greedy decoding) */
