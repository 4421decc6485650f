// Row normalization y = x / max(|x|, 1e-12) and its backward, one pass over the rows each way
// (torch's ops take two passes forward and four backward, a cost that shows on the M mixed rows
// of feature and input mixup).
#include "common.h"
#include "kernels.h"

namespace metrix {

namespace {
constexpr double kEps = 1e-12;  // F.normalize's
constexpr int64_t kSerialElems = 1 << 14;  // below this, threads cost more than they save
}  // namespace

std::vector<at::Tensor> unit_rows_forward(at::Tensor x) {
  const int64_t N = x.size(0), d = x.size(1);
  auto y = at::empty_like(x);
  auto norm = at::empty({N, 1}, x.options());
  dispatch(x, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t *py = y.data_ptr<scalar_t>(), *pn = norm.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (N * d > kSerialElems)
    for (int64_t r = 0; r < N; ++r) {
      const scalar_t* xr = px + r * d;
      scalar_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < d; ++t) s += xr[t] * xr[t];
      const scalar_t n = std::max(std::sqrt(s), scalar_t(kEps));
      pn[r] = n;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) py[r * d + t] = xr[t] / n;
    }
  });
  return {y, norm};
}

// dx = (g - y <g, y>) / |x|, or g / eps where the norm was clamped (torch's clamp_min passes no
// gradient to the norm there).
at::Tensor unit_rows_backward(at::Tensor grad, at::Tensor y, at::Tensor norm) {
  const int64_t N = y.size(0), d = y.size(1);
  auto gx = at::empty_like(y);
  dispatch(y, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t *pg = grad.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>(), *pn = norm.data_ptr<scalar_t>();
    scalar_t* out = gx.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (N * d > kSerialElems)
    for (int64_t r = 0; r < N; ++r) {
      const scalar_t *gr = pg + r * d, *yr = py + r * d;
      scalar_t along = 0;
#pragma omp simd reduction(+ : along)
      for (int64_t t = 0; t < d; ++t) along += gr[t] * yr[t];
      if (!(pn[r] > scalar_t(kEps))) along = 0;
      const scalar_t n = pn[r];
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) out[r * d + t] = (gr[t] - yr[t] * along) / n;
    }
  });
  return gx;
}

}  // namespace metrix
