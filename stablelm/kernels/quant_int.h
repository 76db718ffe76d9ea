/* Part of quant.c, included there (not compiled alone: it uses quant.c's definitions above the include).
 * The kernels that sum in integers over x made int16 per block (x_to_i16): AVX2's one-row
 * kernels, int4's AVX-VNNI and AVX512-VNNI kernels of one and of 2 to 8 rows. */

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
        if ((k & 63) == 0) QPF(r[i] + k + PFD);
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
   per 32 bytes (64 weights) an and, a shift and an and, four vpmaddubsw and int16 additions. A group's
   int16 sums stay below 2^15 for groups of up to 256 (the caller's condition); at its end they are
   widened with vpmaddwd (h's by 256) into 8 int32 lanes. Groups are taken 8 at a time: their 8 vectors
   of lanes are summed across (vphaddd) into one vector holding each group's exact integer total, which
   is converted and scaled by the 8 groups' s_g * xinv_g at once, the minimum's share (m_g * sum of the
   group's x) added beside; the 8 lanes are summed at the row's end. Before (to 2026-12-07) each group's
   lanes were converted and scaled on their own, about 40 instructions per group of 64 against ~15 now:
   1.3-1.5x on a Zen 3 EPYC (3B layers, cold, 2 threads). Q4I rows far apart are read at once (two
   streams of W per thread): 1.05-1.2x over one with these sums; one was better with the old ones, whose
   16 live vectors per row left no registers for a second. GS: the group size when known at compile
   time (64, 128; 0: `group`). */
#ifndef Q4I
#define Q4I 2
#endif
static inline __attribute__((always_inline)) __m256 q4_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

/* one group's sums of S rows, 8 int32 lanes each, into t[i] (zero for a group past the last) */
static inline __attribute__((always_inline)) void q4_group_i16(const int8_t* xh, const int8_t* xl, int g, int G,
                                                               int group, const uint8_t* const* r, const int S,
                                                               __m256i* t) {
  const __m256i low = _mm256_set1_epi8(15);
  __m256i ah[Q4I], al[Q4I];
  for (int i = 0; i < S; i++) ah[i] = al[i] = _mm256_setzero_si256();
  if (g < G) {
    const int8_t *hp = xh + (size_t)g * group, *lp = xl + (size_t)g * group;
    for (int j = 0; j < group; j += 64, hp += 64, lp += 64) {
      __m256i h0 = _mm256_loadu_si256((const __m256i*)hp), h1 = _mm256_loadu_si256((const __m256i*)(hp + 32));
      __m256i l0 = _mm256_loadu_si256((const __m256i*)lp), l1 = _mm256_loadu_si256((const __m256i*)(lp + 32));
      for (int i = 0; i < S; i++) {
        const uint8_t* p = r[i] + ((size_t)g * group + j) / 2;
        if ((((size_t)g * group + j) & 127) == 0) QPF(p + PFD);
        __m256i v = _mm256_loadu_si256((const __m256i*)p);
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        ah[i] = _mm256_add_epi16(ah[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, h0), _mm256_maddubs_epi16(hi, h1)));
        al[i] = _mm256_add_epi16(al[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, l0), _mm256_maddubs_epi16(hi, l1)));
      }
    }
  }
  for (int i = 0; i < S; i++)
    t[i] = _mm256_add_epi32(_mm256_madd_epi16(ah[i], _mm256_set1_epi16(256)), _mm256_madd_epi16(al[i], _mm256_set1_epi16(1)));
}

/* the totals of 4 groups (a, b, c, d in turn) summed across as vphaddd does: lane k of the 128-bit half h
   holds group k's lanes 4h..4h+3 */
static inline __attribute__((always_inline)) void q4_four_groups(const int8_t* xh, const int8_t* xl, int g, int G,
                                                                 int group, const uint8_t* const* r, const int S,
                                                                 __m256i* q) {
  __m256i a[Q4I], b[Q4I], ab[Q4I];
  q4_group_i16(xh, xl, g, G, group, r, S, a);
  q4_group_i16(xh, xl, g + 1, G, group, r, S, b);
  for (int i = 0; i < S; i++) ab[i] = _mm256_hadd_epi32(a[i], b[i]);
  q4_group_i16(xh, xl, g + 2, G, group, r, S, a);
  q4_group_i16(xh, xl, g + 3, G, group, r, S, b);
  for (int i = 0; i < S; i++) q[i] = _mm256_hadd_epi32(ab[i], _mm256_hadd_epi32(a[i], b[i]));
}

static inline __attribute__((always_inline)) void q4_rows_i16(const int8_t* xh, const int8_t* xl, const float* xinv,
                                                              const float* xs, int K, int group, const int GS,
                                                              const uint8_t* w, const uint16_t* sc,
                                                              const uint16_t* mn, const int S, const int* rows,
                                                              float* out) {
  if (GS) group = GS;
  int G = K / group, half = K / 2;
  const uint8_t* r[Q4I];
  __m256 acc[Q4I];
  for (int i = 0; i < S; i++) r[i] = w + (size_t)rows[i] * half, acc[i] = _mm256_setzero_ps();
  for (int g0 = 0; g0 < G; g0 += 8) {
    int ng = G - g0 < 8 ? G - g0 : 8;
    __m256i q0[Q4I], q1[Q4I];
    q4_four_groups(xh, xl, g0, G, group, r, S, q0);
    q4_four_groups(xh, xl, g0 + 4, G, group, r, S, q1);
    __m256 xiv, xsv;
    if (ng == 8) {
      xiv = _mm256_loadu_ps(xinv + g0), xsv = _mm256_loadu_ps(xs + g0);
    } else {
      float xi8[8] = {0}, xs8[8] = {0};
      memcpy(xi8, xinv + g0, (size_t)ng * 4), memcpy(xs8, xs + g0, (size_t)ng * 4);
      xiv = _mm256_loadu_ps(xi8), xsv = _mm256_loadu_ps(xs8);
    }
    for (int i = 0; i < S; i++) {
      const uint16_t *sp = sc + (size_t)rows[i] * G + g0, *mp = mn + (size_t)rows[i] * G + g0;
      __m256 sv, mv;
      if (ng == 8) {
        sv = q4_bf16x8(sp), mv = q4_bf16x8(mp);
      } else {
        uint16_t s8[8] = {0}, m8[8] = {0};
        memcpy(s8, sp, (size_t)ng * 2), memcpy(m8, mp, (size_t)ng * 2);
        sv = q4_bf16x8(s8), mv = q4_bf16x8(m8);
      }
      /* lanes: groups 0-3's low halves, 4-7's low halves; then the high halves: summed, group k in lane k */
      __m256i tot = _mm256_add_epi32(_mm256_permute2x128_si256(q0[i], q1[i], 0x20),
                                     _mm256_permute2x128_si256(q0[i], q1[i], 0x31));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(sv, xiv), acc[i]);
      acc[i] = _mm256_fmadd_ps(mv, xsv, acc[i]);
    }
  }
  for (int i = 0; i < S; i++) out[i] = vsum(acc[i]);
}

static inline __attribute__((always_inline)) void q4_one_i16_g(const int8_t* xh, const int8_t* xl, const float* xinv,
                                                               const float* xs, int K, int group, const int GS,
                                                               const uint8_t* w, const uint16_t* sc,
                                                               const uint16_t* mn, int n0, int n1, float* out) {
  int len = (n1 - n0) / Q4I;
  for (int t = 0; t < len; t++) {
    int rows[Q4I];
    float o[Q4I];
    for (int i = 0; i < Q4I; i++) rows[i] = n0 + i * len + t;
    q4_rows_i16(xh, xl, xinv, xs, K, group, GS, w, sc, mn, Q4I, rows, o);
    for (int i = 0; i < Q4I; i++) out[i * len + t] = o[i];
  }
  for (int n = n0 + len * Q4I; n < n1; n++) q4_rows_i16(xh, xl, xinv, xs, K, group, GS, w, sc, mn, 1, &n, out + (n - n0));
}

static void q4_one_i16(const int8_t* xh, const int8_t* xl, const float* xinv, const float* xs, int K, int group,
                       const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1, float* out) {
  switch (group) {
    case 64: q4_one_i16_g(xh, xl, xinv, xs, K, group, 64, w, sc, mn, n0, n1, out); break;
    case 128: q4_one_i16_g(xh, xl, xinv, xs, K, group, 128, w, sc, mn, n0, n1, out); break;
    default: q4_one_i16_g(xh, xl, xinv, xs, K, group, 0, w, sc, mn, n0, n1, out); break;
  }
}

/* 2 to 8 rows of x, each through q4_rows_i16 itself (Q4I rows of W at a time, read again from the cache
   for each row of x): every row gets the one-row kernel's bits whatever rows share the call. dig: the rows'
   high digits (Kp apart), then their low ones. */
static inline __attribute__((always_inline)) void q4_multi_i16_g(const int8_t* dig, int Kp, const float* xinv,
                                                                 const float* xs, int K, int group, const int GS,
                                                                 const uint8_t* w, const uint16_t* sc,
                                                                 const uint16_t* mn, int n0, int n1, int M,
                                                                 float* out) {
  int G = K / group, rows[Q4I] = {0}; /* S of them set per pass (zeroed so that GCC sees them set) */
  float o[Q4I];
  for (int n = n0; n < n1; n += Q4I) {
    int S = n1 - n < Q4I ? n1 - n : Q4I;
    for (int i = 0; i < S; i++) rows[i] = n + i;
    for (int m = 0; m < M; m++) {
      const int8_t *xh = dig + (size_t)m * Kp, *xl = dig + (size_t)(M + m) * Kp;
      const float *xi = xinv + (size_t)m * G, *xsm = xs + (size_t)m * G;
      if (S == Q4I)
        q4_rows_i16(xh, xl, xi, xsm, K, group, GS, w, sc, mn, Q4I, rows, o);
      else
        for (int i = 0; i < S; i++) q4_rows_i16(xh, xl, xi, xsm, K, group, GS, w, sc, mn, 1, rows + i, o + i);
      for (int i = 0; i < S; i++) out[(n + i - n0) * 8 + m] = o[i];
    }
  }
}

static void q4_multi_i16(const int8_t* dig, int Kp, const float* xinv, const float* xs, int K, int group,
                         const uint8_t* w, const uint16_t* sc, const uint16_t* mn, int n0, int n1, int M, float* out) {
  switch (group) {
    case 64: q4_multi_i16_g(dig, Kp, xinv, xs, K, group, 64, w, sc, mn, n0, n1, M, out); break;
    case 128: q4_multi_i16_g(dig, Kp, xinv, xs, K, group, 128, w, sc, mn, n0, n1, M, out); break;
    default: q4_multi_i16_g(dig, Kp, xinv, xs, K, group, 0, w, sc, mn, n0, n1, M, out); break;
  }
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
        if ((j & 127) == 0) QPF(q + PFD);
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
static VNNI_FN void q4_digits_vnni(const int16_t* x16, int K, int8_t* xh, int8_t* xl) {
  static const int from[4] = {0, 64, 32, 96};
  const __m512i bias = _mm512_set1_epi16(128), byte = _mm512_set1_epi16(255);
  for (int k0 = 0; k0 < K; k0 += 128)
    for (int part = 0; part < 4; part++) { /* 32 inputs: l = ((v + 128) & 255) - 128, h = (v - l) / 256 */
      int k = k0 + from[part], d = k0 + part * 32, n = K - k < 0 ? 0 : K - k < 32 ? K - k : 32;
      __m512i v = _mm512_maskz_loadu_epi16(n == 32 ? (__mmask32)~0u : (__mmask32)((1u << n) - 1u), x16 + k);
      __m512i l = _mm512_sub_epi16(_mm512_and_si512(_mm512_add_epi16(v, bias), byte), bias);
      __m512i h = _mm512_srai_epi16(_mm512_sub_epi16(v, l), 8); /* v - l is a multiple of 256: exact */
      _mm256_storeu_si256((__m256i*)(xl + d), _mm512_cvtepi16_epi8(l));
      _mm256_storeu_si256((__m256i*)(xh + d), _mm512_cvtepi16_epi8(h));
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
      QPF(r[i] + k0 / 2 + PFD);
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
      QPF(r[i] + k0 / 2 + PFD);
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

/* stablelm_q4_linear's 2 to 8 bfloat16 rows (xf, xs: as float32, and their group sums) by q4_multi_vnni
   (AVX-512), q4_multi_avxvnni (AVX2 with AVX-VNNI: mode 2) or q4_multi_i16 (AVX2); a row holding Inf or
   NaN by q4_one_f32, as the one-row path computes it */
static int q4_linear_int_rows(const float* xf, const float* xs, int M, int K, void* y, int N, const uint8_t* w,
                              const uint16_t* sc, const uint16_t* mn, int group, const void* b, int mode,
                              int threads) {
  (void)mode;
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
#if defined(HAVE_AVXVNNI)
      if (mode & 2)
        q4_multi_avxvnni(dig, Kp, xinv, xs, K, group, w, sc, mn, c, c1, M, out);
      else
#endif
        q4_multi_i16(dig, Kp, xinv, xs, K, group, w, sc, mn, c, c1, M, out);
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
