// kernels/rms_norm.py's CPU path for fp32 rows, loaded with ctypes (kernels/native.py builds it): torch's composite
// RMSNorm is half a dozen ops (~25 us for a decode step's few rows, most of it dispatch); this is one call.
// Per row: mean of squares (fp32, 16 lanes), rstd = 1 / sqrt(mean + eps), out = (x * rstd) * weight in torch's
// order. Only the sum's order differs from torch's, so outputs are within a few ulps (5e-7 relative) of F.rms_norm's.
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));

extern "C" void gotr1_rms_norm(const float *x, int64_t x_stride, const float *weight, int64_t rows, int64_t cols,
                               float eps, float *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * x_stride;
    float *o = out + r * cols;
    f32x16 acc = {};
    int64_t i = 0;
    for (; i + 16 <= cols; i += 16) {
      f32x16 v;
      memcpy(&v, xr + i, sizeof v);
      acc += v * v;
    }
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += acc[l];
    for (; i < cols; i++) sum += xr[i] * xr[i];
    const float rstd = 1.0f / sqrtf(sum / (float)cols + eps);
    for (int64_t j = 0; j < cols; j++) o[j] = (xr[j] * rstd) * weight[j];
  }
}
