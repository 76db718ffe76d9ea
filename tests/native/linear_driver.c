/* Runs linear.c's kernels on inputs read from a file and writes what they return: how the tests run a
 * build of the kernels for another CPU (ARM64, under qemu-user) from Python on this one.
 *
 * Compiled with linear.c itself: `cc <the package's flags> -I stablelm/kernels linear_driver.c`.
 * Usage: linear_driver IN OUT. IN holds cases one after another, each an int32 header
 *   kind (0 f32, 1 bf16_dot, 2 f16_dot), M, K, G, threads, n0, n1, n2, bias0, bias1, bias2
 * then x (M x K), then per group its weight (n_g x K) and, where bias_g, its bias (n_g): elements of
 * 4 bytes (f32) or 2 (bf16, f16). OUT gets, per case, an int32 status and y (M x (n0 + n1 + n2)). */
#include <stdio.h>

#include "linear.c"

static int read_all(FILE* f, void* p, size_t bytes) { return fread(p, 1, bytes, f) == bytes; }

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) {
    fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
    return 2;
  }
  int32_t h[11];
  while (read_all(in, h, sizeof h)) {
    int kind = h[0], M = h[1], K = h[2], G = h[3], threads = h[4];
    size_t es = kind == 0 ? 4 : 2;
    int N = h[5] + h[6] + h[7];
    void* x = malloc(es * (size_t)M * K + 1);
    void* w[3] = {0, 0, 0};
    void* b[3] = {0, 0, 0};
    void* y = malloc(es * (size_t)M * N + 1);
    if (!x || !y || !read_all(in, x, es * (size_t)M * K)) return 3;
    for (int g = 0; g < G; g++) {
      w[g] = malloc(es * (size_t)h[5 + g] * K + 1);
      if (!w[g] || !read_all(in, w[g], es * (size_t)h[5 + g] * K)) return 3;
      if (h[8 + g]) {
        b[g] = malloc(es * (size_t)h[5 + g]);
        if (!b[g] || !read_all(in, b[g], es * (size_t)h[5 + g])) return 3;
      }
    }
    int32_t status;
    if (kind == 0)
      status = stablelm_linear_f32(x, M, K, K, y, N, G, w[0], b[0], h[5], w[1], b[1], h[6], w[2], b[2], h[7], 0,
                                   threads);
    else if (kind == 1)
      status = stablelm_linear_bf16_dot(x, M, K, K, y, N, G, w[0], b[0], h[5], w[1], b[1], h[6], w[2], b[2],
                                        h[7], 0, threads);
    else
      status = stablelm_linear_f16_dot(x, M, K, K, y, N, G, w[0], b[0], h[5], w[1], b[1], h[6], w[2], b[2],
                                       h[7], 0, threads);
    fwrite(&status, sizeof status, 1, out);
    fwrite(y, es, (size_t)M * N, out);
    free(x), free(y);
    for (int g = 0; g < 3; g++) free(w[g]), free(b[g]);
  }
  fclose(in);
  return fclose(out) ? 3 : 0;
}
