// engine/attention.py's TorchBackend decode step on a CPU, loaded with ctypes (kernels/native.py builds it).
// Per (row, KV head): store the new K/V in the workspace (and in an fp32
// paged cache through the slot mapping, checked against the pool first), then its query heads (up to 4 at a time,
// so each K/V vector loaded serves them all) attend over the row's context: fp32 scores, an exact two-pass softmax,
// fp32 accumulation. Keys come in tiles of 16 positions `[tile, dim, 16]` (one tile of scores is `dim` vector
// multiply-adds over one contiguous run), values `[position, dim]`. A row's first tiles may be read from another
// row that holds the same positions (the same KV blocks: a group's prompt, the unconditional rows' common prefix),
// so that memory traffic, which bounds this loop in a rollout, is paid once. GCC vector extensions compile to
// AVX-512 / AVX2 / SSE as the CPU has them; torch's batched matmuls with two query rows run at a third of this
// speed on the tiny preset.
#include <stdint.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
#define INLINE static inline __attribute__((always_inline))

INLINE f32x16 load(const float *p) { f32x16 x; memcpy(&x, p, sizeof x); return x; }
INLINE void store(float *p, f32x16 x) { memcpy(p, &x, sizeof x); }

// e^x for x <= 0, Cephes' expf (2^n e^r, |r| <= ln2 / 2, degree-6 polynomial, ~1 ulp). Below -87.3 it gives
// e^-87.3 ~ 1e-38, which no sum holding a 1 (the softmax's largest term) can tell from 0.
INLINE f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 zero = {}, round = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.3f ? zero - 87.3f : x;
  const f32x16 n = (x * 1.44269504088896341f + round) - round;
  f32x16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x16 p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
}

// Keys / values of tiles below `shared` come from `shared_keys` / `shared_values`.
template <int G>
INLINE void attend(const float *q, const float *keys, const float *values, const float *shared_keys,
                   const float *shared_values, int64_t shared, int64_t n, int64_t dim, int64_t capacity, float scale,
                   float *scores, float *out) {
  const int64_t tiles = (n + 15) / 16;
  float qs[G][256];
  for (int g = 0; g < G; g++)
    for (int64_t d = 0; d < dim; d++) qs[g][d] = q[g * dim + d] * scale;
  for (int64_t i = 0; i < tiles; i++) {
    f32x16 acc[G] = {};
    const float *tile = (i < shared ? shared_keys : keys) + i * dim * 16;
    for (int64_t d = 0; d < dim; d++) {
      const f32x16 k = load(tile + d * 16);
      for (int g = 0; g < G; g++) acc[g] += qs[g][d] * k;
    }
    for (int g = 0; g < G; g++) store(scores + g * capacity + i * 16, acc[g]);
  }
  const f32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i32x16 valid = lane < (float)(n - (tiles - 1) * 16);  // the last tile's positions before n
  float inv[G];
  for (int g = 0; g < G; g++) {
    float *s = scores + g * capacity;
    f32x16 top = load(s + (tiles - 1) * 16);
    top = valid ? top : -__builtin_inff();
    for (int64_t i = 0; i + 1 < tiles; i++) { const f32x16 x = load(s + i * 16); top = x > top ? x : top; }
    float m = top[0];
    for (int l = 1; l < 16; l++) m = top[l] > m ? top[l] : m;
    f32x16 sum = {};
    for (int64_t i = 0; i < tiles; i++) {
      f32x16 e = exp_nonpositive(load(s + i * 16) - m);
      if (i + 1 == tiles) e = valid ? e : 0.0f;
      store(s + i * 16, e);
      sum += e;
    }
    float total = 0.0f;
    for (int l = 0; l < 16; l++) total += sum[l];
    inv[g] = 1.0f / total;
  }
  for (int64_t c = 0; c < dim; c += 16) {
    f32x16 even[G] = {}, odd[G] = {};  // two accumulators per head: independent multiply-add chains
    int64_t t = 0;
    for (; t + 1 < n; t += 2) {  // t even: a pair never straddles the shared tiles' end
      const float *v = (t < 16 * shared ? shared_values : values) + c;
      const f32x16 v0 = load(v + t * dim), v1 = load(v + (t + 1) * dim);
      for (int g = 0; g < G; g++) {
        even[g] += scores[g * capacity + t] * v0;
        odd[g] += scores[g * capacity + t + 1] * v1;
      }
    }
    if (t < n) {
      const f32x16 v0 = load(values + t * dim + c);
      for (int g = 0; g < G; g++) even[g] += scores[g * capacity + t] * v0;
    }
    for (int g = 0; g < G; g++) store(out + g * dim + c, (even[g] + odd[g]) * inv[g]);
  }
}

// q [rows, kv_heads * group, dim] (row stride q_stride), k_new / v_new [rows, kv_heads, dim] (row strides),
// k_cache / v_cache [num_slots, kv_heads, dim] (or null: stored elsewhere), slots [rows], keys [rows * kv_heads,
// capacity / 16, dim, 16], values [rows * kv_heads, capacity, dim], lens [rows] (with the new token), shared
// [rows, 2] (the row holding this row's first positions, how many tiles of them), out [rows, kv_heads * group,
// dim], scratch [4 * capacity]. dim % 16 == 0, dim <= 256. Returns -1, having written nothing, for a slot outside
// the pool.
extern "C" int gotr1_decode_attention(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                                      const float *v_new, int64_t v_stride, float *k_cache, float *v_cache,
                                      const int64_t *slots, int64_t num_slots, float *keys, float *values,
                                      const int32_t *lens, const int64_t *shared, float *out, int64_t rows,
                                      int64_t kv_heads, int64_t group, int64_t dim, int64_t capacity, float scale,
                                      float *scratch) {
  if (k_cache) {
    for (int64_t row = 0; row < rows; row++)
      if (slots[row] < 0 || slots[row] >= num_slots) return -1;
    for (int64_t row = 0; row < rows; row++)
      for (int64_t i = 0; i < kv_heads * dim; i++) {
        k_cache[slots[row] * kv_heads * dim + i] = k_new[row * k_stride + i];
        v_cache[slots[row] * kv_heads * dim + i] = v_new[row * v_stride + i];
      }
  }
  for (int64_t b = 0; b < rows * kv_heads; b++) {
    const int64_t row = b / kv_heads, h = b % kv_heads, n = lens[row], at = n - 1;
    float *k = keys + b * capacity * dim, *v = values + b * capacity * dim;
    const int64_t source = (shared[2 * row] * kv_heads + h) * capacity * dim, tiles = shared[2 * row + 1];
    for (int64_t d = 0; d < dim; d++) {
      k[(at / 16 * dim + d) * 16 + at % 16] = k_new[row * k_stride + h * dim + d];
      v[at * dim + d] = v_new[row * v_stride + h * dim + d];
    }
    for (int64_t g = 0; g < group; g += 4) {
      const float *qg = q + row * q_stride + (h * group + g) * dim;
      float *og = out + ((row * kv_heads + h) * group + g) * dim;
      switch (group - g < 4 ? group - g : 4) {
        case 1: attend<1>(qg, k, v, keys + source, values + source, tiles, n, dim, capacity, scale, scratch, og);
                break;
        case 2: attend<2>(qg, k, v, keys + source, values + source, tiles, n, dim, capacity, scale, scratch, og);
                break;
        case 3: attend<3>(qg, k, v, keys + source, values + source, tiles, n, dim, capacity, scale, scratch, og);
                break;
        default: attend<4>(qg, k, v, keys + source, values + source, tiles, n, dim, capacity, scale, scratch, og);
      }
    }
  }
  return 0;
}
