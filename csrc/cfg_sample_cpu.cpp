// kernels/cfg_sampling.py's torch path on a CPU, loaded with ctypes (kernels/native.py builds it).
// Its float work before the filters (`_scale_cpu`): `_mix` and the divisions by T, the same float ops one by one
// (built with -ffp-contract=off: no fused multiply-add), so the same bits, in one pass instead of seven torch ops. Its token choice (`_sample_cpu`): Philox4x32-10 as in `philox_uniforms` (8 counters at a time
// in 64-bit lanes: a product of two 32-bit words fits one), then the Gumbel-max argmax without computing every
// Gumbel. G = -log(-log U) only depends on the uniform's 23 bits m and rises with them, so per bin of 2^11 values of
// m a table gives fp32 bounds (one ulp of slack on each side), and the row's best lower-bounded key s + lo bounds
// the winner from below: only tokens whose s + hi reaches it (a handful) get their key, with G computed exactly as
// `_gumbel` does (float64 logs, rounded to fp32; tests check every one of the 2^23 values against torch's). Ties go
// to the lowest index and a NaN key wins, as in torch.argmax; greedy rows are a plain argmax.
#include <math.h>
#include <stdint.h>
typedef uint64_t u64x8 __attribute__((vector_size(64)));

#define BIN_BITS 11
#define BINS (1 << (23 - BIN_BITS))
static float lower[BINS], upper[BINS];

static inline float gumbel(uint32_t m) { return (float)-log(-log((double)(2 * m + 1) * 0x1p-24)); }

extern "C" void gotr1_gumbel(const int32_t *m, int64_t n, float *out) {
  for (int64_t i = 0; i < n; i++) out[i] = gumbel((uint32_t)m[i]);
}

__attribute__((constructor)) static void build_bounds() {
  for (uint32_t j = 0; j < BINS; j++) {
    lower[j] = nextafterf(gumbel(j << BIN_BITS), -INFINITY);
    upper[j] = nextafterf(gumbel(((j + 1) << BIN_BITS) - 1), INFINITY);
  }
}

// s = where(c == u, c, u + w (c - u)) / t and cond = c / t per row (u null: s = c / t, cond unwritten).
extern "C" void gotr1_scale(const float *c, int64_t c_stride, const float *u, int64_t u_stride, const float *w,
                            const float *t, int64_t rows, int64_t vocab, float *s, float *cond) {
  for (int64_t r = 0; r < rows; r++) {
    const float *__restrict cr = c + r * c_stride;
    float *__restrict sr = s + r * vocab;
    const float wr = w[r], tr = t[r];  // read once: the rows could alias them, as far as the compiler knows
    if (!u) {
      for (int64_t i = 0; i < vocab; i++) sr[i] = cr[i] / tr;
      continue;
    }
    const float *__restrict ur = u + r * u_stride;
    float *__restrict condr = cond + r * vocab;
    for (int64_t i = 0; i < vocab; i++) {
      sr[i] = (cr[i] == ur[i] ? cr[i] : ur[i] + wr * (cr[i] - ur[i])) / tr;
      condr[i] = cr[i] / tr;
    }
  }
}

static int64_t argmax(const float *x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; i++) {
    if (x[i] != x[i]) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

// s [rows, vocab] (row stride), keep [rows, vocab] bool or null (all kept), sampled [rows] bool (else greedy),
// scratch [2 * vocab] int32.
extern "C" void gotr1_sample(const float *s, int64_t stride, const uint8_t *keep, const uint8_t *sampled,
                             const int64_t *seeds, const int64_t *counters, int64_t rows, int64_t vocab,
                             int64_t *tokens, int32_t *scratch) {
  const uint64_t low = 0xFFFFFFFFu;
  int32_t *candidates = scratch, *bits = scratch + vocab;
  for (int64_t r = 0; r < rows; r++) {
    const float *x = s + r * stride;
    const uint8_t *kept = keep ? keep + r * vocab : 0;
    if (!sampled[r]) {
      tokens[r] = argmax(x, vocab);
      continue;
    }
    const uint64_t seed = (uint64_t)seeds[r], counter = (uint64_t)counters[r];
    float floor = -INFINITY;
    int64_t n = 0;
    for (int64_t g = 0; 4 * g < vocab; g += 8) {
      u64x8 c0 = {0, 1, 2, 3, 4, 5, 6, 7}, c1 = {}, c2 = {}, c3 = {};
      c0 = (c0 + (uint64_t)g) & low;
      c1 += counter & low;
      c2 += counter >> 32;
      uint64_t k0 = seed & low, k1 = seed >> 32;
      for (int round = 0; round < 10; round++) {
        const u64x8 p0 = c0 * 0xD2511F53u, p1 = c2 * 0xCD9E8D57u;
        c0 = (p1 >> 32) ^ c1 ^ k0;
        c2 = (p0 >> 32) ^ c3 ^ k1;
        c1 = p1 & low;
        c3 = p0 & low;
        k0 = (k0 + 0x9E3779B9u) & low;
        k1 = (k1 + 0xBB67AE85u) & low;
      }
      const u64x8 words[4] = {c0, c1, c2, c3};
      const int64_t end = vocab < 4 * (g + 8) ? vocab : 4 * (g + 8);
      for (int64_t i = 4 * g; i < end; i++) {  // token i draws word i % 4 of counter i / 4
        if (kept && !kept[i]) continue;
        const uint32_t m = (uint32_t)words[i % 4][i / 4 - g] >> 9;
        const float lo = x[i] + lower[m >> BIN_BITS], hi = x[i] + upper[m >> BIN_BITS];
        if (lo > floor) floor = lo;
        if (!(hi < floor)) {  // so far a possible winner (or NaN)
          candidates[n] = (int32_t)i;
          bits[n++] = (int32_t)m;
        }
      }
    }
    int64_t best = 0;
    float best_key = -INFINITY;
    for (int64_t c = 0; c < n; c++) {
      const float key = x[candidates[c]] + gumbel((uint32_t)bits[c]);
      if (key != key) {
        best = candidates[c];
        break;
      }
      if (key > best_key) {
        best = candidates[c];
        best_key = key;
      }
    }
    tokens[r] = best;  // all keys -inf: index 0, as torch.argmax
  }
}
