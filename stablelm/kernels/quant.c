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
 * Kernels (one source, compiled per instruction set like linear.c: VW = 16 floats with AVX-512, 8 with
 * AVX2):
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
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) xf[(size_t)m * K + k] = load_one(x, type, (int64_t)m * ldx + k);
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
#ifndef PFH
#define PFH _MM_HINT_T0
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
        for (int l = 0; l < U * VW; l += 64) _mm_prefetch((const char*)(r[i] + k + l + PFD), PFH);
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
  for (int n = n1 - nr; n < n1; n++) { /* the rows left over */
    const int8_t* r = w + (size_t)n * K;
    vf a0 = vzero(), a1 = vzero();
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
      a0 = vfma(vload_i8(r + k), vload(xf + k), a0);
      a1 = vfma(vload_i8(r + k + VW), vload(xf + k + VW), a1);
    }
    for (; k + VW <= K; k += VW) a0 = vfma(vload_i8(r + k), vload(xf + k), a0);
    float v = vsum(vadd(a0, a1));
    for (; k < K; k++) v += (float)r[k] * xf[k];
    out[n - n0] = v * s[n];
  }
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

/* ---- AMX, 2 to 16 rows of bfloat16 x (batches in decoding): integer tiles of the quantized weight -----
   The kernels of several rows above spend float32 FMAs (or vdpbf16ps) per weight and row, so 8 rows ran
   at a third to a half of bf16's speed. Here x is made int16 per block (x_to_i16, 14 bits, a power-of-two
   scale per block: int8 128 inputs, int4 a group; the rounding of AVX2's and VNNI's one-row kernels) and
   split into two int8 digits, x = 256 h + l, laid out as AMX's B tiles (per 64 k, 16 quads x M rows); W's
   tiles (16 outputs x 64 k) are int8 as they lie in memory (TDPBSSD: signed x signed) or int4's nibbles
   written as bytes (TDPBUSD: unsigned x signed), so no weight is converted to a float. Each block's int32
   tiles (h's, l's) are stored, 256 h + l converted, times x's scale (int4: and the group's scale) added up
   in float32; int8 times s[n] at the end, int4 plus the minimum's share (min_g * sum of the group's x).
   Every output is computed alone: its bits do not depend on the row count or the row's place. Each block
   prefetches the next block's weights as it reads its own (+32% for int8 over prefetching 2 KB ahead on a
   2-core Xeon). Used where the caller asks (XAMX in `type`: the CPU has AMX-INT8) for 2 to 16 rows, not
   for batches (XBATCH: their lone rows would have to take it too, and one row runs at 0.7-0.9x of the
   kernels of several rows on AMX); where Linux refuses the tiles, the other kernels run. */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define QUANT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) qtilecfg_t;

static int q_amx_permitted(void) { /* Linux asks each process to request the tiles' state once */
  static int state; /* 0 not asked, 1 granted, -1 refused */
  if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
  return state > 0;
}

static void q_tiles_config(int M) {
  qtilecfg_t cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 5; t++) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(M * 4);
  cfg.colsb[1] = 64; /* A: 16 weight rows x 64 k; C (0: h, 3: l): 16 outputs x M int32; B (2: h, 4: l) */
  _tile_loadconfig(&cfg);
}

/* int32 tiles ch, cl (16 x M, rows 64 bytes apart) of one block: tot[n][m] += (256 ch + cl) * f[m] * (sc ?
   sc[n] : 1), tot's rows 16 floats apart. (Rows M elements apart overlapped within 64 bytes, and a masked
   load waits for an overlapping masked store to be written: 16 such waits in a row made the whole kernel
   three times slower.) */
static inline void q_amx_flush(const int32_t* ch, const int32_t* cl, int M, int nn, const float* f, const float* sc,
                               float* tot) {
  __mmask16 cols = M == 16 ? (__mmask16)0xffff : (__mmask16)((1u << M) - 1u);
  __m512 fv = _mm512_maskz_loadu_ps(cols, f);
  for (int n = 0; n < nn; n++) {
    __m512i h = _mm512_load_si512(ch + n * 16), l = _mm512_load_si512(cl + n * 16);
    __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), l));
    __m512 scale = sc ? _mm512_mul_ps(fv, _mm512_set1_ps(sc[n])) : fv;
    _mm512_store_ps(tot + n * 16, _mm512_fmadd_ps(v, scale, _mm512_load_ps(tot + n * 16)));
  }
}

/* outputs [0, nn) (nn <= 16) of one block; xh, xl: B tiles per 64 k (16 x M x 4 bytes); xf[b][m]: x's
   scale of block b (B inputs) for row m; out[n * M + m] */
static void q8_block_amx(const int8_t* xh, const int8_t* xl, const float* xf, int M, int K, int B, const int8_t* w,
                         const float* s, int nn, float* out) {
  int8_t edge[16 * 64] __attribute__((aligned(64)));
  int32_t ch[16 * 16] __attribute__((aligned(64))), cl[16 * 16] __attribute__((aligned(64)));
  float tot[16 * 16] __attribute__((aligned(64)));
  memset(tot, 0, sizeof(tot));
  int steps = (K + 63) / 64, per = B / 64;
  for (int b0 = 0; b0 < steps; b0 += per) {
    _tile_zero(0);
    _tile_zero(3);
    for (int t = b0; t < b0 + per && t < steps; t++) {
      int k = t * 64;
      if (nn == 16 && k + 64 <= K) {
        for (int r = 16; r < 32; r++) _mm_prefetch((const char*)(w + (int64_t)r * K + k), PFH); /* next block */
        _tile_loadd(1, w + k, K);
      } else { /* the block's edge: rows past nn and k past K read as zeros */
        memset(edge, 0, sizeof(edge));
        int kn = K - k < 64 ? K - k : 64;
        for (int r = 0; r < nn; r++) memcpy(edge + 64 * r, w + (int64_t)r * K + k, (size_t)kn);
        _tile_loadd(1, edge, 64);
      }
      _tile_loadd(2, xh + (int64_t)t * 64 * M, M * 4);
      _tile_loadd(4, xl + (int64_t)t * 64 * M, M * 4);
      _tile_dpbssd(0, 1, 2);
      _tile_dpbssd(3, 1, 4);
    }
    _tile_stored(0, ch, 64);
    _tile_stored(3, cl, 64);
    q_amx_flush(ch, cl, M, nn, xf + (int64_t)(b0 / per) * M, NULL, tot);
  }
  for (int n = 0; n < nn; n++)
    for (int m = 0; m < M; m++) out[n * M + m] = tot[n * 16 + m] * s[n];
}

static void q4_block_amx(const int8_t* xh, const int8_t* xl, const float* xf, const float* xs, int M, int K,
                         int group, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int nn, float* out) {
  uint8_t a[2][16 * 64] __attribute__((aligned(64)));
  int32_t ch[16 * 16] __attribute__((aligned(64))), cl[16 * 16] __attribute__((aligned(64)));
  float tot[16 * 16] __attribute__((aligned(64))), sg[16];
  const __m256i low = _mm256_set1_epi8(15);
  int G = K / group, half = K / 2, per = group / 64;
  memset(a, 0, sizeof(a)); /* rows past nn stay zero */
  memset(tot, 0, sizeof(tot));
  for (int g = 0; g < G; g++) {
    _tile_zero(0);
    _tile_zero(3);
    for (int t = g * per; t < (g + 1) * per; t++) { /* a run of 64 k: the low nibbles are k 0-31, high 32-63 */
      uint8_t* at = a[t & 1];
      for (int r = 0; r < nn; r++) {
        const uint8_t* q = w + (int64_t)r * half + t * 32;
        if ((t & 1) == 0) _mm_prefetch((const char*)(q + 16 * half), PFH); /* the next block's row */
        __m256i v = _mm256_loadu_si256((const __m256i*)q);
        _mm256_store_si256((__m256i*)(at + 64 * r), _mm256_and_si256(v, low));
        _mm256_store_si256((__m256i*)(at + 64 * r + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
      }
      _tile_loadd(1, at, 64);
      _tile_loadd(2, xh + (int64_t)t * 64 * M, M * 4);
      _tile_loadd(4, xl + (int64_t)t * 64 * M, M * 4);
      _tile_dpbusd(0, 1, 2);
      _tile_dpbusd(3, 1, 4);
    }
    _tile_stored(0, ch, 64);
    _tile_stored(3, cl, 64);
    for (int n = 0; n < nn; n++) sg[n] = from_bf16(sc[(int64_t)n * G + g]);
    q_amx_flush(ch, cl, M, nn, xf + (int64_t)g * M, sg, tot);
  }
  for (int n = 0; n < nn; n++)
    for (int m = 0; m < M; m++) {
      float t = tot[n * 16 + m];
      for (int g = 0; g < G; g++) t += from_bf16(mn[(int64_t)n * G + g]) * xs[(int64_t)m * G + g];
      out[n * M + m] = t;
    }
}

/* the AMX path of stablelm_q8_linear / stablelm_q4_linear (q4: sc, mn, group set; q8: s set); returns -1
   where it cannot run (no tiles, Inf or NaN in x: then the caller's other kernels run), else a status */
static int quant_amx(const uint16_t* x, int M, int K, int ldx, void* y, int N, const void* w, const float* s,
                     const uint16_t* sc, const uint16_t* mn, int group, const uint16_t* b, int threads) {
  if (M < 1 || M > 16 || !q_amx_permitted()) return -1;
  int B = group ? group : 128, nb = (K + B - 1) / B, steps = (K + 63) / 64, G = group ? K / group : 0;
  size_t tiles = (size_t)steps * 64 * M; /* bytes of one digit's B tiles */
  int8_t* xq = (int8_t*)_mm_malloc(2 * tiles, 64);
  float* xf = (float*)malloc(((size_t)nb * M + (size_t)M * G + (size_t)K + nb) * sizeof(float));
  int16_t* x16 = (int16_t*)malloc((size_t)K * 2);
  if (!xq || !xf || !x16) {
    _mm_free(xq), free(xf), free(x16);
    return 1;
  }
  float *xs = xf + (size_t)nb * M, *row = xs + (size_t)M * G, *inv = row + K;
  memset(xq, 0, 2 * tiles);
  int status = 0;
  for (int m = 0; m < M && !status; m++) {
    for (int k = 0; k < K; k++) row[k] = from_bf16(x[(int64_t)m * ldx + k]);
    if (!x_to_i16(row, K, B, 14, x16, inv)) {
      status = -1; /* Inf or NaN */
      break;
    }
    for (int i = 0; i < nb; i++) xf[(size_t)i * M + m] = inv[i];
    for (int g = 0; g < G; g++) { /* sums of x over each group, in float32 in order (as group_sums) */
      float t = 0.0f;
      for (int k = g * group; k < (g + 1) * group; k++) t += row[k];
      xs[m * G + g] = t;
    }
    for (int k = 0; k < K; k++) { /* B tiles: step k / 64, tile row (k % 64) / 4, column m, byte k % 4 */
      int v = x16[k], l = ((v + 128) & 255) - 128;
      size_t at = ((size_t)(k / 64) * 16 + (k % 64) / 4) * M * 4 + (size_t)m * 4 + k % 4;
      xq[at] = (int8_t)((v - l) / 256), xq[tiles + at] = (int8_t)l;
    }
  }
  if (status) {
    _mm_free(xq), free(xf), free(x16);
    return status;
  }
  int blocks = (N + 15) / 16;
#pragma omp parallel num_threads(blocks < threads ? blocks : threads)
  {
    q_tiles_config(M);
    float out[16 * 16];
#pragma omp for schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
      int n0 = blk * 16, nn = N - n0 < 16 ? N - n0 : 16;
      if (group)
        q4_block_amx(xq, xq + tiles, xf, xs, M, K, group, (const uint8_t*)w + (int64_t)n0 * (K / 2),
                     sc + (int64_t)n0 * G, mn + (int64_t)n0 * G, nn, out);
      else
        q8_block_amx(xq, xq + tiles, xf, M, K, B, (const int8_t*)w + (int64_t)n0 * K, s + n0, nn, out);
      for (int n = 0; n < nn; n++)
        for (int m = 0; m < M; m++)
          store_one(y, XBF16, (int64_t)m * N + n0 + n, out[n * M + m] + (b ? from_bf16(b[n0 + n]) : 0.0f));
    }
    _tile_release();
  }
  _mm_free(xq), free(xf), free(x16);
  return 0;
}
#endif

int stablelm_q8_linear(const void* x, int type, int M, int K, int ldx, void* y, int N, const int8_t* w,
                       const float* s, const void* b, int threads) {
  int batch = type & XBATCH, amx = type & XAMX;
  type &= ~(XBATCH | XAMX);
  if (M <= 0 || K <= 0 || N <= 0 || (type != XF32 && type != XBF16) || ldx < K) return 2;
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
    int per, parts = one_row_split(N, threads, &per);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int p = 0; p < parts; p++) {
      int n0 = p * per, n1 = n0 + per < N ? n0 + per : N;
      float out[ONE_ROW_CHUNK];
      for (int c = n0; c < n1; c += ONE_ROW_CHUNK) {
        int c1 = c + ONE_ROW_CHUNK < n1 ? c + ONE_ROW_CHUNK : n1;
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
  int G = K / group;
  for (int m = 0; m < M; m++)
    for (int g = 0; g < G; g++) {
      float t = 0.0f;
      for (int k = g * group; k < (g + 1) * group; k++) t += xf[(size_t)m * K + k];
      xs[m * G + g] = t;
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
          if (c == 0 && (k0 & 127) == 0) _mm_prefetch((const char*)(r[i] + k0 / 2 + PFD), PFH);
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

/* x16[k] = x[k] * 2^(bits - e), e of each block of B: 2^(e - 1) <= max |x| < 2^e (clamped for tiny
   blocks), so |x16| < 2^bits; xinv[b] = 2^(e - bits). Returns 0 when x holds Inf or NaN (then the float32
   kernels run). */
static int x_to_i16(const float* xf, int K, int B, int bits, int16_t* x16, float* xinv) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int b0 = 0, b = 0; b0 < K; b0 += B, b++) {
    int b1 = b0 + B < K ? b0 + B : K, k = b0;
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (; k + 8 <= b1; k += 8) {
      __m256 v = _mm256_loadu_ps(xf + k);
      m = _mm256_max_ps(m, _mm256_and_ps(v, absmask));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], mx = 0.0f;
    _mm256_storeu_ps(lanes, m);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; k < b1; k++) {
      float a = xf[k] < 0 ? -xf[k] : xf[k];
      if (a != a) return 0;
      mx = a > mx ? a : mx;
    }
    if (_mm256_movemask_ps(bad) || !(mx <= 3.4028235e38f)) return 0;
    uint32_t u;
    memcpy(&u, &mx, 4);
    int e = (int)(u >> 23) - 126; /* mx in [2^(e-1), 2^e) for normal mx */
    if (e < -110) e = -110;
    uint32_t su = (uint32_t)(bits - e + 127) << 23, iu = (uint32_t)(e - bits + 127) << 23;
    float scale;
    memcpy(&scale, &su, 4);
    memcpy(xinv + b, &iu, 4);
    __m256 sv = _mm256_set1_ps(scale);
    for (k = b0; k + 16 <= b1; k += 16) {
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xf + k), sv));
      __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xf + k + 8), sv));
      _mm256_storeu_si256((__m256i*)(x16 + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
    }
    for (; k < b1; k++) {
      int q = _mm_cvtss_si32(_mm_set_ss(xf[k] * scale));
      x16[k] = (int16_t)(q > 32767 ? 32767 : q < -32767 ? -32767 : q);
    }
  }
  return 1;
}

#if !defined(__AVX512F__)
/* ---- AVX2, one row of bfloat16 x (decoding): integer sums over int16 x ------------------------------
   On AVX2 CPUs, converting each weight to float32 (vcvtdq2ps, or the nibbles' and/shift) with an FMA per
   8 weights kept the one-row kernels far below the memory's speed (AMD EPYC, Zen 1, one thread: int8 5.8,
   int4 5.1 G weights/s, where the memory reads ~11 GB/s; docs/quantization.md). Here x is made int16 once
   per call, in blocks (int4: a group; int8: XB8 inputs) with a power-of-two scale each, the weights are
   multiplied as integers (int8: vpmaddwd on int16 x, 3 instructions per 16 weights; int4: vpmaddubsw on x's
   two int8 digits, 11 per 64 weights) into int32 sums, and each block's sum is converted to float32 and
   scaled once. A power-of-two scale keeps a bfloat16's 8 significant bits: every x within 2^7 (int4: 2^6)
   of its block's largest is exact, smaller ones are rounded to 2^-16 (int4: 2^-15) of that largest, well
   below the output's bfloat16 rounding. Float32 x keeps the float32 kernels. */
/* int8, S rows (streams) of W at once, each block of XB8 inputs summed in int32 (at most
   XB8 * 127 * 32767 < 2^31), the tail of fewer than 16 inputs in float32 */
#ifndef Q8I
#define Q8I 4
#endif
static inline __attribute__((always_inline)) void q8_rows_i16(const float* xf, const int16_t* x16, const float* xinv,
                                                              int K, const int8_t* w, const float* s, const int S,
                                                              const int* rows, float* out) {
  const int8_t* r[Q8I];
  __m256 acc[Q8I];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * K, acc[i] = _mm256_setzero_ps();
  int K16 = K / 16 * 16;
  for (int b0 = 0; b0 < K16; b0 += XB8) {
    int b1 = b0 + XB8 < K16 ? b0 + XB8 : K16;
    __m256i ia[Q8I];
    for (int i = 0; i < S; i++) ia[i] = _mm256_setzero_si256();
    int k = b0;
    for (; k + 32 <= b1; k += 32) {
      __m256i x0 = _mm256_loadu_si256((const __m256i*)(x16 + k)), x1 = _mm256_loadu_si256((const __m256i*)(x16 + k + 16));
      for (int i = 0; i < S; i++) {
        if ((k & 63) == 0) _mm_prefetch((const char*)(r[i] + k + PFD), PFH);
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r[i] + k)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r[i] + k + 16)));
        ia[i] = _mm256_add_epi32(ia[i], _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)));
      }
    }
    for (; k < b1; k += 16) {
      __m256i x0 = _mm256_loadu_si256((const __m256i*)(x16 + k));
      for (int i = 0; i < S; i++)
        ia[i] = _mm256_add_epi32(ia[i], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(r[i] + k))), x0));
    }
    __m256 xv = _mm256_set1_ps(xinv[b0 / XB8]);
    for (int i = 0; i < S; i++) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i]), xv, acc[i]);
  }
  for (int i = 0; i < S; i++) {
    float v = vsum(acc[i]);
    for (int k = K16; k < K; k++) v += (float)r[i][k] * xf[k];
    out[i] = v * s[rows[i]];
  }
}

static void q8_one_i16(const float* xf, const int16_t* x16, const float* xinv, int K, const int8_t* w, const float* s,
                       int n0, int n1, float* out) {
  int len = (n1 - n0) / Q8I;
  for (int t = 0; t < len; t++) {
    int rows[Q8I];
    float o[Q8I];
    for (int i = 0; i < Q8I; i++) rows[i] = n0 + i * len + t;
    q8_rows_i16(xf, x16, xinv, K, w, s, Q8I, rows, o);
    for (int i = 0; i < Q8I; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q8I; n < n1; n++) q8_rows_i16(xf, x16, xinv, K, w, s, 1, &n, out + (n - n0));
}

/* AVX2's int4 one-row kernels end: acc plus the minimum's share, the sum over groups of min_g * (x summed),
   8 groups at once, then the lanes summed */
static inline float q4_min_share8(__m256 acc, const uint16_t* mr, const float* xs, int G) {
  int g = 0;
  for (; g + 8 <= G; g += 8) {
    __m256 mv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(mr + g))), 16));
    acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xs + g), acc);
  }
  float t = vsum(acc);
  for (; g < G; g++) t += from_bf16(mr[g]) * xs[g];
  return t;
}

/* int4, S rows at once. x (made int16 below 2^14 in magnitude by x_to_i16 with bits = 14) as two int8
   digits, x = 256 h + l (h in -64..64, l in -128..127), so that vpmaddubsw multiplies the nibbles as bytes
   (unsigned) by either digit, 32 at once, summing pairs into int16 (at most 2 * 15 * 128: no saturation):
   per 32 bytes (64 weights) an and, a shift and an and, four vpmaddubsw and four int16 additions. A
   group's int16 sums stay below 2^15 for groups of up to 256 (the caller's condition); at its end they
   are widened with vpmaddwd (h's by 256), converted and scaled by s_g * xinv_g. */
#ifndef Q4I
#define Q4I 1
#endif
static inline __attribute__((always_inline)) void q4_rows_i16(const int8_t* xh, const int8_t* xl, const float* xinv,
                                                              const float* xs, int K, int group, const uint8_t* w,
                                                              const uint16_t* sc, const uint16_t* mn, const int S,
                                                              const int* rows, float* out) {
  int G = K / group, half = K / 2;
  const __m256i low = _mm256_set1_epi8(15);
  const uint8_t* r[Q4I];
  __m256 acc[Q4I];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * half, acc[i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    __m256i ah[Q4I], al[Q4I];
    for (int i = 0; i < S; i++) ah[i] = al[i] = _mm256_setzero_si256();
    const int8_t *hp = xh + (size_t)g * group, *lp = xl + (size_t)g * group;
    for (int j = 0; j < group; j += 64, hp += 64, lp += 64) {
      __m256i h0 = _mm256_loadu_si256((const __m256i*)hp), h1 = _mm256_loadu_si256((const __m256i*)(hp + 32));
      __m256i l0 = _mm256_loadu_si256((const __m256i*)lp), l1 = _mm256_loadu_si256((const __m256i*)(lp + 32));
      for (int i = 0; i < S; i++) {
        const uint8_t* p = r[i] + ((size_t)g * group + j) / 2;
        if ((j & 127) == 0) _mm_prefetch((const char*)(p + PFD), PFH);
        __m256i v = _mm256_loadu_si256((const __m256i*)p);
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        ah[i] = _mm256_add_epi16(_mm256_add_epi16(ah[i], _mm256_maddubs_epi16(lo, h0)), _mm256_maddubs_epi16(hi, h1));
        al[i] = _mm256_add_epi16(_mm256_add_epi16(al[i], _mm256_maddubs_epi16(lo, l0)), _mm256_maddubs_epi16(hi, l1));
      }
    }
    for (int i = 0; i < S; i++) {
      __m256i t = _mm256_add_epi32(_mm256_madd_epi16(ah[i], _mm256_set1_epi16(256)), _mm256_madd_epi16(al[i], _mm256_set1_epi16(1)));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(from_bf16(sc[(size_t)rows[i] * G + g]) * xinv[g]), acc[i]);
    }
  }
  for (int i = 0; i < S; i++) out[i] = q4_min_share8(acc[i], mn + (size_t)rows[i] * G, xs, G);
}

static void q4_one_i16(const int8_t* xh, const int8_t* xl, const float* xinv, const float* xs, int K, int group,
                       const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1, float* out) {
  int len = (n1 - n0) / Q4I;
  for (int t = 0; t < len; t++) {
    int rows[Q4I];
    float o[Q4I];
    for (int i = 0; i < Q4I; i++) rows[i] = n0 + i * len + t;
    q4_rows_i16(xh, xl, xinv, xs, K, group, w, sc, mn, Q4I, rows, o);
    for (int i = 0; i < Q4I; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q4I; n < n1; n++) q4_rows_i16(xh, xl, xinv, xs, K, group, w, sc, mn, 1, &n, out + (n - n0));
}

/* AVX-VNNI (256-bit vpdpbusd; Intel's Core CPUs since Alder Lake, which have no AVX-512): int4 as
   q4_rows_i16, the same digits, but each vpdpbusd multiplies 32 nibbles (unsigned) by a digit (signed) and
   sums 4 products into each int32 lane: per 32 bytes (64 weights) an and, a shift and an and, four
   vpdpbusd, where vpmaddubsw needs four int16 additions beside. The group's int32 sums (h's shifted by 8,
   plus l's) are converted and scaled once per group. Compiled for AVX-VNNI by attribute (GCC 11, Clang 12
   and later; older compilers build the library without it) and called only where the CPU has the flag. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define HAVE_AVXVNNI 1
#define AVXVNNI_FN __attribute__((target("avxvnni")))
#ifndef Q4A
#define Q4A 3
#endif
static inline __attribute__((always_inline)) AVXVNNI_FN void q4_rows_avxvnni(
    const int8_t* xh, const int8_t* xl, const float* xinv, const float* xs, int K, int group, const uint8_t* w,
    const uint16_t* sc, const uint16_t* mn, const int S, const int* rows, float* out) {
  int G = K / group, half = K / 2;
  const __m256i low = _mm256_set1_epi8(15);
  const uint8_t* r[Q4A];
  __m256 acc[Q4A];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * half, acc[i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    __m256i ah[Q4A], al[Q4A];
    for (int i = 0; i < S; i++) ah[i] = al[i] = _mm256_setzero_si256();
    const int8_t *hp = xh + (size_t)g * group, *lp = xl + (size_t)g * group;
    for (int j = 0; j < group; j += 64, hp += 64, lp += 64) {
      __m256i h0 = _mm256_loadu_si256((const __m256i*)hp), h1 = _mm256_loadu_si256((const __m256i*)(hp + 32));
      __m256i l0 = _mm256_loadu_si256((const __m256i*)lp), l1 = _mm256_loadu_si256((const __m256i*)(lp + 32));
      for (int i = 0; i < S; i++) {
        const uint8_t* q = r[i] + ((size_t)g * group + j) / 2;
        if ((j & 127) == 0) _mm_prefetch((const char*)(q + PFD), PFH);
        __m256i v = _mm256_loadu_si256((const __m256i*)q);
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        ah[i] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(ah[i], lo, h0), hi, h1);
        al[i] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(al[i], lo, l0), hi, l1);
      }
    }
    for (int i = 0; i < S; i++) {
      __m256i t = _mm256_add_epi32(_mm256_slli_epi32(ah[i], 8), al[i]);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(from_bf16(sc[(size_t)rows[i] * G + g]) * xinv[g]), acc[i]);
    }
  }
  for (int i = 0; i < S; i++) out[i] = q4_min_share8(acc[i], mn + (size_t)rows[i] * G, xs, G);
}

static AVXVNNI_FN void q4_one_avxvnni(const int8_t* xh, const int8_t* xl, const float* xinv, const float* xs, int K,
                                      int group, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0,
                                      int n1, float* out) {
  int len = (n1 - n0) / Q4A;
  for (int t = 0; t < len; t++) {
    int rows[Q4A];
    float o[Q4A];
    for (int i = 0; i < Q4A; i++) rows[i] = n0 + i * len + t;
    q4_rows_avxvnni(xh, xl, xinv, xs, K, group, w, sc, mn, Q4A, rows, o);
    for (int i = 0; i < Q4A; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q4A; n < n1; n++)
    q4_rows_avxvnni(xh, xl, xinv, xs, K, group, w, sc, mn, 1, &n, out + (n - n0));
}

/* 2 to 8 rows of x, each through q4_rows_avxvnni itself (Q4A rows of W at a time, read again from the
   cache for each row of x): every row gets the one-row kernel's bits whatever rows share the call. */
static AVXVNNI_FN void q4_multi_avxvnni(const int8_t* dig, int Kp, const float* xinv, const float* xs, int K, int group,
                                       const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1, int M,
                                       float* out) {
  int G = K / group, rows[Q4A];
  float o[Q4A];
  for (int n = n0; n < n1; n += Q4A) {
    int S = n1 - n < Q4A ? n1 - n : Q4A;
    for (int i = 0; i < S; i++) rows[i] = n + i;
    for (int m = 0; m < M; m++) {
      const int8_t* xh = dig + (size_t)m * Kp;
      const int8_t* xl = dig + (size_t)(M + m) * Kp;
      if (S == Q4A)
        q4_rows_avxvnni(xh, xl, xinv + (size_t)m * G, xs + (size_t)m * G, K, group, w, sc, mn, Q4A, rows, o);
      else
        for (int i = 0; i < S; i++)
          q4_rows_avxvnni(xh, xl, xinv + (size_t)m * G, xs + (size_t)m * G, K, group, w, sc, mn, 1, rows + i, o + i);
      for (int i = 0; i < S; i++) out[(n + i - n0) * 8 + m] = o[i];
    }
  }
}
#endif
#endif

#if defined(__AVX512F__)
/* ---- AVX512-VNNI, one row of bfloat16 x (decoding): int4 by integer sums over x's two int8 digits -----
   The same x16, digits and rounding as AVX2's q4_one_i16 (x made int16 below 2^14 per group with a
   power-of-two scale, x = 256 h + l), but vpdpbusd multiplies the nibbles (unsigned bytes) by a digit
   (signed bytes) and sums 4 products into each int32 lane: per 64-byte load of W (128 weights) an and, a
   shift and an and, four vpdpbusd; the block's int32 sums (h's shifted by 8, plus l's) are converted and
   scaled per lane (lanes 0-7 hold the first run of 64, 8-15 the second: each lane one group). It replaced
   a one-row AVX512-BF16 kernel (as q4_block_bf16, with a vpmovzxbw per 64 nibbles; every CPU with
   AVX512-BF16 has VNNI), 1.2-1.3x slower on a 2-core Xeon with AMX (docs/quantization.md). Compiled for
   AVX512-VNNI by attribute: the library still loads on AVX-512 CPUs without it (the caller asks for this
   kernel only where the CPU has the flag). */
#define VNNI_FN __attribute__((target("avx512vnni")))
/* per 128 inputs k0.., the digits in the order the nibbles of a 64-byte load of W take them: k0..k0+31 and
   k0+64..k0+95 (the low nibbles), then k0+32..k0+63 and k0+96..k0+127 (the high ones); a last run of 64 is
   padded with zero digits. xh, xl hold K rounded up to 128. */
static void q4_digits_vnni(const int16_t* x16, int K, int8_t* xh, int8_t* xl) {
  static const int from[4] = {0, 64, 32, 96};
  for (int k0 = 0; k0 < K; k0 += 128)
    for (int part = 0; part < 4; part++)
      for (int j = 0; j < 32; j++) {
        int k = k0 + from[part] + j, d = k0 + part * 32 + j;
        int v = k < K ? x16[k] : 0, l = ((v + 128) & 255) - 128;
        xl[d] = (int8_t)l, xh[d] = (int8_t)((v - l) / 256);
      }
}

#ifndef Q4V
#define Q4V 6
#endif
static inline __attribute__((always_inline)) VNNI_FN void q4_rows_vnni(const int8_t* xh, const int8_t* xl,
                                                                       const float* xinv, const float* xs, int K,
                                                                       int group, const uint8_t* w,
                                                                       const uint16_t* sc, const uint16_t* mn,
                                                                       const int S, const int* rows, float* out) {
  int G = K / group, half = K / 2, chunk = -1;
  const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const uint8_t* r[Q4V];
  __m512 acc[Q4V], sv[Q4V];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * half, acc[i] = sv[i] = _mm512_setzero_ps();
  for (int k0 = 0; k0 < K; k0 += 128) {
    int ga = k0 / group, gb = (k0 + 64) / group; /* the groups of the two runs (never 16 groups apart) */
    if (gb >= G) gb = G - 1;                     /* a last run of 64: its lanes sum zeros */
    if (ga >> 4 != chunk) { /* scale times x's scale, 16 groups at once, each lane picked with vpermps */
      chunk = ga >> 4;
      int g0 = chunk * 16;
      __mmask16 live = G - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g0)) - 1u);
      __m512 xv = _mm512_maskz_loadu_ps(live, xinv + g0);
      for (int i = 0; i < S; i++)
        sv[i] = _mm512_mul_ps(bf16x16(_mm256_maskz_loadu_epi16(live, sc + (size_t)rows[i] * G + g0)), xv);
    }
    __m512i pick = _mm512_mask_set1_epi32(_mm512_set1_epi32(ga & 15), 0xff00, gb & 15);
    __mmask64 live = k0 + 128 <= K ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    __m512i h0 = _mm512_loadu_si512(xh + k0), h1 = _mm512_loadu_si512(xh + k0 + 64);
    __m512i l0 = _mm512_loadu_si512(xl + k0), l1 = _mm512_loadu_si512(xl + k0 + 64);
    for (int i = 0; i < S; i++) {
      _mm_prefetch((const char*)(r[i] + k0 / 2 + PFD), PFH);
      __m512i v = _mm512_maskz_loadu_epi8(live, r[i] + k0 / 2);
      __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      __m512i th = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, h0), hi, h1);
      __m512i tl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, l0), hi, l1);
      __m512i t = _mm512_add_epi32(_mm512_slli_epi32(th, 8), tl);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(pick, sv[i]), acc[i]);
    }
  }
  for (int i = 0; i < S; i++) { /* plus the minimum's share: the sum over groups of min * (x summed) */
    const uint16_t* mr = mn + (size_t)rows[i] * G;
    __m512 c = acc[i];
    for (int g = 0; g < G; g += 16) {
      __mmask16 live = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1u);
      c = _mm512_fmadd_ps(bf16x16(_mm256_maskz_loadu_epi16(live, mr + g)), _mm512_maskz_loadu_ps(live, xs + g), c);
    }
    out[i] = _mm512_reduce_add_ps(c);
  }
}

static VNNI_FN void q4_one_vnni(const int8_t* xh, const int8_t* xl, const float* xinv, const float* xs, int K,
                                int group, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1,
                                float* out) {
  int len = (n1 - n0) / Q4V;
  for (int t = 0; t < len; t++) { /* Q4V streams, len rows apart */
    int rows[Q4V];
    float o[Q4V];
    for (int i = 0; i < Q4V; i++) rows[i] = n0 + i * len + t;
    q4_rows_vnni(xh, xl, xinv, xs, K, group, w, sc, mn, Q4V, rows, o);
    for (int i = 0; i < Q4V; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q4V; n < n1; n++) q4_rows_vnni(xh, xl, xinv, xs, K, group, w, sc, mn, 1, &n, out + (n - n0));
}

/* 2 to 8 rows of x by the same sums, each output computed exactly as q4_rows_vnni computes it (the same
   instructions on the same values in the same order: a group's scale times x's scale is picked per lane
   from each, then multiplied, which is the product q4_rows_vnni picks), so a row's bits are those of the
   one-row kernel whatever rows share its call: batches of the server take it and a lone row takes the
   one-row kernel. Q4VM rows of W at once; x's digits per row read from memory (the cache). Per row and
   128 weights eight instructions on one port (four vpdpbusd, the block's conversion and scaling), so
   beyond 3 rows AMX's tiles are faster where the CPU has them (2-core Xeon, 1 thread, 2560 x 6912:
   2 rows 11.1 against AMX's 8.0 G weights/s, 4 rows ~7 both, 8 rows 3.9 against 6.2; the kernels of
   several rows before: 9.2 and 2.5). */
#ifndef Q4VM
#define Q4VM 2
#endif
static inline __attribute__((always_inline)) VNNI_FN void q4_rows_vnni_m(const int8_t* vh, const int8_t* vl, int Kp,
                                                                         const float* xinv, const float* xs,
                                                                         int K, int group, const uint8_t* w,
                                                                         const uint16_t* sc, const uint16_t* mn,
                                                                         const int S, int n, const int M,
                                                                         float out[Q4VM][8]) {
  int G = K / group, half = K / 2, chunk = -1;
  const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const uint8_t* r[Q4VM];
  __m512 acc[Q4VM][8], sn[Q4VM];
  __mmask16 live16 = 0;
  int g0 = 0;
  for (int i = 0; i < S; i++) {
    r[i] = w + (size_t)(n + i) * half, sn[i] = _mm512_setzero_ps();
    for (int m = 0; m < M; m++) acc[i][m] = _mm512_setzero_ps();
  }
  for (int k0 = 0; k0 < K; k0 += 128) {
    int ga = k0 / group, gb = (k0 + 64) / group;
    if (gb >= G) gb = G - 1;
    if (ga >> 4 != chunk) {
      chunk = ga >> 4, g0 = chunk * 16;
      live16 = G - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g0)) - 1u);
      for (int i = 0; i < S; i++) sn[i] = bf16x16(_mm256_maskz_loadu_epi16(live16, sc + (size_t)(n + i) * G + g0));
    }
    __m512i pick = _mm512_mask_set1_epi32(_mm512_set1_epi32(ga & 15), 0xff00, gb & 15);
    __mmask64 live = k0 + 128 <= K ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    __m512i lo[Q4VM], hi[Q4VM];
    __m512 pn[Q4VM];
    for (int i = 0; i < S; i++) {
      _mm_prefetch((const char*)(r[i] + k0 / 2 + PFD), PFH);
      __m512i v = _mm512_maskz_loadu_epi8(live, r[i] + k0 / 2);
      lo[i] = _mm512_and_si512(v, low), hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      pn[i] = _mm512_permutexvar_ps(pick, sn[i]);
    }
    for (int m = 0; m < M; m++) {
      const int8_t *hm = vh + (size_t)m * Kp + k0, *lm = vl + (size_t)m * Kp + k0;
      __m512i h0 = _mm512_loadu_si512(hm), h1 = _mm512_loadu_si512(hm + 64);
      __m512i l0 = _mm512_loadu_si512(lm), l1 = _mm512_loadu_si512(lm + 64);
      __m512 pm = _mm512_permutexvar_ps(pick, _mm512_maskz_loadu_ps(live16, xinv + (size_t)m * G + g0));
      for (int i = 0; i < S; i++) {
        __m512i th = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[i], h0), hi[i], h1);
        __m512i tl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[i], l0), hi[i], l1);
        __m512i t = _mm512_add_epi32(_mm512_slli_epi32(th, 8), tl);
        acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(pn[i], pm), acc[i][m]);
      }
    }
  }
  for (int i = 0; i < S; i++) {
    const uint16_t* mr = mn + (size_t)(n + i) * G;
    for (int m = 0; m < M; m++) {
      __m512 c = acc[i][m];
      for (int g = 0; g < G; g += 16) {
        __mmask16 lv = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1u);
        c = _mm512_fmadd_ps(bf16x16(_mm256_maskz_loadu_epi16(lv, mr + g)), _mm512_maskz_loadu_ps(lv, xs + (size_t)m * G + g), c);
      }
      out[i][m] = _mm512_reduce_add_ps(c);
    }
  }
}

/* outputs [n0, n1) of M rows (out[(n - n0) * 8 + m]) */
static VNNI_FN void q4_multi_vnni(const int8_t* vh, const int8_t* vl, int Kp, const float* xinv, const float* xs, int K,
                                  int group, const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1,
                                  int M, float* out) {
  float o[Q4VM][8];
  int n = n0;
  for (; n + Q4VM <= n1; n += Q4VM) {
    switch (M) { /* constant row counts: the sums stay in registers */
#define Q4VM_CASE(MM) \
  case MM: q4_rows_vnni_m(vh, vl, Kp, xinv, xs, K, group, w, sc, mn, Q4VM, n, MM, o); break;
      Q4VM_CASE(1) Q4VM_CASE(2) Q4VM_CASE(3) Q4VM_CASE(4) Q4VM_CASE(5) Q4VM_CASE(6) Q4VM_CASE(7) Q4VM_CASE(8)
#undef Q4VM_CASE
    }
    for (int i = 0; i < Q4VM; i++)
      for (int m = 0; m < M; m++) out[(n + i - n0) * 8 + m] = o[i][m];
  }
  for (; n < n1; n++) {
    q4_rows_vnni_m(vh, vl, Kp, xinv, xs, K, group, w, sc, mn, 1, n, M, o);
    for (int m = 0; m < M; m++) out[(n - n0) * 8 + m] = o[0][m];
  }
}
#endif

#if defined(__AVX512F__) || defined(HAVE_AVXVNNI)
/* stablelm_q4_linear's 2 to 8 bfloat16 rows (xf, xs: as float32, and their group sums) by q4_multi_vnni
   (AVX-512) or q4_multi_avxvnni (AVX2 with AVX-VNNI); a row holding Inf or NaN by q4_one_f32, as the
   one-row path computes it */
static int q4_linear_vnni_rows(const float* xf, const float* xs, int M, int K, void* y, int N, const uint8_t* w,
                               const uint16_t* sc, const uint16_t* mn, int group, const void* b, int threads) {
  int G = K / group, Kp = (K + 127) / 128 * 128, ok[8], bad = 0;
  int16_t* x16 = (int16_t*)malloc((size_t)K * 2);
  int8_t* dig = (int8_t*)calloc((size_t)2 * M * Kp, 1);
  float* xinv = (float*)calloc((size_t)M * G, sizeof(float));
  if (!x16 || !dig || !xinv) {
    free(x16), free(dig), free(xinv);
    return 1;
  }
  for (int m = 0; m < M; m++) {
    ok[m] = x_to_i16(xf + (size_t)m * K, K, group, 14, x16, xinv + (size_t)m * G);
#if defined(__AVX512F__)
    if (ok[m]) q4_digits_vnni(x16, K, dig + (size_t)m * Kp, dig + (size_t)(M + m) * Kp);
#else
    for (int k = 0; ok[m] && k < K; k++) { /* the digits in order, as the one-row path makes them */
      int l = ((x16[k] + 128) & 255) - 128;
      dig[(size_t)(M + m) * Kp + k] = (int8_t)l, dig[(size_t)m * Kp + k] = (int8_t)((x16[k] - l) / 256);
    }
#endif
    bad |= !ok[m];
  }
  int per, parts = one_row_split(N, threads, &per);
#pragma omp parallel for num_threads(parts) schedule(static)
  for (int p = 0; p < parts; p++) {
    int n0 = p * per, n1 = n0 + per < N ? n0 + per : N;
    float out[256 * 8], one[256];
    for (int c = n0; c < n1; c += 256) {
      int c1 = c + 256 < n1 ? c + 256 : n1;
#if defined(__AVX512F__)
      q4_multi_vnni(dig, dig + (size_t)M * Kp, Kp, xinv, xs, K, group, w, sc, mn, c, c1, M, out);
#else
      q4_multi_avxvnni(dig, Kp, xinv, xs, K, group, w, sc, mn, c, c1, M, out);
#endif
      for (int m = 0; bad && m < M; m++)
        if (!ok[m]) {
          q4_one_f32(xf + (size_t)m * K, xs + (size_t)m * G, K, group, w, sc, mn, c, c1, one);
          for (int j = c; j < c1; j++) out[(j - c) * 8 + m] = one[j - c];
        }
      for (int m = 0; m < M; m++)
        for (int j = c; j < c1; j++)
          store_one(y, XBF16, (int64_t)m * N + j, out[(j - c) * 8 + m] + (b ? load_one(b, XBF16, j) : 0.0f));
    }
  }
  free(x16), free(dig), free(xinv);
  return 0;
}
#endif

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
#if defined(__AVX512F__) || defined(HAVE_AVXVNNI)
  if ((mode & 2) && M > 1 && M <= 8) { /* the one-row VNNI kernel's sums for each row */
    int st = q4_linear_vnni_rows(xf, xs, M, K, y, N, w, sc, mn, group, b, threads);
    free(xf), free(xs), free(xb);
    return st;
  }
  /* a lone row of a batch takes the one-row kernel: the same sums as in any batch */
  if (M == 1 && (!batch || (mode & 2))) {
#else
  if (M == 1 && !batch) {
#endif
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
    int per, parts = one_row_split(N, threads, &per);
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int p = 0; p < parts; p++) {
      int n0 = p * per, n1 = n0 + per < N ? n0 + per : N;
      float out[ONE_ROW_CHUNK];
      for (int c = n0; c < n1; c += ONE_ROW_CHUNK) {
        int c1 = c + ONE_ROW_CHUNK < n1 ? c + ONE_ROW_CHUNK : n1;
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
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i low = _mm512_set1_epi16(15);
      uint16_t* o = (uint16_t*)out + (int64_t)r * K;
      for (int g = 0; g < G; g++) {
        __m512 v = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(from_bf16(sr[g]))), _mm512_set1_ps(from_bf16(mr[g])));
        __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
        for (int k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
          __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(q + k0 / 2)));
          _mm512_storeu_si512(o + k0, _mm512_permutexvar_epi16(_mm512_and_si512(bytes, low), table));
          _mm512_storeu_si512(o + k0 + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
        }
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
