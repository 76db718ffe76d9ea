/* Included by quant.c (not compiled alone); linear.c's bf16 decoding still splits in halves. Decoding's one row: the outputs dealt to the
 * threads in spans as each comes free, large first and smaller towards the end (OpenMP's "guided"
 * order, written out so that a span is a range the kernels stream through): each span is what is left
 * divided by twice the threads, a multiple of `unit` outputs, at least SPAN_MIN and at most `most`.
 *
 * Why not equal shares: two threads reading their halves of a layer from memory finish apart by ~15%
 * of the call on a shared 2-core Zen 3 EPYC (the memory serves them unevenly, and differently from one
 * call to the next), and the earlier one waits at the barrier: on the 3B shape's int4 decoding, 10-16 ms
 * a token of ~90 in the kernels; with these spans 1.6-2.5 ms. Each output is computed alike whichever
 * thread and span take it: the bits do not depend on the split. */
#ifndef SPAN_MIN
#define SPAN_MIN 128
#endif

typedef struct {
  int next, end; /* the first output not yet taken; all outputs */
} spans_t;

/* The next span [*lo, *hi) for one of `threads`; 0 when none is left. */
static inline int take_span(spans_t* s, int threads, int unit, int most, int* lo, int* hi) {
  int got = 0;
#pragma omp critical(stablelm_spans)
  {
    int left = s->end - s->next;
    if (left > 0) {
      int take = left / (2 * threads);
      take = (take + unit - 1) / unit * unit;
      int least = (SPAN_MIN + unit - 1) / unit * unit;
      take = take < least ? least : take > most ? most : take;
      *lo = s->next, *hi = s->next + (take < left ? take : left);
      s->next = *hi, got = 1;
    }
  }
  return got;
}
