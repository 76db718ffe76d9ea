/* Attention of one new query per row over a static KV cache (decoding), bfloat16, giving the bits of
 * torch's scaled_dot_product_attention on x86-64 CPUs where ATen runs its AVX2 or AVX-512 kernels and
 * MKL its AVX2 code (AMD's CPUs: EPYCs with AVX2 only and with AVX-512 were measured). There torch's
 * flash attention (cpu_flash_attention in FlashAttentionKernel.cpp) spends nearly all its time in two
 * small bfloat16 matrix products per head that it hands to MKL (cblas_gemm_bf16bf16f32, ~8-25 us each on
 * a 2-core EPYC); this file computes the same numbers directly, in torch's blocks of 512 keys
 * (kvSplitSize) with its online softmax:
 *
 * - scores, per key: q . k in MKL's order for (T, N, m = keys, n = 1, k = D): four partial sums over
 *   k = r, r + 4, r + 8, ... (a product of two bfloat16 numbers is exact in float32, so only the order
 *   of the additions matters), then (s0 + s2) + (s1 + s3);
 * - torch's softmax per block, in ATen's vectors of `lanes` floats (8 with AVX2, 16 with AVX-512):
 *   scores times the scale (or -inf where the mask says no), the maximum, exp(score - max) by ATen's
 *   fexp_u20, two vectors at a time into two vector sums, then one into the first, the two added and
 *   their lanes summed by halves (8 lanes: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)); 16: l + l[+8]
 *   first), the last n % lanes by std::exp added one by one; the exponentials rounded to bfloat16; a later
 *   block rescales the running sum (one FMA) and the running output by exp(old max - new max);
 * - values: p . v in MKL's order for (N, N, m = D, n = 1, k = keys), which `order` says: 0, MKL's AVX2
 *   code on AMD's CPUs: per group of four keys (t0 + t2) + (t1 + t3), added to the sum in order; the last
 *   n % 4 keys added last one first; a later block's added to the running output as they go (MKL with
 *   beta = 1); 1, its AVX2 code on Intel's CPUs (`values_intel`): four running sums over the keys; 2, its
 *   AVX-512 code without AVX512-BF16 on Intel's CPUs: two running sums;
 * - the sum's reciprocal times that, rounded to bfloat16.
 *
 * These orders were found by probing MKL with cancelling inputs (see docs/speed.md); a caller uses this
 * kernel only after it reproduced torch's own result on probes of the layer's shape
 * (`stablelm.kernels.attention`): a CPU, MKL or torch that computes otherwise keeps torch's kernel.
 * Returns 0; 2 on bad arguments (nothing written); 4 when a score is not finite (NaN or infinity from
 * the inputs; torch's NaN handling is not copied): the caller then runs torch's kernel.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define KV_SPLIT 512 /* torch's kvSplitSize for its flash attention on CPU */
#define MAX_D 512

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t round_bf16(float f) { /* round to nearest even (finite values) */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline __m128 load4_bf16(const uint16_t* p) {
  __m128i h = _mm_loadl_epi64((const __m128i*)p);
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}

static inline __m256 load8_bf16(const uint16_t* p) {
  __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* 8 floats to bfloat16, round to nearest even (finite values), stored at p */
static inline void store8_bf16(uint16_t* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128((__m128i*)p, packed);
}

/* ATen's Vectorized<float>::fexp_u20 for AVX2 (vec256_float.h): 2^(x log2 e) from a cubic in the
 * fraction, built in the exponent bits */
static inline __m256 fexp_u20(__m256 x) {
  const __m256 c0 = _mm256_set1_ps(0.00010703434948458272f), c1 = _mm256_set1_ps(0.30354260500649682f);
  const __m256 c2 = _mm256_set1_ps(-0.22433836478672356f), c3 = _mm256_set1_ps(-0.079204240219773236f);
  const __m256 log2e = _mm256_castsi256_ps(_mm256_set1_epi32(0x3fb8aa3b));
  const __m256 a = _mm256_set1_ps(8388608.0f), b = _mm256_set1_ps(8388608.0f * 127.0f);
  const __m256 ln_min = _mm256_castsi256_ps(_mm256_set1_epi32((int)0xc2aeac50));
  const __m256 ln_max = _mm256_castsi256_ps(_mm256_set1_epi32(0x42b17218));
  __m256 small = _mm256_cmp_ps(x, ln_min, _CMP_LT_OS), large = _mm256_cmp_ps(x, ln_max, _CMP_GT_OS);
  __m256 src = _mm256_mul_ps(x, log2e);
  __m256 frac = _mm256_sub_ps(src, _mm256_floor_ps(src));
  __m256 r = _mm256_fmadd_ps(frac, c3, c2);
  r = _mm256_fmadd_ps(frac, r, c1);
  r = _mm256_fmadd_ps(frac, r, c0);
  src = _mm256_sub_ps(src, r);
  __m256 res = _mm256_castsi256_ps(_mm256_cvttps_epi32(_mm256_fmadd_ps(a, src, b)));
  res = _mm256_blendv_ps(res, _mm256_setzero_ps(), small);
  return _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), large);
}

/* lanes summed by halves: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) (ATen's vec_reduce_all) */
static inline float hsum8(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

/* (s0 + s2) + (s1 + s3) */
static inline float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* `bytes` bytes from p on, a line at a time, into the caches (the next head's keys or values) */
static inline void prefetch_span(const char* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T1);
}

/* scores[i] = q . k[i] for n keys (rows D apart), four keys at a time in flight; the same rows of
 * `next` (the next head's keys, or NULL) prefetched as they go */
static void scores(const uint16_t* q, const uint16_t* k, int n, int D, float* out, const uint16_t* next) {
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint16_t *k0 = k + (int64_t)i * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
    if (next) prefetch_span((const char*)(next + (int64_t)i * D), 8 * D);
    __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < D; d += 4) {
      __m128 qv = load4_bf16(q + d);
      a0 = _mm_fmadd_ps(load4_bf16(k0 + d), qv, a0);
      a1 = _mm_fmadd_ps(load4_bf16(k1 + d), qv, a1);
      a2 = _mm_fmadd_ps(load4_bf16(k2 + d), qv, a2);
      a3 = _mm_fmadd_ps(load4_bf16(k3 + d), qv, a3);
    }
    out[i] = hsum4(a0), out[i + 1] = hsum4(a1), out[i + 2] = hsum4(a2), out[i + 3] = hsum4(a3);
  }
  if (next && i < n) prefetch_span((const char*)(next + (int64_t)i * D), 2 * (int64_t)(n - i) * D);
  for (; i < n; i++) {
    const uint16_t* ki = k + (int64_t)i * D;
    __m128 a = _mm_setzero_ps();
    for (int d = 0; d < D; d += 4) a = _mm_fmadd_ps(load4_bf16(ki + d), load4_bf16(q + d), a);
    out[i] = hsum4(a);
  }
}

/* acc[0..D) (+)= sum over n keys of p[l] * v[l] in MKL's order: from zero for the first block, else
 * continuing from acc (MKL with beta = 1 adds into C as it goes) */
static void values(const uint16_t* p, const uint16_t* v, int n, int D, float* acc, int first,
                   const uint16_t* next) {
  if (first)
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(acc + d, _mm256_setzero_ps());
  int groups = n / 4 * 4;
  if (next && groups < n) prefetch_span((const char*)(next + (int64_t)groups * D), 2 * (int64_t)(n - groups) * D);
  for (int l = 0; l < groups; l += 4) {
    if (next) prefetch_span((const char*)(next + (int64_t)l * D), 8 * D);
    __m256 p0 = _mm256_set1_ps(from_bf16(p[l])), p1 = _mm256_set1_ps(from_bf16(p[l + 1]));
    __m256 p2 = _mm256_set1_ps(from_bf16(p[l + 2])), p3 = _mm256_set1_ps(from_bf16(p[l + 3]));
    const uint16_t* v0 = v + (int64_t)l * D;
    for (int d = 0; d < D; d += 8) {
      __m256 t0 = _mm256_mul_ps(load8_bf16(v0 + d), p0), t1 = _mm256_mul_ps(load8_bf16(v0 + D + d), p1);
      __m256 t2 = _mm256_mul_ps(load8_bf16(v0 + 2 * D + d), p2);
      __m256 t3 = _mm256_mul_ps(load8_bf16(v0 + 3 * D + d), p3);
      __m256 g = _mm256_add_ps(_mm256_add_ps(t0, t2), _mm256_add_ps(t1, t3));
      _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), g));
    }
  }
  for (int l = n - 1; l >= groups; l--) { /* the leftover keys, last first */
    __m256 pl = _mm256_set1_ps(from_bf16(p[l]));
    const uint16_t* vl = v + (int64_t)l * D;
    for (int d = 0; d < D; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_mul_ps(load8_bf16(vl + d), pl)));
  }
}

/* the same sums in the order of MKL's code on Intel's CPUs (found by calling its cblas_gemm_bf16bf16f32 on
 * a Xeon with MKL_ENABLE_INSTRUCTIONS=AVX2, and =AVX512 for its AVX-512 code without AVX512-BF16):
 * `sums` running sums over the keys l % sums of the first n / sums * sums keys (4 for its AVX2 code, 2 for
 * its AVX-512 code), added by halves ((s0 + s2) + (s1 + s3), or s0 + s1); a later block's (beta = 1) added
 * to acc after that; the leftover keys then added in order */
static void values_intel(const uint16_t* p, const uint16_t* v, int n, int D, float* acc, int first,
                         const uint16_t* next, int sums) {
  float s[4][MAX_D];
  for (int j = 0; j < sums; j++)
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(s[j] + d, _mm256_setzero_ps());
  int groups = n / sums * sums;
  if (next && groups < n) prefetch_span((const char*)(next + (int64_t)groups * D), 2 * (int64_t)(n - groups) * D);
  for (int l = 0; l < groups; l += sums) {
    if (next) prefetch_span((const char*)(next + (int64_t)l * D), 2 * sums * D);
    for (int j = 0; j < sums; j++) {
      __m256 pj = _mm256_set1_ps(from_bf16(p[l + j]));
      const uint16_t* vj = v + (int64_t)(l + j) * D;
      for (int d = 0; d < D; d += 8)
        _mm256_storeu_ps(s[j] + d, _mm256_add_ps(_mm256_loadu_ps(s[j] + d), _mm256_mul_ps(load8_bf16(vj + d), pj)));
    }
  }
  for (int d = 0; d < D; d += 8) {
    __m256 r = sums == 4 ? _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(s[0] + d), _mm256_loadu_ps(s[2] + d)),
                                         _mm256_add_ps(_mm256_loadu_ps(s[1] + d), _mm256_loadu_ps(s[3] + d)))
                         : _mm256_add_ps(_mm256_loadu_ps(s[0] + d), _mm256_loadu_ps(s[1] + d));
    if (!first) r = _mm256_add_ps(_mm256_loadu_ps(acc + d), r);
    for (int l = groups; l < n; l++)
      r = _mm256_add_ps(r, _mm256_mul_ps(load8_bf16(v + (int64_t)l * D + d), _mm256_set1_ps(from_bf16(p[l]))));
    _mm256_storeu_ps(acc + d, r);
  }
}

/* exp(qk[i..i+8) - max) by fexp_u20, into *acc, stored to pb in bfloat16 */
static inline void exp8(const float* qk, __m256 vmax, __m256* acc, uint16_t* pb) {
  __m256 e = fexp_u20(_mm256_sub_ps(_mm256_loadu_ps(qk), vmax));
  *acc = _mm256_add_ps(*acc, e);
  store8_bf16(pb, e);
}

/* torch's softmax of one block of n <= KV_SPLIT scaled scores qk (-inf where masked) against the running
 * maximum: the exponentials in bfloat16 into pb, their sum returned, *mx the block's maximum (or the running
 * one when larger); -inf: every score so far masked (pb zeros). `lanes` is the width of ATen's
 * Vectorized<float> in torch's build for this CPU: 8 (AVX2) or 16 (AVX-512), here as one or two 8-lane
 * registers per vector (the sums are lane by lane, so the width only changes which terms meet). */
static float block_softmax(const float* qk, int n, float run_max, float* mx_out, uint16_t* pb, int lanes) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++) mx = qk[i] > mx ? qk[i] : mx;
  mx = run_max > mx ? run_max : mx;
  *mx_out = mx;
  if (mx == -INFINITY) {
    memset(pb, 0, sizeof(uint16_t) * (size_t)n);
    return 0.0f;
  }
  /* two vectors at a time in two vector sums, then one into the first, then the rest one by one;
   * a[0] (and a[1] with 16 lanes) the first sum's 8-lane halves, a[2] (a[3]) the second's */
  __m256 vmax = _mm256_set1_ps(mx), a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int i = 0, halves = lanes / 8;
  for (; i + 2 * lanes <= n; i += 2 * lanes)
    for (int h = 0; h < 2 * halves; h++) exp8(qk + i + 8 * h, vmax, &a[h < halves ? h : 2 + h - halves], pb + i + 8 * h);
  if (i + lanes <= n) {
    for (int h = 0; h < halves; h++) exp8(qk + i + 8 * h, vmax, &a[h], pb + i + 8 * h);
    i += lanes;
  }
  /* the two sums added, their lanes summed by halves (16 lanes: l + l[+8] first) */
  __m256 v = _mm256_add_ps(a[0], a[2]);
  if (halves == 2) v = _mm256_add_ps(v, _mm256_add_ps(a[1], a[3]));
  float sum = hsum8(v);
  for (; i < n; i++) { /* std::exp */
    float e = expf(qk[i] - mx);
    sum += e;
    pb[i] = round_bf16(e);
  }
  return sum;
}

/* One (row, head): q (D) against `length` keys/values k, v (rows of D), mask (length bytes, nonzero = may
 * see) or NULL; out (D) bfloat16. Blocks of KV_SPLIT keys as torch's online softmax takes them. 0, or 4 on
 * a score that is not finite. */
static int one_head(const uint16_t* q, const uint16_t* k, const uint16_t* v, int length, const uint8_t* mask,
                    int D, float scale, int lanes, int order, uint16_t* out, const uint16_t* next_k,
                    const uint16_t* next_v) {
  float qk[KV_SPLIT], dst[MAX_D];
  uint16_t pb[KV_SPLIT];
  float run_max = -INFINITY, run_sum = 0.0f;
  for (int n0 = 0; n0 < length; n0 += KV_SPLIT) {
    int n = length - n0 < KV_SPLIT ? length - n0 : KV_SPLIT;
    scores(q, k + (int64_t)n0 * D, n, D, qk, next_k ? next_k + (int64_t)n0 * D : 0);
    for (int i = 0; i < n; i++) {
      if (!isfinite(qk[i])) return 4;
      /* torch: qk * scale (+ the mask as 0 or -inf: the same value, or -inf) */
      qk[i] = (mask && !mask[n0 + i]) ? -INFINITY : qk[i] * scale;
    }
    float mx, sum = block_softmax(qk, n, run_max, &mx, pb, lanes);
    if (mx != -INFINITY) {
      float rescale = expf(run_max - mx); /* 0 for the first block */
      run_sum = fmaf(rescale, run_sum, sum); /* torch's tmp_sum + exp_tmp * sum, contracted by its compiler */
      run_max = mx;
      if (n0 > 0)
        for (int d = 0; d < D; d += 8)
          _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(dst + d), _mm256_set1_ps(rescale)));
    }
    const uint16_t *vb = v + (int64_t)n0 * D, *nv = next_v ? next_v + (int64_t)n0 * D : 0;
    if (order == 0)
      values(pb, vb, n, D, dst, n0 == 0, nv);
    else
      values_intel(pb, vb, n, D, dst, n0 == 0, nv, order == 1 ? 4 : 2);
  }
  float r = 1.0f / (run_sum == 0.0f ? 1.0f : run_sum);
  for (int d = 0; d < D; d += 8) store8_bf16(out + d, _mm256_mul_ps(_mm256_loadu_ps(dst + d), _mm256_set1_ps(r)));
  return 0;
}

/* `order`: MKL's order of the values' sums (0: its AVX2 code on AMD's CPUs, 1: on Intel's, 2: its AVX-512
 * code on Intel's; see the top).
 * out[b, h*D + d] = attention of q[b, h] (at q + b*q_sb + h*q_sh) over the first `length` slots of the
 * cache kc/vc [B, Hkv, slots, D] (head h reads kv head h / (H / Hkv)), mask [B, mask_sb] bytes or NULL;
 * out [B, out_sb]. OpenMP over the B*H (row, head) pairs, in runs of consecutive ones. */
int stablelm_decode_attention_bf16(const uint16_t* q, int64_t q_sb, int64_t q_sh, const uint16_t* kc,
                                   const uint16_t* vc, int64_t slots, int64_t length, const uint8_t* mask,
                                   int64_t mask_sb, uint16_t* out, int64_t out_sb, int B, int H, int Hkv, int D,
                                   float scale, int lanes, int order, int threads) {
  if (B < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 8 || D % 8 || D > MAX_D || length < 1 || length > slots ||
      threads < 1 || length > (int64_t)1 << 30 || (lanes != 8 && lanes != 16) || order < 0 || order > 2)
    return 2;
  int items = B * H, group = H / Hkv, status = 0, teams = items < threads ? items : threads;
  /* each thread takes a run of consecutive (row, head) items; the keys and values of its next item are
   * fetched into the caches while it computes one (they come from memory after the layer's weights have
   * streamed through), its first item's before it starts */
  _Pragma("omp parallel num_threads(teams)") {
    int team = omp_get_num_threads(), t = omp_get_thread_num();
    int lo = (int)((int64_t)items * t / team), hi = (int)((int64_t)items * (t + 1) / team);
    for (int item = lo; item < hi; item++) {
      int b = item / H, h = item % H;
      int64_t kv = ((int64_t)b * Hkv + h / group) * slots * D;
      const uint16_t *nk = 0, *nv = 0;
      if (item + 1 < hi) {
        int64_t next = ((int64_t)((item + 1) / H) * Hkv + (item + 1) % H / group) * slots * D;
        if (next != kv) nk = kc + next, nv = vc + next;
      }
      if (item == lo) {
        prefetch_span((const char*)(kc + kv), 2 * length * D);
        prefetch_span((const char*)(vc + kv), 2 * length * D);
      }
      int st = one_head(q + b * q_sb + h * q_sh, kc + kv, vc + kv, (int)length, mask ? mask + b * mask_sb : 0,
                        D, scale, lanes, order, out + b * out_sb + (int64_t)h * D, nk, nv);
      if (st) {
        _Pragma("omp atomic write") status = st;
      }
    }
  }
  return status;
}
