/* Linear layers on the weights as they are: y[M, sum N_g] = x[M, K] @ W_g[N_g, K]^T (+ b_g).
 *
 * W_g are dense row-major (the checkpoint's layout, the Parameter's own storage): nothing is packed or
 * copied. Up to three weights of the same K are computed in one call (q/k/v, gate/up: one parallel
 * region and one output), each written to its own columns of y.
 *
 * One source, compiled once per instruction set (`-mavx512f ...` or `-mavx2 -mfma` on x86-64, NEON on
 * ARM64; see `__init__.py`): the vector width VW is 16 floats with AVX-512, 8 with AVX2, 4 with NEON.
 * The kernels:
 *
 * - f32: float32. Per output, VW partial sums over k (one FMA per k, in order), reduced by halves,
 *   then + bias. Not torch's order (MKL's is not reproducible); the same for any row count, batch and
 *   thread count.
 * - bf16_dot: bfloat16 in ATen's order (torch's kernel on CPUs without AVX-512 bf16 support; see
 *   `dot_bf16` below). Bit-identical to F.linear there.
 * - bf16_dpbf16 (AVX512-BF16 only): bfloat16 in oneDNN's order on AVX512-BF16 CPUs: per output, K in
 *   blocks of kb, each summed from zero over consecutive pairs of k with vdpbf16ps, block sums added in
 *   order, then the bias in fp32, then one rounding to bfloat16. The weights are read as they lie,
 *   16 rows at a time, and transposed in registers so that each lane holds one output.
 *
 * - bf16_avx512 (AVX-512): bfloat16 in oneDNN's order for one row on AVX-512 CPUs without AVX512-BF16
 *   (its emulated vdpbf16ps: per output 16 lanes over pairs of k, no blocking; see the kernel).
 *
 * Every kernel returns 0, or 2 on bad arguments (nothing written then). Work is split over blocks of
 * 16 outputs on `threads` OpenMP threads (torch's own pool: the same libgomp is loaded).
 */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define prefetch_t0(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#elif defined(__aarch64__)
#include <arm_neon.h>
#define prefetch_t0(p) __builtin_prefetch((const void*)(p), 0, 3)
#else
#error "stablelm's kernels are written for x86-64 (AVX2, AVX-512) and ARM64 (NEON)"
#endif

#if defined(__x86_64__) || defined(__i386__)
#define prefetch_t1(p) _mm_prefetch((const char*)(p), _MM_HINT_T1)
#else
#define prefetch_t1(p) __builtin_prefetch((const void*)(p), 0, 2)
#endif

/* How kernels whose best prefetches differ between CPUs ask for weights ahead (stablelm.kernels.prefetch
 * times the modes once per process and sets the fastest; the bits never depend on them):
 * - PF_DPBF16 (bf16_dpbf16, see DP_TILE): 0 non-temporal, the next block and each row's lines ahead;
 *   1 the next block into L2.
 * - PF_DOT (bf16_dot and f16_dot for decoding's rows, see DOT_PREFETCH): each row's lines DOT_AHEAD on, 0
 *   into L1, 1 into L2; 2: 2 * DOT_AHEAD on, into L2. */
#define PF_DPBF16 0
#define PF_DOT 1
static int prefetch_modes[2];
void stablelm_set_prefetch(int which, int mode) {
  if (which >= 0 && which < 2) prefetch_modes[which] = mode;
}
int stablelm_prefetch(int which) { return which >= 0 && which < 2 ? prefetch_modes[which] : -1; }
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 64-byte aligned buffers (NULL when they cannot be had); freed with free() */
static inline void* alloc64(size_t bytes) {
  void* p = 0;
  return posix_memalign(&p, 64, bytes ? bytes : 64) ? 0 : p;
}

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vset1(v) _mm512_set1_ps(v)
#define vstore(p, v) _mm512_storeu_ps(p, v)
/* the first `n` (< VW) floats at p, zeros after */
static inline vf vload_part(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }
/* bf16 -> f32: VW bf16 at p */
static inline vf vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf vload_bf16_part(const uint16_t* p, int n) {
  __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vset1(v) _mm256_set1_ps(v)
#define vstore(p, v) _mm256_storeu_ps(p, v)
static inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vload_part(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
static inline vf vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vf vload_bf16_part(const uint16_t* p, int n) {
  uint16_t tmp[8] = {0};
  memcpy(tmp, p, (size_t)n * 2);
  return vload_bf16(tmp);
}
#elif defined(__aarch64__)
#define VW 4
typedef float32x4_t vf;
#define vzero() vdupq_n_f32(0.0f)
#define vload(p) vld1q_f32(p)
#define vfma(a, b, c) vfmaq_f32(c, a, b)
#define vadd(a, b) vaddq_f32(a, b)
#define vset1(v) vdupq_n_f32(v)
#define vstore(p, v) vst1q_f32(p, v)
static inline vf vload_part(const float* p, int n) {
  float tmp[4] = {0};
  memcpy(tmp, p, (size_t)n * 4);
  return vload(tmp);
}
static inline vf vload_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline vf vload_bf16_part(const uint16_t* p, int n) {
  uint16_t tmp[4] = {0};
  memcpy(tmp, p, (size_t)n * 2);
  return vload_bf16(tmp);
}
#endif

/* Sum of the lanes as ATen's `reduce` sums a Vectorized<float>: on x86-64 halves added until one is left
 * (lane i + lane i + VW/2, ...); on ARM64 pairwise, (l0 + l1) + (l2 + l3) (vaddvq_f32, as ATen calls it). */
static inline float vsum(vf v) {
#if defined(__aarch64__)
  return vaddvq_f32(v);
#else
#if VW == 16
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
  __m256 h = v;
#endif
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
#endif
}

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* ---- the work: groups of weights, split in blocks of 16 outputs ----------------------------------- */
#define BLOCK 16
#define MAX_GROUPS 3

typedef struct {
  int bs;  /* outputs per block (a work item) */
  const void* w[MAX_GROUPS];
  const void* b[MAX_GROUPS];
  int n[MAX_GROUPS];
  int col[MAX_GROUPS];  /* first column of y for each group */
  int first[MAX_GROUPS + 1];  /* first block of each group; first[G] = all blocks */
  int G;
} groups_t;

static int make_groups(groups_t* g, int per_item, int G, const void* w0, const void* b0, int n0, const void* w1,
                       const void* b1, int n1, const void* w2, const void* b2, int n2) {
  const void* ws[3] = {w0, w1, w2};
  const void* bs[3] = {b0, b1, b2};
  int ns[3] = {n0, n1, n2};
  if (G < 1 || G > MAX_GROUPS) return 0;
  g->G = G, g->bs = per_item;
  int col = 0, blocks = 0;
  for (int i = 0; i < G; i++) {
    if (!ws[i] || ns[i] <= 0) return 0;
    g->w[i] = ws[i], g->b[i] = bs[i], g->n[i] = ns[i], g->col[i] = col, g->first[i] = blocks;
    col += ns[i];
    blocks += (ns[i] + per_item - 1) / per_item;
  }
  g->first[G] = blocks;
  return col;
}

/* Which group and which outputs [n0, n0 + nn) a block is. */
static inline int block_of(const groups_t* g, int item, int* n0, int* nn) {
  int i = 0;
  while (item >= g->first[i + 1]) i++;
  *n0 = (item - g->first[i]) * g->bs;
  *nn = g->n[i] - *n0 < g->bs ? g->n[i] - *n0 : g->bs;
  return i;
}

/* ---- float32 and bfloat16 in ATen's order: dot products ------------------------------------------ */
/* f32: one partial sum of VW lanes per (row, output), k in order; up to 4 rows x 4 outputs at a time. */
#define DOT_F32_TILE(MT, NT)                                                                             \
  static inline void dot_f32_##MT##x##NT(const float* x, int ldx, const float* w, int K, float* out,   \
                                          int ldo) {                                                   \
    vf acc[MT][NT];                                                                                    \
    for (int m = 0; m < MT; m++)                                                                       \
      for (int n = 0; n < NT; n++) acc[m][n] = vzero();                                                \
    int k = 0;                                                                                         \
    for (; k + VW <= K; k += VW) {                                                                     \
      if (MT == 1) /* decoding reads each row once: fetch ahead (past a row's end: the next rows) */   \
        for (int n = 0; n < NT; n++) prefetch_t0(w + (int64_t)n * K + k + 512);                        \
      vf wv[NT];                                                                                       \
      for (int n = 0; n < NT; n++) wv[n] = vload(w + (int64_t)n * K + k);                              \
      for (int m = 0; m < MT; m++) {                                                                   \
        vf xv = vload(x + (int64_t)m * ldx + k);                                                       \
        for (int n = 0; n < NT; n++) acc[m][n] = vfma(xv, wv[n], acc[m][n]);                           \
      }                                                                                                \
    }                                                                                                  \
    if (k < K) {                                                                                       \
      for (int n = 0; n < NT; n++) {                                                                   \
        vf wv = vload_part(w + (int64_t)n * K + k, K - k);                                             \
        for (int m = 0; m < MT; m++) acc[m][n] = vfma(vload_part(x + (int64_t)m * ldx + k, K - k), wv, acc[m][n]); \
      }                                                                                                \
    }                                                                                                  \
    for (int m = 0; m < MT; m++)                                                                       \
      for (int n = 0; n < NT; n++) out[m * ldo + n] = vsum(acc[m][n]);                                 \
  }
DOT_F32_TILE(1, 1)
DOT_F32_TILE(1, 4)
DOT_F32_TILE(4, 1)
DOT_F32_TILE(4, 4)

static void block_f32(const float* x, int M, int K, int ldx, const float* w, const float* b, int nn,
                      float* y, int ldy) {
  /* rows in fours, outputs in fours; the same per-(row, output) arithmetic whatever the tile */
  float out[4 * BLOCK];
  for (int m = 0; m < M; m += 4) {
    int mt = M - m < 4 ? M - m : 4;
    const float* xm = x + (int64_t)m * ldx;
    for (int n = 0; n < nn; n += 4) {
      int nt = nn - n < 4 ? nn - n : 4;
      const float* wn = w + (int64_t)n * K;
      if (mt == 4 && nt == 4) dot_f32_4x4(xm, ldx, wn, K, out + n, BLOCK);
      else if (mt == 4) for (int j = 0; j < nt; j++) dot_f32_4x1(xm, ldx, wn + (int64_t)j * K, K, out + n + j, BLOCK);
      else if (nt == 4) for (int r = 0; r < mt; r++) dot_f32_1x4(xm + (int64_t)r * ldx, ldx, wn, K, out + r * BLOCK + n, 1);
      else for (int r = 0; r < mt; r++) for (int j = 0; j < nt; j++)
        dot_f32_1x1(xm + (int64_t)r * ldx, ldx, wn + (int64_t)j * K, K, out + r * BLOCK + n + j, 1);
    }
    for (int r = 0; r < mt; r++)
      for (int n = 0; n < nn; n++) y[(int64_t)(m + r) * ldy + n] = out[r * BLOCK + n] + (b ? b[n] : 0.0f);
  }
}

int stablelm_linear_f32(const float* x, int M, int K, int ldx, float* y, int ldy, int G, const void* w0,
                        const void* b0, int n0, const void* w1, const void* b1, int n1, const void* w2,
                        const void* b2, int n2, int kb, int threads) {
  (void)kb;
  groups_t g;
  int N = make_groups(&g, BLOCK, G, w0, b0, n0, w1, b1, n1, w2, b2, n2);
  if (!N || M < 0 || K <= 0 || ldx < K || ldy < N || threads < 1) return 2;
  int items = g.first[G];
#pragma omp parallel for num_threads(items < threads ? items : threads) schedule(static)
  for (int item = 0; item < items; item++) {
    int n0_, nn;
    int i = block_of(&g, item, &n0_, &nn);
    const float* b = g.b[i] ? (const float*)g.b[i] + n0_ : 0;
    block_f32(x, M, K, ldx, (const float*)g.w[i] + (int64_t)n0_ * K, b, nn, y + g.col[i] + n0_, ldy);
  }
  return 0;
}

/* ---- bfloat16 and float16 in ATen's order: dot products with fp32 arithmetic ------------------------ */
/* torch's own kernel where oneDNN does not take the dtype (bf16 on CPUs without AVX-512; fp16 on CPUs
 * without AVX512-FP16): every output is ATen's `dot_with_fp32_arith`, whose order with VW-lane vectors
 * (Vectorized<float>) is:
 *   - 8 registers of VW lanes over the blocks of 8*VW k: lane e of the block, a[e] = fma(x, w, a[e]);
 *   - registers summed r0+=r4, r1+=r5, r2+=r6, r3+=r7; r0+=r2, r1+=r3; r0+=r1; its lanes summed
 *     (`vsum`: by halves on x86-64, pairwise on ARM64);
 *   - one more register over the chunks of 2*VW k left (fma with the low VW, then the high VW), its
 *     lanes summed and added;
 *   - the last k one at a time, each product rounded and then added (not fused);
 *   - the bias added in fp32, and one rounding to the dtype (to nearest even).
 * Inputs are converted to fp32 exactly. The order depends on nothing else (rows, threads, N): the
 * kernels below block rows and outputs for speed but keep each output's order. */
typedef uint16_t elem_bf16;
typedef uint16_t elem_f16;
typedef float elem_f32;

static inline vf wload_bf16(const uint16_t* p) { return vload_bf16(p); }
#if defined(__aarch64__)
static inline float from_f16(uint16_t h) {
  __fp16 f;
  memcpy(&f, &h, 2);
  return (float)f;
}
static inline vf wload_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
#else
static inline float from_f16(uint16_t h) { return _cvtsh_ss(h); }
#if VW == 16
static inline vf wload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#else
static inline vf wload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif
#endif
/* fp32 -> bf16 / fp16, to nearest even, NaN as torch makes it */
static inline uint16_t round_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline uint16_t round_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7e00u);
#if defined(__aarch64__)
  __fp16 h = (__fp16)f; /* to nearest even (the default rounding mode) */
  uint16_t r;
  memcpy(&r, &h, 2);
  return r;
#else
  return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

/* The register tree over the 8 block accumulators, then their lanes. */
static inline float tree8(vf r0, vf r1, vf r2, vf r3, vf r4, vf r5, vf r6, vf r7) {
  r0 = vadd(r0, r4), r1 = vadd(r1, r5), r2 = vadd(r2, r6), r3 = vadd(r3, r7);
  r0 = vadd(r0, r2), r1 = vadd(r1, r3);
  return vsum(vadd(r0, r1));
}

/* The part after the blocks: chunks of 2*VW k from k64, then single k from k16. `x` is fp32. */
#define DOT_TAIL(E)                                                                                    \
  static inline float dot_tail_##E(const float* x, const uint16_t* w, int k64, int k16, int K,         \
                                   float sum) {                                                        \
    vf t = vzero();                                                                                    \
    for (int j = k64; j < k16; j += 2 * VW) {                                                          \
      t = vfma(vload(x + j), wload_##E(w + j), t);                                                     \
      t = vfma(vload(x + j + VW), wload_##E(w + j + VW), t);                                           \
    }                                                                                                  \
    sum = sum + vsum(t);                                                                               \
    for (int j = k16; j < K; j++) {                                                                    \
      float p = x[j] * from_##E(w[j]); /* rounded, then added: -ffp-contract=off */                    \
      sum = sum + p;                                                                                   \
    }                                                                                                  \
    return sum;                                                                                        \
  }

#ifndef DOT_AHEAD
#define DOT_AHEAD 2048 /* elements */
#endif
/* Decoding's rows of W asked for ahead (dot_many), by PF_DOT's mode: on a Zen 4 EPYC with the
 * AVX2 build, one thread, the 160M shape's layers read at 17.8 GB/s with mode 0 and 22.7 with mode 1
 * (3B: 20.0 and 24.9; two threads 1.05x; none at all: as fast as mode 1 on rows of 768-2560, but 0.63x
 * on rows of 6912); mode 0 was the rule before, from a Zen 1. Mode 2 asks for the lines twice as far
 * ahead, into L2: on another Zen 4 session, weights mapped from a file, the 160M layers read at 26.4-28.4
 * GB/s against mode 1's 21.9-22.9, the 3B ones at 25.1 against 22.2. */
#define DOT_PREFETCH(pf, p)                                                                            \
  do {                                                                                                 \
    if (pf == 0) {                                                                                     \
      prefetch_t0((p) + DOT_AHEAD);                                                                    \
      prefetch_t0((const char*)((p) + DOT_AHEAD) + 64);                                                \
    } else if (pf == 1) {                                                                              \
      prefetch_t1((p) + DOT_AHEAD);                                                                    \
      prefetch_t1((const char*)((p) + DOT_AHEAD) + 64);                                                \
    } else if (pf == 2) {                                                                              \
      prefetch_t1((p) + 2 * DOT_AHEAD);                                                                \
      prefetch_t1((const char*)((p) + 2 * DOT_AHEAD) + 64);                                            \
    }                                                                                                  \
  } while (0)
/* S outputs at once (decoding's rows, `decode_share`), each from start to end in registers: 8 chains of
 * FMAs over its row of W in ATen's order, the same bits for any S. S rows far apart are S streams of
 * reads in flight. */
#define DOT_MANY(E, S)                                                                                 \
  static inline void dot_many_##E##_##S(const float* x, const uint16_t* const* w, int K, float* out) {  \
    vf a[S][8];                                                                                        \
    for (int s = 0; s < S; s++)                                                                        \
      for (int r = 0; r < 8; r++) a[s][r] = vzero();                                                   \
    int k64 = K / (8 * VW) * (8 * VW), k16 = K / (2 * VW) * (2 * VW);                                  \
    const int pf = prefetch_modes[PF_DOT];                                                             \
    for (int j = 0; j < k64; j += 8 * VW) {                                                            \
      /* the rows follow one another: fetch ahead across their ends */                                 \
      for (int s = 0; s < S; s++) DOT_PREFETCH(pf, w[s] + j);                                          \
      for (int r = 0; r < 8; r++)                                                                      \
        for (int s = 0; s < S; s++) a[s][r] = vfma(vload(x + j + r * VW), wload_##E(w[s] + j + r * VW), a[s][r]); \
    }                                                                                                  \
    for (int s = 0; s < S; s++)                                                                        \
      out[s] = dot_tail_##E(x, w[s], k64, k16, K,                                                      \
                            tree8(a[s][0], a[s][1], a[s][2], a[s][3], a[s][4], a[s][5], a[s][6], a[s][7])); \
  }

/* Many rows: the block accumulators of MT rows x NT outputs for one register slot r (lanes r*VW ..
 * r*VW+VW-1 of each block of 8*VW k) over `cnt` blocks, W already in fp32: one FMA per (row, output)
 * for MT + NT loads. x and W are laid out slot by slot (all blocks' slot 0, then slot 1, ...), so that
 * each slot's pass reads them contiguously. Between chunks of k they wait in `acc`
 * [row][output][slot][VW]. */
/* Inlined, with the first chunk's zeros apart from the later chunks' loads: GCC otherwise kept the tile on
 * the stack around the loop (AVX2 build, 160M layers at 128 rows: 1.10-1.14x GFLOPS at one thread). */
#define SLOT_TILE(MT, NT)                                                                              \
  static inline __attribute__((always_inline)) void slot_tile_##MT##x##NT(                             \
      const float* x, int ldx, const float* wf, int ldw, int cnt, int r, float* acc, int ldacc, int first) { \
    vf a[MT][NT];                                                                                      \
    if (first)                                                                                         \
      for (int m = 0; m < MT; m++)                                                                     \
        for (int n = 0; n < NT; n++) a[m][n] = vzero();                                                \
    else                                                                                               \
      for (int m = 0; m < MT; m++)                                                                     \
        for (int n = 0; n < NT; n++) a[m][n] = vload(acc + (int64_t)m * ldacc + (n * 8 + r) * VW);     \
    for (int j = 0; j < cnt * VW; j += VW) { /* W read by each FMA (a memory operand): no registers */ \
      for (int m = 0; m < MT; m++) {                                                                   \
        vf xv = vload(x + (int64_t)m * ldx + j);                                                       \
        for (int n = 0; n < NT; n++) a[m][n] = vfma(xv, vload(wf + (int64_t)n * ldw + j), a[m][n]);    \
      }                                                                                                \
    }                                                                                                  \
    for (int m = 0; m < MT; m++)                                                                       \
      for (int n = 0; n < NT; n++) vstore(acc + (int64_t)m * ldacc + (n * 8 + r) * VW, a[m][n]);      \
  }
#if VW == 16
#define ROWS_T 4
SLOT_TILE(4, 4)
#else
#define ROWS_T 3 /* 12 accumulators: enough chains to keep both FMA units busy */
SLOT_TILE(3, 4)
#endif
SLOT_TILE(1, 4)
SLOT_TILE(1, 1)
#define OUTS_T 4
#define CHUNK 1024 /* k per chunk of W converted to fp32 (a multiple of 8 * VW): OUTS_T x CHUNK floats */
#define ROW_BLOCK 48 /* rows of x whose chunk is kept in L2 (a multiple of ROWS_T) */

/* Every row x up to 16 outputs (nn): y[m, n] for a block of outputs. `x` is fp32 (ldx floats apart);
 * `wf` (OUTS_T x CHUNK floats) and `acc` (M x OUTS_T x 8 x VW floats) are this thread's buffers. */
#define DOT_BLOCK(E)                                                                                   \
  DOT_TAIL(E)                                                                                          \
  /* rows [m0, m1) x nn outputs from their slots' sums (row m's output n at acc + (m - m0) ldacc +     \
   * n 8 VW): tree8 over the slots, the tail past k64, the bias, rounded into y */                   \
  static void block_finish_##E(const float* x, int ldx, int m0, int m1, int K, const uint16_t* w,      \
                               const uint16_t* b, int nn, uint16_t* y, int ldy, const float* acc,      \
                               int ldacc) {                                                            \
    int k64 = K / (8 * VW) * (8 * VW), k16 = K / (2 * VW) * (2 * VW);                                  \
    for (int m = m0; m < m1; m++)                                                                      \
      for (int n = 0; n < nn; n++) {                                                                   \
        const float* a = acc + (int64_t)(m - m0) * ldacc + n * 8 * VW;                                 \
        float sum = 0.0f;                                                                              \
        if (k64) sum = tree8(vload(a), vload(a + VW), vload(a + 2 * VW), vload(a + 3 * VW),             \
                             vload(a + 4 * VW), vload(a + 5 * VW), vload(a + 6 * VW), vload(a + 7 * VW)); \
        else sum = vsum(vzero());                                                                      \
        sum = dot_tail_##E(x + (int64_t)m * ldx, w + (int64_t)n * K, k64, k16, K, sum);                \
        y[(int64_t)m * ldy + n] = round_##E(b ? from_##E(b[n]) + sum : sum);                           \
      }                                                                                                \
  }                                                                                                    \
  static void block_dot_##E(const float* x, int ldx, int M, int K, const uint16_t* w, const uint16_t* b, \
                            int nn, uint16_t* y, int ldy, float* wf, float* acc) {                     \
    int k64 = K / (8 * VW) * (8 * VW);                                                                 \
    /* x (fp32) is laid out slot by slot up to k64 (T blocks: slot r at r * T * VW), then in order */  \
    /* Rows in blocks of ROW_BLOCK; in each, k in chunks and, within a chunk, the outputs in fours: the  \
     * chunk's columns of the block's rows of x stay in L2 while every four outputs use them (the 3B   \
     * shape's x, 128 rows of 6912 floats, is 3.5 MB). acc holds the block's rows x all nn outputs. */ \
    int ldacc = BLOCK * 8 * VW, T = k64 / (8 * VW);                                                    \
    for (int m0 = 0; m0 < M; m0 += ROW_BLOCK) {                                                        \
      int m1 = M - m0 < ROW_BLOCK ? M : m0 + ROW_BLOCK;                                                \
      for (int kc = 0; kc < k64; kc += CHUNK) {                                                        \
        int cnt = (k64 - kc < CHUNK ? k64 - kc : CHUNK) / (8 * VW), c0 = kc / (8 * VW);                \
        for (int n0 = 0; n0 < nn; n0 += OUTS_T) {                                                      \
          int nt = nn - n0 < OUTS_T ? nn - n0 : OUTS_T;                                                \
          const uint16_t* wn = w + (int64_t)n0 * K;                                                    \
          for (int n = 0; n < nt; n++) /* this chunk of W in fp32, slot by slot */                     \
            for (int t = 0; t < cnt; t++)                                                              \
              for (int r = 0; r < 8; r++)                                                              \
                vstore(wf + n * CHUNK + (r * cnt + t) * VW, wload_##E(wn + (int64_t)n * K + kc + (t * 8 + r) * VW)); \
          for (int m = m0; m < m1;) {                                                                  \
            int mt = nt == OUTS_T && m1 - m >= ROWS_T ? ROWS_T : 1;                                    \
            float* am = acc + (int64_t)(m - m0) * ldacc + n0 * 8 * VW;                                 \
            for (int r = 0; r < 8; r++) {                                                              \
              const float* xm = x + (int64_t)m * ldx + ((int64_t)r * T + c0) * VW;                     \
              const float* wr = wf + r * cnt * VW;                                                     \
              if (mt == ROWS_T) SLOT_CALL_T(xm, ldx, wr, CHUNK, cnt, r, am, ldacc, kc == 0);           \
              else if (nt == OUTS_T) slot_tile_1x4(xm, ldx, wr, CHUNK, cnt, r, am, ldacc, kc == 0);    \
              else for (int n = 0; n < nt; n++)                                                        \
                slot_tile_1x1(xm, ldx, wr + n * CHUNK, CHUNK, cnt, r, am + n * 8 * VW, ldacc, kc == 0); \
            }                                                                                          \
            m += mt;                                                                                   \
          }                                                                                            \
        }                                                                                              \
      }                                                                                                \
      block_finish_##E(x, ldx, m0, m1, K, w, b, nn, y, ldy, acc, ldacc);                               \
    }                                                                                                  \
  }
#if VW == 16
#define SLOT_CALL_T slot_tile_4x4
#else
#define SLOT_CALL_T slot_tile_3x4
#endif
DOT_BLOCK(bf16)
DOT_BLOCK(f16)

/* A few rows on AVX2 (3 .. FEW_ROWS: decoding a batch, speculative decoding's check): block_dot's sums
 * (the same chains, each from zero over t in order, then tree8 and dot_tail) with W read as it lies and
 * converted in registers. block_dot converts each chunk of W to fp32 in a buffer and block_bc packs it,
 * a cost paid once per weight and shared by the rows, which few rows do not repay. A tile is up to 3 rows
 * x 2 outputs x 2 slots (12 accumulators; per 12 FMAs 4 loads of W and 6 of x), over all of K in one
 * pass, four passes (slot pairs) per tile; the first pass of each pair of outputs fetches the next pair's
 * rows of W into L2. On a Zen 3 EPYC (AVX2), the 3B shape's layers cold, two threads: 3 rows 1.67x the
 * broadcast chains, 4 rows 1.56x, 8 rows 1.30x, 12 rows 1.08x (16 rows: no better, left to them); the
 * 160M shape's at one thread 1.68x at 3 rows, 1.36x at 11. */
#if VW == 8 && !defined(__aarch64__)
#define FEW_ROWS 12
#define FEW_TILE(E, MT, NT)                                                                            \
  static inline __attribute__((always_inline)) void few_tile_##E##_##MT##x##NT(                        \
      const float* x, int ldx, const uint16_t* w, int K, int T, int r0, float* acc, int ldacc) {       \
    vf a[MT][NT][2];                                                                                   \
    for (int m = 0; m < MT; m++)                                                                       \
      for (int n = 0; n < NT; n++) a[m][n][0] = a[m][n][1] = vzero();                                  \
    const float* xr = x + (int64_t)r0 * T * VW; /* slot r0 + s of x at ((r0 + s) T + t) VW */          \
    const uint16_t* wr = w + r0 * VW;                                                                  \
    for (int t = 0; t < T; t++) {                                                                      \
      if (r0 == 0)                                                                                     \
        for (int n = 0; n < NT; n++) {                                                                 \
          prefetch_t1(wr + (int64_t)(n + NT) * K + t * 8 * VW);                                        \
          prefetch_t1(wr + (int64_t)(n + NT) * K + t * 8 * VW + 4 * VW);                               \
        }                                                                                              \
      for (int s = 0; s < 2; s++) {                                                                    \
        vf wv[NT];                                                                                     \
        for (int n = 0; n < NT; n++) wv[n] = wload_##E(wr + (int64_t)n * K + t * 8 * VW + s * VW);    \
        for (int m = 0; m < MT; m++) {                                                                 \
          vf xv = vload(xr + (int64_t)m * ldx + ((int64_t)s * T + t) * VW);                            \
          for (int n = 0; n < NT; n++) a[m][n][s] = vfma(xv, wv[n], a[m][n][s]);                       \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
    for (int m = 0; m < MT; m++)                                                                       \
      for (int n = 0; n < NT; n++)                                                                     \
        for (int s = 0; s < 2; s++) vstore(acc + (int64_t)m * ldacc + (n * 8 + r0 + s) * VW, a[m][n][s]); \
  }
/* Every row (M <= FEW_ROWS, x in fp32 slot by slot as block_dot takes it) x up to 16 outputs. */
#define FEW_BLOCK(E)                                                                                   \
  FEW_TILE(E, 1, 1) FEW_TILE(E, 2, 1) FEW_TILE(E, 3, 1) FEW_TILE(E, 1, 2) FEW_TILE(E, 2, 2) FEW_TILE(E, 3, 2) \
  static void block_few_##E(const float* x, int ldx, int M, int K, const uint16_t* w, const uint16_t* b, \
                            int nn, uint16_t* y, int ldy, float* acc) {                                \
    int T = K / (8 * VW), ldacc = BLOCK * 8 * VW;                                                      \
    for (int n0 = 0; n0 < nn; n0 += 2) {                                                               \
      const uint16_t* wn = w + (int64_t)n0 * K;                                                        \
      int two = nn - n0 >= 2;                                                                          \
      for (int r0 = 0; r0 < 8; r0 += 2)                                                                \
        for (int m = 0; m < M; m += 3) {                                                               \
          int mt = M - m < 3 ? M - m : 3;                                                              \
          const float* xm = x + (int64_t)m * ldx;                                                      \
          float* am = acc + (int64_t)m * ldacc + n0 * 8 * VW;                                          \
          if (two) {                                                                                   \
            if (mt == 3) few_tile_##E##_3x2(xm, ldx, wn, K, T, r0, am, ldacc);                         \
            else if (mt == 2) few_tile_##E##_2x2(xm, ldx, wn, K, T, r0, am, ldacc);                    \
            else few_tile_##E##_1x2(xm, ldx, wn, K, T, r0, am, ldacc);                                 \
          } else {                                                                                     \
            if (mt == 3) few_tile_##E##_3x1(xm, ldx, wn, K, T, r0, am, ldacc);                         \
            else if (mt == 2) few_tile_##E##_2x1(xm, ldx, wn, K, T, r0, am, ldacc);                    \
            else few_tile_##E##_1x1(xm, ldx, wn, K, T, r0, am, ldacc);                                 \
          }                                                                                            \
        }                                                                                              \
    }                                                                                                  \
    block_finish_##E(x, ldx, 0, M, K, w, b, nn, y, ldy, acc, ldacc);                                   \
  }
FEW_BLOCK(bf16)
FEW_BLOCK(f16)
#define FEW_FITS(M) ((M) > 2 && (M) <= FEW_ROWS)
#define FEW_BLOCK_CALL(E, ...) block_few_##E(__VA_ARGS__)
#else /* other builds: never taken */
#define FEW_FITS(M) 0
#define FEW_BLOCK_CALL(E, ...) (void)0
#endif

/* Decoding's rows (M <= 2), a thread's share of the blocks of outputs: the share cut in DOT_STREAMS parts
 * read side by side, output n of a block of each part at once (`dot_many`, the same bits as one at a
 * time). One core's reads of one row after another are bound by the lines in flight, not by the
 * arithmetic; two streams far apart keep more of them in flight (AVX2 build on a Zen 3 EPYC, the 3B
 * shape's layers at one row, cold: 1.12-1.24x at one thread, 1.17-1.42x at two; the same layers in the
 * caches 1.08x; 3 or 4 streams no better cold and 0.87x cached, their accumulators spilled). */
#ifndef DOT_STREAMS
#define DOT_STREAMS 2
#endif
#define DOT_MANY_(E, S) DOT_MANY(E, S)
#define DOT_MANY_CALL_(E, S, ...) dot_many_##E##_##S(__VA_ARGS__)
#define DOT_MANY_CALL(E, S, ...) DOT_MANY_CALL_(E, S, __VA_ARGS__)
#define DECODE_SHARE(E, S)                                                                             \
  /* blocks [lo, hi) of g for M <= 2 rows of x (fp32, ldx floats apart) */                             \
  static void decode_share_##E(const groups_t* g, const float* x, int ldx, int M, int K, int lo, int hi, \
                               uint16_t* y, int ldy) {                                                 \
    int part = (hi - lo + S - 1) / S;                                                                  \
    for (int i = 0; i < part; i++) {                                                                   \
      const uint16_t *ws[S], *bs[S];                                                                   \
      uint16_t* ys[S];                                                                                 \
      int nns[S];                                                                                      \
      for (int s = 0; s < S; s++) {                                                                    \
        int item = lo + s * part + i, n0 = 0, nn = 0;                                                  \
        if (item < hi) {                                                                               \
          int gi = block_of(g, item, &n0, &nn);                                                        \
          ws[s] = (const uint16_t*)g->w[gi] + (int64_t)n0 * K;                                         \
          bs[s] = g->b[gi] ? (const uint16_t*)g->b[gi] + n0 : 0;                                       \
          ys[s] = y + g->col[gi] + n0;                                                                 \
        }                                                                                              \
        nns[s] = nn;                                                                                   \
      }                                                                                                \
      for (int n = 0; n < BLOCK; n++) { /* the parts that still have an output n: all S, or fewer */   \
        const uint16_t* wn[S];                                                                         \
        int of[S], cnt = 0;                                                                            \
        for (int s = 0; s < S; s++)                                                                    \
          if (n < nns[s]) wn[cnt] = ws[s] + (int64_t)n * K, of[cnt++] = s;                             \
        if (!cnt) break;                                                                               \
        for (int m = 0; m < M; m++) {                                                                  \
          float sums[S];                                                                               \
          const float* xm = x + (int64_t)m * ldx;                                                      \
          if (cnt == S) DOT_MANY_CALL(E, S, xm, wn, K, sums);                                          \
          else for (int c = 0; c < cnt; c++) dot_many_##E##_1(xm, wn + c, K, sums + c);                \
          for (int c = 0; c < cnt; c++) {                                                              \
            int t = of[c];                                                                             \
            ys[t][(int64_t)m * ldy + n] = round_##E(bs[t] ? from_##E(bs[t][n]) + sums[c] : sums[c]);   \
          }                                                                                            \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
  }
DOT_MANY(bf16, 1)
DOT_MANY(f16, 1)
#if DOT_STREAMS > 1
DOT_MANY_(bf16, DOT_STREAMS)
DOT_MANY_(f16, DOT_STREAMS)
#endif
DECODE_SHARE(bf16, DOT_STREAMS)
DECODE_SHARE(f16, DOT_STREAMS)

/* Many rows on AVX2, K a multiple of 8 * VW up to BC_MAX_K: the same sums as block_dot, in another layout.
 * Each (row, output) sum of block_dot is 64 chains, chain c = 8 r + l (slot r, lane l) adding x[k] w[k] for
 * k = 64 t + c, t = 0, 1, ... in order, from zero, one FMA each; then tree8 over r and vsum over l. Here a
 * register holds one chain of 8 outputs (x[k] broadcast, W packed so that 16 outputs of one k lie side by
 * side), so a tile of BC_ROWS rows x 16 outputs makes 12 FMAs per 6 broadcasts and 2 loads of W, where
 * block_dot's 3 x 4 tile makes them per 15 loads (AVX2 has no broadcast memory operand for the lane-wise
 * form). The reductions are the same additions in the same order, done 8 outputs at a time. */
#if VW == 8 && !defined(__aarch64__)
#if BLOCK != 16
#error "the broadcast chains take blocks of 16 outputs (two registers)"
#endif
#define BC_ROWS 6
#define BC_ACC_FLOATS (8 * VW * BC_ROWS * 16) /* one tile's chains: acc[c][m][16] */
#define BC_MAX_K 16384 /* W's panel: 16 x K floats per thread (448 KB at the 3B shape's 6912: 1.5x block_dot on a Zen 3) */
#define BC_CHAINS(MR)                                                                                  \
  static inline __attribute__((always_inline)) void bc_chains_##MR(const float* xp, const float* wp, int T, \
                                                                   float* acc) {                      \
    for (int c = 0; c < 8 * VW; c++) {                                                                 \
      const float* xc = xp + (int64_t)c * T * MR;                                                      \
      const float* wc = wp + (int64_t)c * T * 16;                                                      \
      vf a[MR][2];                                                                                     \
      for (int m = 0; m < MR; m++) a[m][0] = vzero(), a[m][1] = vzero();                               \
      for (int t = 0; t < T; t++) {                                                                    \
        vf w0 = vload(wc + t * 16), w1 = vload(wc + t * 16 + 8);                                       \
        for (int m = 0; m < MR; m++) {                                                                 \
          vf xb = _mm256_broadcast_ss(xc + t * MR + m);                                                \
          a[m][0] = vfma(xb, w0, a[m][0]);                                                             \
          a[m][1] = vfma(xb, w1, a[m][1]);                                                             \
        }                                                                                              \
      }                                                                                                \
      for (int m = 0; m < MR; m++) {                                                                   \
        vstore(acc + ((int64_t)c * BC_ROWS + m) * 16, a[m][0]);                                        \
        vstore(acc + ((int64_t)c * BC_ROWS + m) * 16 + 8, a[m][1]);                                    \
      }                                                                                                \
    }                                                                                                  \
  }
BC_CHAINS(1)
BC_CHAINS(2)
BC_CHAINS(3)
BC_CHAINS(4)
BC_CHAINS(5)
BC_CHAINS(6)

/* Row m's 16 sums from its 64 chains (acc[c][m][16]): tree8 over the slots r, then vsum over the lanes l,
 * as the vertical additions they are, 8 outputs at a time; then dot_tail's `sum + 0` (K has no tail). */
static inline void bc_reduce(const float* acc, int m, float* out) {
  for (int h = 0; h < 16; h += 8) {
    vf v[8];
    for (int l = 0; l < 8; l++) {
#define BC_AT(r) vload(acc + ((int64_t)(8 * (r) + l) * BC_ROWS + m) * 16 + h)
      vf r0 = vadd(BC_AT(0), BC_AT(4)), r1 = vadd(BC_AT(1), BC_AT(5));
      vf r2 = vadd(BC_AT(2), BC_AT(6)), r3 = vadd(BC_AT(3), BC_AT(7));
#undef BC_AT
      r0 = vadd(r0, r2), r1 = vadd(r1, r3);
      v[l] = vadd(r0, r1);
    }
    vf t0 = vadd(v[0], v[4]), t1 = vadd(v[1], v[5]), t2 = vadd(v[2], v[6]), t3 = vadd(v[3], v[7]);
    vf s = vadd(vadd(t0, t2), vadd(t1, t3));
    vstore(out + h, vadd(s, vzero()));
  }
}

/* x (M rows of K, bf16 or f16) into fp32 tiles of BC_ROWS rows: tile i's chain c, step t, row m at
 * xp[i * BC_ROWS * K + (c * T + t) * mr + m], mr the tile's rows. */
#define BC_PACK_X(E)                                                                                   \
  static void bc_pack_x_##E(const uint16_t* x, int M, int K, int ldx, float* xp, int m) {             \
    int i = m / BC_ROWS, m0 = i * BC_ROWS, mr = M - m0 < BC_ROWS ? M - m0 : BC_ROWS, T = K / (8 * VW); \
    float* tile = xp + (int64_t)m0 * K;                                                                \
    const uint16_t* xm = x + (int64_t)m * ldx;                                                         \
    for (int t = 0; t < T; t++)                                                                        \
      for (int c = 0; c < 8 * VW; c++) tile[((int64_t)c * T + t) * mr + (m - m0)] = from_##E(xm[t * 8 * VW + c]); \
  }
BC_PACK_X(bf16)
BC_PACK_X(f16)

/* r[j] <- column j of the 8 x 8 floats in r (rows i). */
static inline void bc_transpose8(vf r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* W's nn <= 16 outputs (rows of K) in fp32, k by k: wp[(c * T + t) * 16 + n] = w[n][64 t + c], zeros past
 * nn; eight outputs x eight k at a time through a transpose. */
#define BC_PACK_W(E)                                                                                   \
  static void bc_pack_w_##E(const uint16_t* w, int K, int nn, float* wp) {                            \
    int T = K / (8 * VW);                                                                              \
    for (int n0 = 0; n0 < 16; n0 += 8)                                                                 \
      for (int t = 0; t < T; t++)                                                                      \
        for (int c0 = 0; c0 < 8 * VW; c0 += 8) {                                                       \
          vf r[8];                                                                                     \
          for (int i = 0; i < 8; i++)                                                                  \
            r[i] = n0 + i < nn ? wload_##E(w + (int64_t)(n0 + i) * K + t * 8 * VW + c0) : vzero();     \
          bc_transpose8(r);                                                                            \
          for (int j = 0; j < 8; j++) vstore(wp + ((int64_t)(c0 + j) * T + t) * 16 + n0, r[j]);        \
        }                                                                                              \
  }
BC_PACK_W(bf16)
BC_PACK_W(f16)

/* Every row x up to 16 outputs: W's outputs packed k by k (wp[(c * T + t) * 16 + n], zeros past nn), then
 * each tile of rows through its 64 chains and the reductions. */
#define BC_BLOCK(E)                                                                                    \
  static void block_bc_##E(const float* xp, int M, int K, const uint16_t* w, const uint16_t* b, int nn, \
                           uint16_t* y, int ldy, float* wp, float* acc) {                              \
    int T = K / (8 * VW);                                                                              \
    bc_pack_w_##E(w, K, nn, wp);                                                                       \
    for (int m0 = 0; m0 < M; m0 += BC_ROWS) {                                                          \
      int mr = M - m0 < BC_ROWS ? M - m0 : BC_ROWS;                                                    \
      const float* tile = xp + (int64_t)m0 * K;                                                        \
      switch (mr) {                                                                                    \
        case 6: bc_chains_6(tile, wp, T, acc); break;                                                  \
        case 5: bc_chains_5(tile, wp, T, acc); break;                                                  \
        case 4: bc_chains_4(tile, wp, T, acc); break;                                                  \
        case 3: bc_chains_3(tile, wp, T, acc); break;                                                  \
        case 2: bc_chains_2(tile, wp, T, acc); break;                                                  \
        default: bc_chains_1(tile, wp, T, acc); break;                                                 \
      }                                                                                                \
      for (int m = 0; m < mr; m++) {                                                                   \
        float s[16];                                                                                   \
        bc_reduce(acc, m, s);                                                                          \
        for (int n = 0; n < nn; n++)                                                                   \
          y[(int64_t)(m0 + m) * ldy + n] = round_##E(b ? from_##E(b[n]) + s[n] : s[n]);               \
      }                                                                                                \
    }                                                                                                  \
  }
BC_BLOCK(bf16)
BC_BLOCK(f16)
#define BC_FITS(M, K) ((M) > 2 && (K) % (8 * VW) == 0 && (K) <= BC_MAX_K)
#define BC_PACK_X_CALL(E, ...) bc_pack_x_##E(__VA_ARGS__)
#define BC_BLOCK_CALL(E, ...) block_bc_##E(__VA_ARGS__)
#else /* other builds: never taken (BC_FITS is 0) */
#define BC_FITS(M, K) 0
#define BC_ACC_FLOATS 0
#define BC_PACK_X_CALL(E, ...) (void)0
#define BC_BLOCK_CALL(E, ...) (void)0
#endif
/* stablelm_linear_<bf16|f16>_dot: x converted to fp32 once (rows padded to a multiple of VW floats),
 * then blocks of 16 outputs on the threads, each with its own buffers. 1 when a buffer cannot be had. */
#define DOT_ENTRY(E)                                                                                   \
  int stablelm_linear_##E##_dot(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int ldy, int G,  \
                                const void* w0, const void* b0, int n0, const void* w1, const void* b1, \
                                int n1, const void* w2, const void* b2, int n2, int kb, int threads) { \
    (void)kb;                                                                                          \
    groups_t g;                                                                                        \
    int N = make_groups(&g, BLOCK, G, w0, b0, n0, w1, b1, n1, w2, b2, n2);                                    \
    if (!N || M < 0 || K <= 0 || ldx < K || ldy < N || threads < 1) return 2;                          \
    if (M == 0) return 0;                                                                              \
    int ldf = (K + VW - 1) / VW * VW, few = FEW_FITS(M), bc = !few && BC_FITS(M, K);                    \
    float* xf = (float*)alloc64(sizeof(float) * (size_t)M * ldf);                                      \
    if (!xf) return 1;                                                                                 \
    int k64 = K / (8 * VW) * (8 * VW), T = k64 / (8 * VW);                                             \
    if (M <= 2)                                                                                        \
      for (int m = 0; m < M; m++)                                                                      \
        for (int k = 0; k < K; k++) xf[(int64_t)m * ldf + k] = from_##E(x[(int64_t)m * ldx + k]);      \
    int items = g.first[G], failed = 0;                                                                \
    /* Many rows: blocks of outputs dealt one at a time as threads come free, so that a thread the OS  \
     * deschedules (a shared CPU) leaves its share to the others (AVX2 build, 160M layers at 128 rows, \
     * two threads: 1.36-1.41x GFLOPS on this shared host, 1.3-1.4x beside a busy process); decoding's \
     * one row keeps contiguous shares (no difference measured, and each thread's prefetches run on    \
     * into its own next rows), read DOT_STREAMS at a time (decode_share). */                          \
    _Pragma("omp parallel num_threads(items < threads ? items : threads)")                             \
    {                                                                                                  \
      if (bc) {                                                                                         \
        _Pragma("omp for schedule(static)")                                                             \
        for (int m = 0; m < M; m++) BC_PACK_X_CALL(E, x, M, K, ldx, xf, m);                             \
      } else if (M > 2) { /* x in fp32, the blocks' part slot by slot (see block_dot), then the rest */ \
        _Pragma("omp for schedule(static)")                                                             \
        for (int m = 0; m < M; m++) {                                                                   \
          const uint16_t* xm = x + (int64_t)m * ldx;                                                   \
          float* fm = xf + (int64_t)m * ldf;                                                           \
          for (int t = 0; t < T; t++)                                                                  \
            for (int r = 0; r < 8; r++) vstore(fm + ((int64_t)r * T + t) * VW, wload_##E(xm + (t * 8 + r) * VW)); \
          for (int k = k64; k < K; k++) fm[k] = from_##E(xm[k]);                                       \
        }                                                                                              \
      }                                                                                                \
      float* wf = bc ? (float*)alloc64(sizeof(float) * BLOCK * (size_t)K)                               \
                  : M > 2 && !few ? (float*)alloc64(sizeof(float) * OUTS_T * CHUNK) : 0;                \
      float* acc = bc ? (float*)alloc64(sizeof(float) * BC_ACC_FLOATS)                                  \
                   : M > 2 ? (float*)alloc64(sizeof(float) * (size_t)(M < ROW_BLOCK ? M : ROW_BLOCK) * BLOCK * 8 * VW) : 0; \
      int ok = M <= 2 || ((wf || few) && acc);                                                         \
      if (!ok) {                                                                                       \
        _Pragma("omp atomic write") failed = 1;                                                        \
      }                                                                                                \
      if (M <= 2) { /* the same branch in every thread: none reaches the worksharing loop below */      \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                      \
        decode_share_##E(&g, xf, ldf, M, K, (int)((int64_t)items * t / nt),                            \
                         (int)((int64_t)items * (t + 1) / nt), y, ldy);                                \
      } else { /* every thread reaches the loop (a worksharing construct), doing nothing without buffers */ \
        _Pragma("omp for schedule(dynamic, 1)")                                                        \
        for (int item = 0; item < items; item++) {                                                     \
          if (!ok) continue;                                                                           \
          int n0_, nn;                                                                                 \
          int i = block_of(&g, item, &n0_, &nn);                                                       \
          const uint16_t* b = g.b[i] ? (const uint16_t*)g.b[i] + n0_ : 0;                              \
          if (few)                                                                                     \
            FEW_BLOCK_CALL(E, xf, ldf, M, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K, b, nn,         \
                           y + g.col[i] + n0_, ldy, acc);                                              \
          else if (bc)                                                                                 \
            BC_BLOCK_CALL(E, xf, M, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K, b, nn, y + g.col[i] + n0_, ldy, wf, acc); \
          else                                                                                         \
            block_dot_##E(xf, ldf, M, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K, b, nn,             \
                          y + g.col[i] + n0_, ldy, wf, acc);                                           \
        }                                                                                              \
      }                                                                                                \
      free(wf);                                                                                        \
      free(acc);                                                                                       \
    }                                                                                                  \
    free(xf);                                                                                          \
    return failed;                                                                                     \
  }
DOT_ENTRY(bf16)
DOT_ENTRY(f16)

/* ---- bfloat16 in oneDNN's orders (AVX512-BF16) ----------------------------------------------------- */
#if defined(__AVX512F__)
/* ---- bfloat16 in oneDNN's order on AVX-512 CPUs without AVX512-BF16, one row ------------------------ */
/* oneDNN's gemv for one row of bfloat16 on avx512_core (Intel's Skylake to Ice Lake and Tiger Lake; found
 * by probing torch's F.linear with ONEDNN_MAX_CPU_ISA=AVX512_CORE on a Xeon, K 768 to 6912 and tails):
 * vdpbf16ps emulated, so per output 16 lanes over K in steps of 32, lane l adding the product of k =
 * 32j + 2l + 1 and then that of 32j + 2l (K's tail as zeros), no blocking of K; the lanes summed l + l[+8],
 * then in adjacent pairs; then the bias in fp32 and one rounding to bfloat16. Products of two bfloat16
 * numbers are exact in fp32, so FMAs give the same sums. Any row count is computed row by row so, but
 * only one row is torch's order (more rows run oneDNN's gemm): the planner probes it for one row. */
#ifndef E5_ROWS
#define E5_ROWS 4
#endif
#ifndef E5_AHEAD
#define E5_AHEAD 1024 /* elements */
#endif
static inline float e5_reduce(__m512 acc) {
  float h[8];
  _mm256_storeu_ps(h, _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1)));
  float a0 = h[0] + h[1], a1 = h[2] + h[3], a2 = h[4] + h[5], a3 = h[6] + h[7];
  return (a0 + a1) + (a2 + a3);
}

/* x's row as its even and odd k in fp32 (16 of each per 32 k), zero padded to a multiple of 32 k */
static void e5_split_x(const uint16_t* x, int K, float* xe, float* xo) {
  for (int k = 0; k < K + 31; k += 32) {
    int kn = K - k < 32 ? K - k : 32;
    if (kn <= 0) break;
    __m512i v = _mm512_maskz_loadu_epi16(kn == 32 ? 0xffffffffu : (__mmask32)((1u << kn) - 1u), x + k);
    _mm512_storeu_ps(xe + k / 2, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    _mm512_storeu_ps(xo + k / 2, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u))));
  }
}

static void e5_block(const float* xe, const float* xo, int K, const uint16_t* w, const uint16_t* b, int nn,
                     uint16_t* y) {
  const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
  int kfull = K / 32 * 32;
  for (int r0 = 0; r0 < nn; r0 += E5_ROWS) {
    int rt = nn - r0 < E5_ROWS ? nn - r0 : E5_ROWS;
    __m512 acc[E5_ROWS];
    for (int r = 0; r < E5_ROWS; r++) acc[r] = _mm512_setzero_ps();
    const uint16_t* wr = w + (int64_t)r0 * K;
    for (int k = 0; k < kfull; k += 32) {
      __m512 e = _mm512_loadu_ps(xe + k / 2), o = _mm512_loadu_ps(xo + k / 2);
      for (int r = 0; r < rt; r++) {
        prefetch_t0(wr + (int64_t)r * K + k + E5_AHEAD); /* the rows follow one another: across their ends */
        __m512i v = _mm512_loadu_si512((const void*)(wr + (int64_t)r * K + k));
        acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), o, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e, acc[r]);
      }
    }
    if (kfull < K) {
      __mmask32 m = (__mmask32)((1u << (K - kfull)) - 1u);
      __m512 e = _mm512_loadu_ps(xe + kfull / 2), o = _mm512_loadu_ps(xo + kfull / 2);
      for (int r = 0; r < rt; r++) {
        __m512i v = _mm512_maskz_loadu_epi16(m, wr + (int64_t)r * K + kfull);
        acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), o, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e, acc[r]);
      }
    }
    for (int r = 0; r < rt; r++) {
      float t = e5_reduce(acc[r]);
      if (b) t += from_bf16(b[r0 + r]);
      y[r0 + r] = round_bf16(t);
    }
  }
}

/* stablelm_linear_bf16_avx512: oneDNN's one-row order on AVX-512 CPUs without AVX512-BF16 (above). */
int stablelm_linear_bf16_avx512(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int ldy, int G,
                                const void* w0, const void* b0, int n0, const void* w1, const void* b1,
                                int n1, const void* w2, const void* b2, int n2, int kb, int threads) {
  groups_t g;
  int N = make_groups(&g, BLOCK, G, w0, b0, n0, w1, b1, n1, w2, b2, n2);
  (void)kb;
  if (!N || M < 0 || K <= 0 || ldx < K || ldy < N || threads < 1) return 2;
  if (M == 0) return 0;
  int kp = (K + 31) / 32 * 32;
  size_t bytes = (size_t)M * kp * 4;
  float small[2 * 8 * 1024] __attribute__((aligned(64)));
  float* xs = bytes <= sizeof(small) ? small : (float*)_mm_malloc(bytes, 64);
  if (!xs) return 1;
  for (int m = 0; m < M; m++)
    e5_split_x(x + (int64_t)m * ldx, K, xs + (int64_t)m * kp, xs + (int64_t)m * kp + kp / 2);
  int items = g.first[G];
#pragma omp parallel for num_threads(items < threads ? items : threads) schedule(static)
  for (int item = 0; item < items; item++) {
    int n0_, nn;
    int i = block_of(&g, item, &n0_, &nn);
    const uint16_t* b = g.b[i] ? (const uint16_t*)g.b[i] + n0_ : 0;
    for (int m = 0; m < M; m++)
      e5_block(xs + (int64_t)m * kp, xs + (int64_t)m * kp + kp / 2, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K,
               b, nn, y + (int64_t)m * ldy + g.col[i] + n0_);
  }
  if (xs != small) _mm_free(xs);
  return 0;
}
#endif

#if defined(__AVX512BF16__)
/* Transposes 16 x 16 dwords in place: afterwards r[s] lane i = what r[i] lane s was. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

/* A block's edges (fewer than 16 rows: nn; fewer than 32 k: kn), zeros past them, transposed as whole
 * blocks are (see DP_TILE). */
static void load16_edge(__m512i r[16], const uint16_t* w, int K, int k, int nn, int kn) {
  __mmask32 mask = kn >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << kn) - 1u);
  for (int i = 0; i < 16; i++)
    r[i] = i < nn ? _mm512_maskz_loadu_epi16(mask, w + (int64_t)i * K + k) : _mm512_setzero_si512();
  transpose16(r);
}

#define BCAST(xm, s) ((__m512bh)_mm512_set1_epi32((int)(xm)[s]))

/* MT rows of x (pairs of k, zero padded to 32 k) x one block of 16 weight rows (nn of them), K in
 * blocks of kb, each summed from zero in one chain over its pairs of k, block sums added in order:
 * totals in `tot`. Each output is one lane: each step loads 64 bytes (32 k) of each of the 16 rows as
 * they lie and transposes them in registers (16 x 16 dwords), so that each line is read once. (Built
 * before from 128-bit pieces of four rows, each line read in four visits: where the rows lie 4 KB
 * apart (K = 2048: stablelm-2-1.6b's hidden size) the 16 rows share one set of an 8-way L1, and the
 * four visits missed it each time: 17 GB/s against 22.5 now on a Zen 4, one thread; the 160M step's
 * layers 11% faster.) The next block's rows (`next`, contiguous) are prefetched 1 KB a step, in address
 * order: all of them by the end.
 *
 * One block of 16 rows at a time, not more: the rows are read 64 bytes each per step, and the memory
 * system follows 16 such streams (with the prefetch of the next block) far better than 64; measured
 * on a 2-core AVX512-BF16 EPYC with weights too large for the caches, 16 rows read at 29-33 GB/s on
 * one thread where 64 (four chains) read at 15-21 and 32 at 23-27 (benchmarks in docs/speed.md).
 * Each row's line DP_AHEAD steps on is also asked for as the block goes: 3-11% faster there, one and
 * two threads, 160M and 3B shapes (2 to 12 steps on alike; none: the chain waits on L2). Both
 * prefetches are non-temporal (PREFETCHNTA): the weights are read once per token, and kept out of the
 * caches they leave the rest of the step's data and code there; the 160M shape's whole decode step is
 * 9-18% faster than with T1/T0 hints (one thread; 5-7% on two, 2% on the 3B shape), the kernel alone
 * 1-6%. That was a Zen 5. On a Zen 4 EPYC the same non-temporal prefetches read at half the speed
 * (10-11 GB/s on one thread of 32): there the next block goes to L2 (PREFETCHT1) and the rows' lines
 * are not asked for (20-22 GB/s; the 160M step 0.48x the time, the 3B step 0.75x at two threads).
 * `prefetch_modes[PF_DPBF16]` says which (0: non-temporal, 1: into L2). */
#define DP_ROWS 16
#define DP_AHEAD 8
#define DP_USE4(MT, q, c)                                                                              \
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                               \
    const uint32_t* xm = xk + (int64_t)m * ldp + 4 * (c);                                              \
    _Pragma("GCC unroll 4") for (int d = 0; d < 4; d++)                                                \
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)(q)[d], BCAST(xm, d));                               \
  }
#define DP_TILE(MT)                                                                                    \
  static void dp_tile_##MT(const uint32_t* xp, int ldp, const uint16_t* w, int K, int nn, int kb,      \
                           __m512 tot[], const char* next) {                                           \
    int64_t s1 = (int64_t)K * 2;                                                                       \
    const int l2 = prefetch_modes[PF_DPBF16];                                                          \
    for (int k0 = 0; k0 < K; k0 += kb) {                                                               \
      int k1 = k0 + kb < K ? k0 + kb : K;                                                              \
      __m512 acc[MT];                                                                                  \
      for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();                                       \
      for (int k = k0; k < k1; k += 32) {                                                              \
        const uint32_t* xk = xp + k / 2;                                                               \
        if (next && l2)                                                                                \
          for (int l = 0; l < DP_ROWS * 64; l += 64)                                                   \
            _mm_prefetch(next + (int64_t)k * 2 * DP_ROWS + l, _MM_HINT_T1);                             \
        else if (next)                                                                                 \
          for (int l = 0; l < DP_ROWS * 64; l += 64)                                                   \
            _mm_prefetch(next + (int64_t)k * 2 * DP_ROWS + l, _MM_HINT_NTA);                            \
        __m512i r[16];                                                                                 \
        if (nn == DP_ROWS && k1 - k >= 32) {                                                           \
          const char* r0 = (const char*)(w + k);                                                       \
          if (!l2 && k + 32 * DP_AHEAD < K)                                                            \
            for (int i = 0; i < DP_ROWS; i++) _mm_prefetch(r0 + 64 * DP_AHEAD + i * s1, _MM_HINT_NTA);   \
          _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(r0 + i * s1); \
          transpose16(r);                                                                              \
        } else { /* an edge: part of the rows or of the k */                                           \
          load16_edge(r, w, K, k, nn, k1 - k);                                                         \
        }                                                                                              \
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) { DP_USE4(MT, r + 4 * c, c) }              \
      }                                                                                                \
      for (int m = 0; m < MT; m++) tot[m] = k0 == 0 ? acc[m] : _mm512_add_ps(tot[m], acc[m]);          \
    }                                                                                                  \
  }
DP_TILE(1)
DP_TILE(2)
DP_TILE(3)
DP_TILE(4)
/* 8 and 12 rows: speculative decoding's checks (up to ~11 rows on the one-row plan), each block of weight
 * rows transposed once for more rows of x, with 8-12 chains of vdpbf16ps (latency ~6 cycles) where 4
 * left the unit idle; and 3 (7 and 11 rows: 4 + 3, 8 + 3). 3B layers, two threads: 11 rows 1.21-1.24x,
 * 12 rows 1.18x, 7 rows 1.2x, 8 rows 1.06-1.18x, 1-4 rows unchanged; the same bits (each row's chain
 * is the same whatever the tile). */
DP_TILE(8)
DP_TILE(12)

/* All M rows x one block of up to 16 outputs (nn). `xp` holds x's rows as dwords of k, zero padded to a
 * multiple of 32 k (ldp dwords apart): a block's tail multiplies zeros, as oneDNN's padding does. */
static void block_dpbf16(const uint32_t* xp, int ldp, int M, int K, const uint16_t* w, const uint16_t* b,
                         int nn, uint16_t* y, int ldy, int kb, const void* next) {
  __mmask16 out = nn == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nn) - 1u);
  __m512 bias = _mm512_setzero_ps();
  if (b) bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(out, b)), 16));
  for (int m0 = 0; m0 < M;) {
    int mt = M - m0 >= 12 ? 12 : M - m0 >= 8 ? 8 : M - m0 >= 4 ? 4 : M - m0 >= 3 ? 3 : M - m0 >= 2 ? 2 : 1;
    const uint32_t* xm = xp + (int64_t)m0 * ldp;
    /* prefetch the next block while the first rows pass over this one (later rows find it cached) */
    const char* pf = m0 == 0 ? (const char*)next : 0;
    __m512 tot[12] = {0}; /* the tile sets its mt rows (zeroed only so that GCC sees them set) */
    if (mt == 12) dp_tile_12(xm, ldp, w, K, nn, kb, tot, pf);
    else if (mt == 8) dp_tile_8(xm, ldp, w, K, nn, kb, tot, pf);
    else if (mt == 4) dp_tile_4(xm, ldp, w, K, nn, kb, tot, pf);
    else if (mt == 3) dp_tile_3(xm, ldp, w, K, nn, kb, tot, pf);
    else if (mt == 2) dp_tile_2(xm, ldp, w, K, nn, kb, tot, pf);
    else dp_tile_1(xm, ldp, w, K, nn, kb, tot, pf);
    for (int m = 0; m < mt; m++) {
      __m512 v = b ? _mm512_add_ps(tot[m], bias) : tot[m];
      _mm256_mask_storeu_epi16(y + (int64_t)(m0 + m) * ldy, out, (__m256i)_mm512_cvtneps_pbh(v));
    }
    m0 += mt;
  }
}

/* x's rows as pairs of k, zero padded to a multiple of 32 k. */
static void pack_x(uint32_t* xp, int ldp, const uint16_t* x, int M, int K, int ldx) {
  for (int m = 0; m < M; m++) {
    uint16_t* row = (uint16_t*)(xp + (int64_t)m * ldp);
    memcpy(row, x + (int64_t)m * ldx, (size_t)K * 2);
    memset(row + K, 0, (size_t)(2 * ldp - K) * 2);
  }
}

/* stablelm_linear_bf16_dpbf16: oneDNN's order on AVX512-BF16 CPUs without AMX. */
int stablelm_linear_bf16_dpbf16(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int ldy, int G,
                                const void* w0, const void* b0, int n0, const void* w1, const void* b1,
                                int n1, const void* w2, const void* b2, int n2, int kb, int threads) {
  groups_t g;
  int N = make_groups(&g, DP_ROWS, G, w0, b0, n0, w1, b1, n1, w2, b2, n2);
  if (!N || M < 0 || K <= 0 || ldx < K || ldy < N || threads < 1 || kb < 32 || kb % 32) return 2;
  if (M == 0) return 0;
  int ldp = (K + 31) / 32 * 16;
  size_t bytes = (size_t)M * ldp * 4;
  uint32_t small[8 * 1024] __attribute__((aligned(64)));  /* decoding's few rows: on the stack */
  uint32_t* xp = bytes <= sizeof(small) ? small : (uint32_t*)_mm_malloc(bytes, 64);
  if (!xp) return 1;
  pack_x(xp, ldp, x, M, K, ldx);
  int items = g.first[G];
#pragma omp parallel for num_threads(items < threads ? items : threads) schedule(static)
  for (int item = 0; item < items; item++) {
    int n0_, nn;
    int i = block_of(&g, item, &n0_, &nn);
    const uint16_t* b = g.b[i] ? (const uint16_t*)g.b[i] + n0_ : 0;
    const void* next = 0;
    if (item + 1 < items) { /* this thread's next block, as schedule(static) deals them */
      int n1_, nn1;
      int j = block_of(&g, item + 1, &n1_, &nn1);
      next = (const uint16_t*)g.w[j] + (int64_t)n1_ * K;
    }
    block_dpbf16(xp, ldp, M, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K, b, nn, y + g.col[i] + n0_,
                 ldy, kb, next);
  }
  if (xp != small) _mm_free(xp);
  return 0;
}

/* ---- bfloat16 in oneDNN's order on AMX CPUs, on AMX ------------------------------------------------ */
/* oneDNN's AMX kernel computes each output as TDPBF16PS computes it (two chains per 32 k, over the even
 * and the odd k, added to the tile), its calls over K from zero, their sums added in fp32 in order,
 * then the bias and one rounding. The same instruction over the same steps gives the same bits; here
 * the tile's rows are the weight's rows as they lie (A = 16 rows x 32 k, with the row stride: no
 * transposing) and B holds x's pairs (16 pairs x M columns). Up to 16 rows of x. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) tilecfg_t;

static int amx_permitted(void) { /* Linux asks each process to request the tiles' state once */
  static int state; /* 0 not asked, 1 granted, -1 refused */
  if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
  return state > 0;
}

static void block_amx(const uint32_t* xb, int M, int K, const uint16_t* w, const uint16_t* b, int nn,
                      uint16_t* y, int ldy, int kb) {
  float part[16 * 16] __attribute__((aligned(64))), tot[16 * 16] __attribute__((aligned(64)));
  uint16_t edge[16 * 32] __attribute__((aligned(64)));
  for (int k0 = 0; k0 < K; k0 += kb) {
    int k1 = k0 + kb < K ? k0 + kb : K;
    _tile_zero(0);
    for (int k = k0; k < k1; k += 32) {
      if (nn == 16 && k + 32 <= K) {
        _tile_loadd(1, w + k, K * 2);
      } else { /* the block's edge: rows past nn and k past K read as zeros */
        memset(edge, 0, sizeof(edge));
        int kn = K - k < 32 ? K - k : 32;
        for (int r = 0; r < nn; r++) memcpy(edge + 32 * r, w + (int64_t)r * K + k, (size_t)kn * 2);
        _tile_loadd(1, edge, 64);
      }
      _tile_loadd(2, xb + (int64_t)(k / 32) * 16 * M, M * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, part, M * 4);  /* 16 outputs x M rows */
    for (int i = 0; i < 16 * M; i += 16) {
      __m512 p = _mm512_load_ps(part + i);
      _mm512_store_ps(tot + i, k0 == 0 ? p : _mm512_add_ps(_mm512_load_ps(tot + i), p));
    }
  }
  __mmask16 out = nn == 16 ? (__mmask16)0xffff : (__mmask16)((1u << nn) - 1u);
  __m512 bias = _mm512_setzero_ps();
  if (b) bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(out, b)), 16));
  for (int m = 0; m < M; m++) {
    __m512 v = _mm512_i32gather_ps(_mm512_mullo_epi32(_mm512_set1_epi32(M), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)), tot + m, 4);
    if (b) v = _mm512_add_ps(v, bias);
    _mm256_mask_storeu_epi16(y + (int64_t)m * ldy, out, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

int stablelm_linear_bf16_amx(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int ldy, int G,
                             const void* w0, const void* b0, int n0, const void* w1, const void* b1, int n1,
                             const void* w2, const void* b2, int n2, int kb, int threads) {
  groups_t g;
  int N = make_groups(&g, BLOCK, G, w0, b0, n0, w1, b1, n1, w2, b2, n2);
  if (!N || M < 0 || M > 16 || K <= 0 || ldx < K || ldy < N || threads < 1 || kb < 32 || kb % 32) return 2;
  if (M == 0) return 0;
  if (!amx_permitted()) return 3;
  /* B: per 32 k, 16 pairs x M columns (x's rows), zero padded */
  int steps = (K + 31) / 32;
  size_t bytes = (size_t)steps * 16 * M * 4;
  uint32_t small[8 * 1024] __attribute__((aligned(64)));
  uint32_t* xb = bytes <= sizeof(small) ? small : (uint32_t*)_mm_malloc(bytes, 64);
  if (!xb) return 1;
  memset(xb, 0, bytes);
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) {
      int s = k / 32, p = (k % 32) / 2;
      ((uint16_t*)(xb + ((int64_t)s * 16 + p) * M + m))[k % 2] = x[(int64_t)m * ldx + k];
    }
  int items = g.first[G];
#pragma omp parallel num_threads(items < threads ? items : threads)
  {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = (uint16_t)(M * 4); /* C: 16 outputs x M fp32 */
    cfg.rows[1] = 16, cfg.colsb[1] = 64;                /* A: 16 weight rows x 32 k */
    cfg.rows[2] = 16, cfg.colsb[2] = (uint16_t)(M * 4); /* B: 16 pairs x M */
    _tile_loadconfig(&cfg);
#pragma omp for schedule(static)
    for (int item = 0; item < items; item++) {
      int n0_, nn;
      int i = block_of(&g, item, &n0_, &nn);
      const uint16_t* b = g.b[i] ? (const uint16_t*)g.b[i] + n0_ : 0;
      block_amx(xb, M, K, (const uint16_t*)g.w[i] + (int64_t)n0_ * K, b, nn, y + g.col[i] + n0_, ldy, kb);
    }
    _tile_release();
  }
  if (xb != small) _mm_free(xb);
  return 0;
}
#endif
#endif

/* ---- rotary embedding, as torch's elementwise kernels compute it ------------------------------------- */
/* y = cat(x_rot * cos + rotate_half(x_rot) * sin, x_pass) for x (B, T, H, D) (any strides over B, T, H;
 * D contiguous) and cos/sin (B, T, rot) contiguous; y contiguous with strides (ysb, yst, ysh). Each of
 * the three operations is computed in fp32 and rounded to the dtype on its own, as torch does (a
 * product rounded before the sum: no FMA). Python's `stablelm.rope.apply_rotary` replaced by one call. */
#define ROTARY(E, LOAD, STORE)                                                                         \
  /* one head: yr = rotary(xr) over the first rot channels, a copy after them */                        \
  static inline void rotate_head_##E(const elem_##E* xr, const elem_##E* c, const elem_##E* s,          \
                                     elem_##E* yr, int D, int rot) {                                    \
    int half = rot / 2;                                                                                \
    for (int d = 0; d < rot; d++) {                                                                    \
      float r = d < half ? -LOAD(xr[d + half]) : LOAD(xr[d - half]);                                   \
      float a = LOAD(STORE(LOAD(xr[d]) * LOAD(c[d])));                                                 \
      float e = LOAD(STORE(r * LOAD(s[d])));                                                           \
      yr[d] = STORE(a + e);                                                                            \
    }                                                                                                  \
    for (int d = rot; d < D; d++) yr[d] = xr[d];                                                       \
  }                                                                                                    \
  int stablelm_rotary_##E(const elem_##E* x, int64_t sb, int64_t st, int64_t sh, const elem_##E* cs,    \
                          const elem_##E* sn, elem_##E* y, int64_t ysb, int64_t yst, int64_t ysh, int B,   \
                          int T, int H, int D, int rot) {                                              \
    if (B < 0 || T < 0 || H < 0 || D <= 0 || rot < 0 || rot > D || rot % 2) return 2;                 \
    for (int b = 0; b < B; b++)                                                                        \
      for (int t = 0; t < T; t++) {                                                                    \
        const elem_##E* c = cs + ((int64_t)b * T + t) * rot;                                           \
        const elem_##E* s = sn + ((int64_t)b * T + t) * rot;                                           \
        for (int h = 0; h < H; h++)                                                                    \
          rotate_head_##E(x + b * sb + t * st + h * sh, c, s, y + b * ysb + t * yst + h * ysh, D, rot); \
      }                                                                                                \
    return 0;                                                                                          \
  }                                                                                                    \
  /* One decoded token per row: qkv (B, (H + 2 Hkv) D) rows of stride `sq` (q, k, v heads side by side), \
   * cos/sin (B, rot). Rotates q into q_out (B, H, D) contiguous, rotates k into the key cache's slot and \
   * copies v into the value cache's, both caches (B, Hkv, S, D) contiguous with S = `slots`: the       \
   * rotary above, the cache writes `index_copy_` makes, in one call. */                                \
  int stablelm_decode_qkv_##E(const elem_##E* qkv, int64_t sq, const elem_##E* cs, const elem_##E* sn,  \
                              elem_##E* q_out, elem_##E* kc, elem_##E* vc, int64_t slots, int64_t slot, \
                              int B, int H, int Hkv, int D, int rot) {                                 \
    if (B < 0 || H < 0 || Hkv < 0 || D <= 0 || rot < 0 || rot > D || rot % 2 || slot < 0 ||             \
        slot >= slots)                                                                                 \
      return 2;                                                                                        \
    for (int b = 0; b < B; b++) {                                                                      \
      const elem_##E* row = qkv + b * sq;                                                              \
      const elem_##E* c = cs + (int64_t)b * rot;                                                       \
      const elem_##E* s = sn + (int64_t)b * rot;                                                       \
      for (int h = 0; h < H; h++)                                                                      \
        rotate_head_##E(row + (int64_t)h * D, c, s, q_out + ((int64_t)b * H + h) * D, D, rot);         \
      for (int h = 0; h < Hkv; h++) {                                                                  \
        int64_t at = (((int64_t)b * Hkv + h) * slots + slot) * D;                                      \
        rotate_head_##E(row + (int64_t)(H + h) * D, c, s, kc + at, D, rot);                            \
        memcpy(vc + at, row + (int64_t)(H + Hkv + h) * D, (size_t)D * sizeof(elem_##E));              \
      }                                                                                                \
    }                                                                                                  \
    return 0;                                                                                          \
  }
static inline float ident_f32(float v) { return v; }
ROTARY(bf16, from_bf16, round_bf16)
ROTARY(f16, from_f16, round_f16)
ROTARY(f32, ident_f32, ident_f32)

/* Reads `bytes` (a multiple of 256, 64-byte aligned) with `threads` threads; returns an XOR of what it
 * read, so that the reads cannot be optimized away. The machine's read bandwidth, for benchmarks. */
uint64_t stablelm_read(const uint8_t* p, int64_t bytes, int threads) {
  int64_t lines = bytes / 64;
  uint64_t result = 0;
#pragma omp parallel num_threads(threads)
  {
#if defined(__aarch64__)
    uint64x2_t a0 = vdupq_n_u64(0), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < lines; i++) {
      const uint64_t* q = (const uint64_t*)(p + i * 64);
      a0 = veorq_u64(a0, vld1q_u64(q)), a1 = veorq_u64(a1, vld1q_u64(q + 2));
      a2 = veorq_u64(a2, vld1q_u64(q + 4)), a3 = veorq_u64(a3, vld1q_u64(q + 6));
    }
    uint64x2_t a = veorq_u64(veorq_u64(a0, a1), veorq_u64(a2, a3));
    uint64_t r = vgetq_lane_u64(a, 0) ^ vgetq_lane_u64(a, 1);
#else
#if defined(__AVX512F__)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < lines / 2; i++) {
      const __m512i* q = (const __m512i*)(p + i * 128);
      a0 = _mm512_xor_si512(a0, _mm512_load_si512(q));
      a1 = _mm512_xor_si512(a1, _mm512_load_si512(q + 1));
    }
    __m512i a = _mm512_xor_si512(a0, a1);
    __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
#else
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < lines; i++) {
      const __m256i* q = (const __m256i*)(p + i * 64);
      a0 = _mm256_xor_si256(a0, _mm256_load_si256(q));
      a1 = _mm256_xor_si256(a1, _mm256_load_si256(q + 1));
    }
    __m256i h = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
#endif
    uint64_t r = (uint64_t)_mm256_extract_epi64(h, 0) ^ (uint64_t)_mm256_extract_epi64(h, 1) ^
                 (uint64_t)_mm256_extract_epi64(h, 2) ^ (uint64_t)_mm256_extract_epi64(h, 3);
#endif
#pragma omp atomic
    result ^= r;
  }
  return result;
}

/* ---- a linear call planned once (the decode step's: `stablelm.lean_step`) ----------------------------- */
/* Every stablelm_linear_* kernel above, with all of its arguments but the input fixed in a struct made
 * once: each call then passes two pointers instead of eighteen arguments through ctypes. */
typedef int (*linear_fn)(const void* x, int M, int K, int ldx, void* y, int ldy, int G, const void* w0,
                         const void* b0, int n0, const void* w1, const void* b1, int n1, const void* w2,
                         const void* b2, int n2, int kb, int threads);
typedef struct {
  linear_fn fn;
  void* y;
  const void *w0, *b0, *w1, *b1, *w2, *b2;
  int64_t M, K, ldx, ldy, G, n0, n1, n2, kb, threads;
} planned_linear_t;

int stablelm_linear_planned(const planned_linear_t* p, const void* x) {
  return p->fn(x, (int)p->M, (int)p->K, (int)p->ldx, p->y, (int)p->ldy, (int)p->G, p->w0, p->b0, (int)p->n0,
               p->w1, p->b1, (int)p->n1, p->w2, p->b2, (int)p->n2, (int)p->kb, (int)p->threads);
}
