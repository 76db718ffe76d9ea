/* The int8 screen of a bfloat16 LM head (part of quant.c; see stablelm/greedy_head.py, which proves the
 * bounds these functions compute and uses them).
 *
 * Greedy decoding needs the argmax of the head's logits, not the logits. An int8 copy of the head (one
 * float32 scale per row, as the int8 format) is read instead of the bfloat16 weight, half the bytes, and
 * gives approximate logits a[i]; each row carries a bound so that the logit torch computes (bfloat16,
 * whatever its summation order) lies within e[i] of a[i] (stablelm_q8_screen_prepare). The rows whose
 * interval reaches the best lower bound are the only ones that can hold the argmax (stablelm_q8_screen,
 * one call per step); the caller computes those exactly.
 */
#include <math.h>

/* vector helpers beside quant.c's: max, abs, sub, and the lanes the screen looks at */
#if defined(__AVX512F__)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vabs(a) _mm512_abs_ps(a)
#define vsub(a, b) _mm512_sub_ps(a, b)
static inline float vmaxall(vf v) { return _mm512_reduce_max_ps(v); }
/* lanes where v + e >= best, or v is NaN or +inf */
static inline unsigned vnotable(vf v, vf e, vf best) {
  return (unsigned)(_mm512_cmp_ps_mask(vadd(v, e), best, _CMP_GE_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) |
                    _mm512_cmp_ps_mask(v, vset1(INFINITY), _CMP_EQ_OQ));
}
#else
#define vmax(a, b) _mm256_max_ps(a, b)
#define vabs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vsub(a, b) _mm256_sub_ps(a, b)
static inline float vmaxall(vf v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
static inline unsigned vnotable(vf v, vf e, vf best) {
  __m256 m = _mm256_or_ps(_mm256_cmp_ps(vadd(v, e), best, _CMP_GE_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  m = _mm256_or_ps(m, _mm256_cmp_ps(v, vset1(INFINITY), _CMP_EQ_OQ));
  return (unsigned)_mm256_movemask_ps(m);
}
#endif
/* VW bfloat16 at p as floats */
#if defined(__AVX512F__)
static inline vf vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#define vround(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vmin(a, b) _mm512_min_ps(a, b)
static inline void vstore_i8(int8_t* p, vf v) {
  _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
}
#else
static inline vf vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#define vround(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vmin(a, b) _mm256_min_ps(a, b)
static inline void vstore_i8(int8_t* p, vf v) {
  __m256i i = _mm256_cvtps_epi32(v);
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64((__m128i*)p, _mm_packs_epi16(w, w));
}
#endif
/* The int8 copy of a bfloat16 weight w [N, K]: q [N, K] and scale s [N] (w ~ q * s, s = max |w| / 127,
 * q rounded to nearest), and per row bound[i] >= |w_i - s_i q_i|_2 + g (|w_i|_2 + |s_i q_i|_2) with
 * g = 2 (K + 16) 2^-24 (float32 rounding of any summation order over K products, both the screen's and
 * torch's). The sums of squares are float32 sums of non-negative terms (each within (K - 1) 2^-24 of
 * its value), enlarged by that and rounded up; *wmax >= the largest |w_i|_2. Returns 0, 2 on bad arguments,
 * 4 when a weight is not finite or too large to square (no bound holds then: nothing to screen). */
int stablelm_q8_screen_prepare(const uint16_t* w, int N, int K, int8_t* q, float* s, float* bound, float* wmax,
                               int threads) {
  if (N <= 0 || K <= 0 || threads < 1) return 2;
  int bad = 0;
  float most = 0.0f;
  const double g = 2.0 * ((double)K + 16.0) * ldexp(1.0, -24), grow = 1.0 + 2.0 * (double)K * ldexp(1.0, -24);
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) reduction(max : most)
  for (int n = 0; n < N; n++) {
    const uint16_t* row = w + (int64_t)n * K;
    int8_t* qr = q + (int64_t)n * K;
    vf vmaxabs = vzero(), vw2 = vzero();
    int k = 0;
    for (; k + VW <= K; k += VW) {
      vf v = vload_bf16(row + k);
      vmaxabs = vmax(vmaxabs, vabs(v)), vw2 = vfma(v, v, vw2);
    }
    float amax = vmaxall(vmaxabs), w2 = vsum(vw2);
    for (; k < K; k++) {
      float v = fabsf(from_bf16(row[k]));
      amax = v > amax ? v : amax, w2 += v * v;
    }
    if (!(w2 <= 3.0e38f)) { /* inf, NaN, or squares past float32 */
      bad = 1;
      continue;
    }
    float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    vf vinv = vset1(inv), vscale = vset1(scale), hi = vset1(127.0f), lo = vset1(-127.0f);
    vf vr2 = vzero(), vq2 = vzero();
    for (k = 0; k + VW <= K; k += VW) {
      vf v = vload_bf16(row + k);
      vf t = vmax(lo, vmin(hi, vround(vmul(v, vinv))));
      vstore_i8(qr + k, t);
      vf dq = vmul(t, vscale), d = vsub(v, dq);
      vr2 = vfma(d, d, vr2), vq2 = vfma(dq, dq, vq2);
    }
    float r2 = vsum(vr2), q2 = vsum(vq2);
    for (; k < K; k++) {
      float v = from_bf16(row[k]), t = nearbyintf(v * inv);
      t = t > 127.0f ? 127.0f : t < -127.0f ? -127.0f : t;
      qr[k] = (int8_t)t;
      float dq = t * scale, d = v - dq;
      r2 += d * d, q2 += dq * dq;
    }
    s[n] = scale;
    float norm = (float)(sqrt(w2 * grow) * (1.0 + 1e-9)) * (1.0f + 1e-6f);
    most = norm > most ? norm : most;
    /* float32 sums of squares within (K - 1) 2^-24 relative (plus each square's rounding): grown by
     * `grow`, square roots in double, the bound rounded up to float */
    double b = (sqrt(r2 * grow) + g * (sqrt(w2 * grow) + sqrt(q2 * grow))) * (1.0 + 1e-9);
    float fb = (float)b;
    if ((double)fb < b) fb = nextafterf(fb, INFINITY);
    bound[n] = fb;
  }
  *wmax = most;
  return bad ? 4 : 0;
}

/* e[i] for a score v (see stablelm_q8_screen) */
static inline float screen_e(float v, float bound, float nx, float tiny) {
  return 1.01f * (bound * nx + tiny) + fabsf(v) * 0.0078125f;
}

/* One greedy step's screen: x [K] (bfloat16, the final layer norm's output) through the int8 copy (q, s)
 * into scores [N] (float32 sums), the `nbanned` ids in `banned` set to -inf there (ids outside [0, N)
 * ignored), then the rows that can hold the argmax of the logits: with nx >= |x|_2 (computed here),
 * E = bound[i] nx + tiny0 + tiny1 nx (flushed denormals) and e[i] = 1.01 E + 2^-7 |score| (the final
 * rounding to bfloat16, relative 2^-8, and the float32 rounding of these sums), every logit lies in
 * [score - e, score + e], so the argmax is among the rows whose score + e reaches L = max (score - e)
 * (-inf scores left out). The aligned blocks of 16 rows of w [N, K] that hold them are copied, ascending,
 * into `gathered` (at most max_blocks blocks; a last, partial block of w only its rows), their numbers to
 * `blocks`. Returns the rows copied; -1 when more blocks are needed, -2 when a score is NaN or +inf or
 * none is finite, -3 when |x|_2 passes nx_max (not finite, or large enough for a sum to overflow), 1 or
 * 2 as stablelm_q8_linear (2 also for bad arguments); the caller computes every logit after these. */
int stablelm_q8_screen(const uint16_t* x, int K, const int8_t* q, const float* s, const float* bound, int N,
                       float tiny0, float tiny1, float nx_max, const int64_t* banned, int nbanned,
                       const uint16_t* w, float* scores, int32_t* blocks, int max_blocks, uint16_t* gathered,
                       int threads) {
  if (K <= 0 || N <= 0 || nbanned < 0 || max_blocks < 0) return 2;
  float* xf = (float*)aligned_alloc(64, ((size_t)K * 4 + 63) / 64 * 64);
  if (!xf) return 1;
  double sq = 0.0;
  for (int k = 0; k < K; k++) xf[k] = from_bf16(x[k]), sq += (double)xf[k] * xf[k];
  float nx = (float)(sqrt(sq) * (1.0 + 1e-6));
  if (!(nx <= nx_max)) {
    free(xf);
    return -3;
  }
  int status = stablelm_q8_linear(xf, XF32, 1, K, K, scores, N, q, s, NULL, threads);
  free(xf);
  if (status) return status;
  for (int j = 0; j < nbanned; j++)
    if (banned[j] >= 0 && banned[j] < N) scores[banned[j]] = -INFINITY;
  float tiny = tiny0 + tiny1 * nx;
  vf lo = vset1(-INFINITY), vnx = vset1(nx), vtiny = vset1(tiny), c = vset1(1.01f), r = vset1(0.0078125f);
  int i = 0;
  for (; i + VW <= N; i += VW) {
    vf v = vload(scores + i);
    vf e = vfma(vabs(v), r, vmul(c, vfma(vload(bound + i), vnx, vtiny)));
    lo = vmax(lo, vsub(v, e)); /* -inf scores give -inf; a NaN one is found below */
  }
  float best = vmaxall(lo);
  for (; i < N; i++) {
    float v = scores[i], d = v - screen_e(v, bound[i], nx, tiny);
    best = d > best ? d : best;
  }
  if (!(best > -3.0e38f && best < 3.0e38f)) return -2;
  int nb = 0;
  vf vbest = vset1(best);
  for (i = 0; i < N; i += VW) {
    unsigned lanes;
    if (i + VW <= N) {
      vf v = vload(scores + i);
      lanes = vnotable(v, vfma(vabs(v), r, vmul(c, vfma(vload(bound + i), vnx, vtiny))), vbest);
    } else {
      lanes = (1u << (N - i)) - 1u; /* the tail: each checked below */
    }
    for (; lanes; lanes &= lanes - 1) {
      int j = i + __builtin_ctz(lanes);
      float v = scores[j];
      if (v != v || v == INFINITY) return -2;
      if (v == -INFINITY || v + screen_e(v, bound[j], nx, tiny) < best) continue;
      if (nb && blocks[nb - 1] == j / 16) continue;
      if (nb == max_blocks) return -1;
      blocks[nb++] = j / 16;
    }
  }
  int rows = 0;
  for (int b = 0; b < nb; b++) {
    int first = blocks[b] * 16, nn = N - first < 16 ? N - first : 16;
    memcpy(gathered + (int64_t)rows * K, w + (int64_t)first * K, (size_t)nn * K * 2);
    rows += nn;
  }
  return rows;
}

/* The greedy token from the gathered rows' logits y [rows] (bfloat16, the head's kernel over `gathered`):
 * the first of the largest among the rows whose screen score is not -inf (banned), as torch.argmax over
 * the whole processed scores picks it. -1 when there is none, or a logit is NaN. */
int stablelm_q8_screen_best(const uint16_t* y, int rows, const int32_t* blocks, const float* scores) {
  int best = -1;
  float top = 0.0f;
  for (int r = 0; r < rows; r++) {
    int id = blocks[r / 16] * 16 + r % 16;
    float v = from_bf16(y[r]);
    if (v != v) return -1;
    if (scores[id] == -INFINITY) continue;
    if (best < 0 || v > top) best = id, top = v;
  }
  return best;
}

/* A digest of the n bfloat16 values at w (any change to them, moved values included, changes it but for
 * a chance of about 2^-64): two sums of mixed 32-bit words, each word mixed with its position. The
 * screen's int8 copy is checked against its weight with it once per generation, which catches in-place
 * changes that torch's version counter does not see (`weight.data.copy_(...)`). */
uint64_t stablelm_q8_screen_digest(const uint16_t* w, int64_t n, int threads) {
  const uint32_t* words = (const uint32_t*)w;
  int64_t count = n / 2;
  uint32_t a = 0, b = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : a, b)
  for (int64_t j = 0; j < count; j++) {
    uint32_t x = words[j] ^ ((uint32_t)j * 0x9E3779B9u), y = words[j] + ((uint32_t)(j >> 32) * 0x7FEB352Du);
    x *= 0x85EBCA6Bu, x ^= x >> 13, x *= 0xC2B2AE35u, x ^= x >> 16;
    y ^= (uint32_t)j * 0x846CA68Bu, y *= 0x27D4EB2Fu, y ^= y >> 15, y *= 0x165667B1u, y ^= y >> 13;
    a += x, b += y;
  }
  if (n % 2) a += (uint32_t)w[n - 1] * 0x9E3779B1u + 1u;
  return ((uint64_t)a << 32) | b;
}
