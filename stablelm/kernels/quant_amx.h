/* Part of quant.c, included there (not compiled alone: it uses quant.c's definitions above the include).
 * 2 to 16 rows of bfloat16 x on AMX tiles (CPUs with AMX-INT8); many rows (prefill) on AMX-BF16 tiles. */

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
        for (int r = 16; r < 32; r++) QPF(w + (int64_t)r * K + k); /* next block */
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
        if ((t & 1) == 0) QPF(q + 16 * half); /* the next block's row */
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

/* ---- AMX-BF16, many rows of bfloat16 x (prefill) -----------------------------------------------------
   Dequantizing a whole layer into a buffer and multiplying with torch's kernel wrote and read the layer
   in bfloat16 through memory: prefill ran at 0.67-0.8x of bf16's on a 2-core Xeon. Here each thread
   takes 32 outputs at a time and, PKC inputs at a time, writes their weights as bfloat16 into 32 KB that
   stay in its L1 cache, as AMX's A tiles (16 outputs x 32 k): int4 dequantized (the values
   stablelm_q4_dequant makes, bit for bit), int8 as q itself (exact), its scale applied to the sums. x is
   laid out once as B tiles (per 32 k, 16 k-pairs x 16 rows; rows past M zero, read from L2), and
   TDPBF16PS sums each (16 outputs x 16 rows) float32 tile, 2 x 2 tiles at a time, every A tile used for
   all rows, the tiles kept in a buffer between runs of inputs. So int4's product is the dequantized
   weight's, as before, summed in float32 in another order; int8's sums q x exactly and then scales,
   where the dequantized weight was rounded to bfloat16 first. */
#if defined(QUANT_AMX) && defined(__AMX_BF16__)
#define QUANT_AMX_BF16 1
#ifndef PKC
#define PKC 256 /* inputs dequantized at a time (a multiple of 64) */
#endif
#ifndef PMB
#define PMB 128
#endif

static void p_tiles_config(void) {
  qtilecfg_t cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

/* rows [n0, n0 + 32) of W, inputs [k0, k0 + kn), as bfloat16 into a (2 x 16 rows of PKC, rows past N zero): int4
   dequantized (the values stablelm_q4_dequant makes, bit for bit), int8 q itself */
static void p_dequant(const void* w, const float* s, const uint16_t* sc, const uint16_t* mn, int group, int K, int N,
                      int n0, int k0, int kn, uint16_t* a) {
  for (int r = 0; r < 32; r++) {
    uint16_t* o = a + (int64_t)r * PKC;
    int n = n0 + r;
    if (n >= N) {
      memset(o, 0, (size_t)kn * 2);
      continue;
    }
    if (!group) { /* int8: q itself (exact in bfloat16); s[n] multiplies the output (p_store) */
      const int8_t* q = (const int8_t*)w + (int64_t)n * K + k0;
      for (int k = 0; k < kn; k += 32)
        _mm512_store_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(vload_i8(q + k + 16), vload_i8(q + k)));
      continue;
    }
    int G = K / group; /* int4: the group's 16 values, rounded once, looked up; runs of 64 k */
    const uint8_t* q = (const uint8_t*)w + (int64_t)n * (K / 2);
    for (int k = k0; k < k0 + kn; k += 64) {
      int g = k / group;
      q4_bf16_run(q + k / 2, q4_bf16_table(sc[(int64_t)n * G + g], mn[(int64_t)n * G + g]), o + (k - k0));
    }
  }
}

/* r[i][j] <- r[j][i], 16 x 16 elements of 32 bits */
static inline void p_transpose(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; i++)
    for (int q = 0; q < 4; q++) {
      t[8 * i + q] = _mm512_shuffle_i32x4(r[8 * i + q], r[8 * i + 4 + q], 0x88);
      t[8 * i + 4 + q] = _mm512_shuffle_i32x4(r[8 * i + q], r[8 * i + 4 + q], 0xdd);
    }
  for (int q = 0; q < 8; q++) {
    r[q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0xdd);
  }
}

/* a float32 tile t (16 outputs x 16 rows, rows 64 bytes apart) into y's rows [m0, m0 + mm), outputs [n0, n0 + nn):
   times s[n] (int8; NULL: 1) plus the bias, rounded to bfloat16 */
static inline void p_store(const float* t, int m0, int mm, int n0, int nn, uint16_t* y, int N, const float* s,
                           const uint16_t* b) {
  __mmask16 cols = nn >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nn) - 1u);
  __m512 bias = _mm512_setzero_ps();
  if (b) bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, b + n0)), 16));
  __m512 scale = s ? _mm512_maskz_loadu_ps(cols, s + n0) : _mm512_set1_ps(1.0f);
  __m512i r[16];
  for (int n = 0; n < 16; n++) r[n] = _mm512_load_si512(t + 16 * n);
  p_transpose(r); /* r[m]: row m's 16 outputs */
  for (int m = 0; m < mm; m++) {
    __m512 v = _mm512_fmadd_ps(_mm512_castsi512_ps(r[m]), scale, bias);
    _mm256_mask_storeu_epi16(y + (int64_t)(m0 + m) * N + n0, cols, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

/* y (M x N, bfloat16) = x (M rows of K, ldx apart, bfloat16) @ dequant(W)^T + b: q8 with s, q4 with sc, mn, group.
   Each thread takes 32 outputs at a time; for each PKC inputs of them (dequantized into 32 KB, kept in L1),
   every pair of 16-row chunks of x: its four float32 tiles loaded (or zeroed), summed over those inputs,
   stored (or, after the last inputs, written out). x's B tiles (M x K bfloat16) are read from L2.
   M rows of x at once (quant_prefill_amx cuts them into blocks). */
static int p_rows(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int N, const void* w, const float* s,
                  const uint16_t* sc, const uint16_t* mn, int group, const uint16_t* b, int threads) {
  int steps = K / 32, chunks = (M + 15) / 16, pairs = (chunks + 1) / 2;
  size_t chunk = (size_t)steps * 512; /* bfloat16 elements of one chunk's B tiles */
  uint16_t* xt = (uint16_t*)_mm_malloc((size_t)pairs * 2 * chunk * 2, 64);
  if (!xt) return 1;
  int blocks = (N + 31) / 32, status = 0, team = blocks < threads ? blocks : threads;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int c = 0; c < 2 * pairs; c++) { /* B tiles: chunk c, step k / 32, tile row (k % 32) / 2, column m % 16 */
    uint16_t* out = xt + (size_t)c * chunk;
    __m512i r[16];
    for (int st = 0; st < steps; st++) {
      for (int mm = 0; mm < 16; mm++) { /* row mm's 16 pairs of this step */
        int m = c * 16 + mm;
        r[mm] = m < M ? _mm512_loadu_si512(x + (int64_t)m * ldx + st * 32) : _mm512_setzero_si512();
      }
      p_transpose(r); /* r[i]: pair i of the 16 rows */
      for (int i = 0; i < 16; i++) _mm512_store_si512(out + ((size_t)st * 16 + i) * 32, r[i]);
    }
  }
#pragma omp parallel num_threads(team)
  {
    uint16_t* a = (uint16_t*)_mm_malloc((size_t)32 * PKC * 2, 64);
    float* acc = (float*)_mm_malloc((size_t)pairs * 4 * 256 * 4, 64);
    float t[4][256] __attribute__((aligned(64)));
    if (!a || !acc) {
#pragma omp atomic write
      status = 1;
    } else {
      p_tiles_config();
#pragma omp for schedule(static)
      for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * 32;
        for (int k0 = 0; k0 < K; k0 += PKC) {
          int kn = K - k0 < PKC ? K - k0 : PKC, last = k0 + kn == K;
          p_dequant(w, s, sc, mn, group, K, N, n0, k0, kn, a);
          for (int p = 0; p < pairs; p++) {
            float* cp = acc + (size_t)p * 1024;
            const uint16_t* b0 = xt + (size_t)(2 * p) * chunk + (size_t)(k0 / 32) * 512;
            const uint16_t* b1 = b0 + chunk;
            if (k0 == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, cp, 64);
              _tile_loadd(1, cp + 256, 64);
              _tile_loadd(2, cp + 512, 64);
              _tile_loadd(3, cp + 768, 64);
            }
            for (int st = 0; st < kn / 32; st++) {
              _tile_loadd(4, a + st * 32, PKC * 2);
              _tile_loadd(5, a + 16 * PKC + st * 32, PKC * 2);
              _tile_loadd(6, b0 + (size_t)st * 512, 64);
              _tile_loadd(7, b1 + (size_t)st * 512, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            if (!last) {
              _tile_stored(0, cp, 64);
              _tile_stored(1, cp + 256, 64);
              _tile_stored(2, cp + 512, 64);
              _tile_stored(3, cp + 768, 64);
              continue;
            }
            _tile_stored(0, t[0], 64);
            _tile_stored(1, t[1], 64);
            _tile_stored(2, t[2], 64);
            _tile_stored(3, t[3], 64);
            for (int i = 0; i < 4; i++) {
              int m0 = (2 * p + (i & 1)) * 16, nb = n0 + (i >> 1) * 16;
              int mm = M - m0 < 16 ? M - m0 : 16, nn = N - nb < 16 ? N - nb : 16;
              if (mm > 0 && nn > 0) p_store(t[i], m0, mm, nb, nn, y, N, group ? NULL : s, b);
            }
          }
        }
      }
      _tile_release();
    }
    _mm_free(a), _mm_free(acc);
  }
  _mm_free(xt);
  return status;
}

/* Returns -1 where it cannot run (K not a multiple of 64, no tiles), else a status. */
static int quant_prefill_amx(const uint16_t* x, int M, int K, int ldx, uint16_t* y, int N, const void* w, const float* s,
                             const uint16_t* sc, const uint16_t* mn, int group, const uint16_t* b, int threads) {
  if (M < 1 || K % 64 || !q_amx_permitted()) return -1;
  /* PMB rows at a time (each block dequantizes W again) */
  int rows = PMB;
  for (int m0 = 0; m0 < M; m0 += rows) {
    int mb = M - m0 < rows ? M - m0 : rows;
    int status = p_rows(x + (int64_t)m0 * ldx, mb, K, ldx, y + (int64_t)m0 * N, N, w, s, sc, mn, group, b, threads);
    if (status) return status;
  }
  return 0;
}
#endif
