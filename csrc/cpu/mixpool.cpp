// Feature mixup + global average + global max pooling in one pass over H*W per pair: the mixed
// maps lam * f_i + (1 - lam) * f_j never exist. Forward reads the maps channels-last (one copy of
// the batch) so that each step over H*W is a vector over the channels. Backward runs per example
// over the pairs that use it, so no two threads write the same map: each pair adds its mean part
// to a channel vector and its max part at the saved argmax.
#include "common.h"
#include "kernels.h"

namespace metrix {

std::vector<at::Tensor> mixpool_forward(at::Tensor features, at::Tensor i, at::Tensor j, double lam) {
  const int64_t M = i.size(0), C = features.size(1), HW = features.size(2) * features.size(3);
  auto last = features.permute({0, 2, 3, 1}).contiguous();  // [B, H, W, C]
  auto pooled = at::empty({M, C}, features.options());
  auto argmax = at::empty({M, C}, at::kInt);
  const int64_t *pi = i.data_ptr<int64_t>(), *pj = j.data_ptr<int64_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  dispatch(features, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* f = last.data_ptr<scalar_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    const scalar_t a = scalar_t(lam), b = scalar_t(1 - lam), inv = scalar_t(1) / scalar_t(HW);
#pragma omp parallel
    {
      std::vector<scalar_t> sum(C), best(C);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t* x = f + pi[m] * HW * C;
        const scalar_t* y = f + pj[m] * HW * C;
        int32_t* at = am + m * C;
        std::fill(sum.begin(), sum.end(), scalar_t(0));
        std::fill(best.begin(), best.end(), -std::numeric_limits<scalar_t>::infinity());
        std::fill(at, at + C, 0);
        for (int64_t k = 0; k < HW; ++k) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t v = a * x[k * C + c] + b * y[k * C + c];
            sum[c] += v;
            const bool more = v > best[c];  // the first maximum, as a scan over H*W
            best[c] = more ? v : best[c];
            at[c] = more ? static_cast<int32_t>(k) : at[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) out[m * C + c] = sum[c] * inv + best[c];
      }
    }
  });
  return {pooled, argmax};
}

at::Tensor mixpool_backward(at::Tensor grad_pooled, at::Tensor features, at::Tensor i, at::Tensor j,
                               double lam, at::Tensor argmax) {
  const int64_t B = features.size(0), C = features.size(1), HW = features.size(2) * features.size(3);
  const int64_t M = i.size(0);
  const int64_t *pi = i.data_ptr<int64_t>(), *pj = j.data_ptr<int64_t>();
  // for each example, the pairs using it and the factor it enters them with (CSR)
  std::vector<int64_t> start(B + 1, 0), pair(2 * M);
  std::vector<double> factor(2 * M);
  for (int64_t m = 0; m < M; ++m) ++start[pi[m] + 1], ++start[pj[m] + 1];
  for (int64_t b = 0; b < B; ++b) start[b + 1] += start[b];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    pair[fill[pi[m]]] = m, factor[fill[pi[m]]++] = lam;
    pair[fill[pj[m]]] = m, factor[fill[pj[m]]++] = 1 - lam;
  }
  auto grad = at::empty_like(features);
  auto gp = grad_pooled.contiguous();
  const int32_t* am = argmax.data_ptr<int32_t>();
  dispatch(features, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* g = gp.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
#pragma omp parallel
    {
      std::vector<scalar_t> mean(C);
#pragma omp for schedule(dynamic)
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* o = out + b * C * HW;
        std::fill(o, o + C * HW, scalar_t(0));
        std::fill(mean.begin(), mean.end(), scalar_t(0));
        for (int64_t k = start[b]; k < start[b + 1]; ++k) {
          const scalar_t fk = scalar_t(factor[k]);
          const scalar_t* gm = g + pair[k] * C;
          const int32_t* at = am + pair[k] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) mean[c] += fk * gm[c];
          for (int64_t c = 0; c < C; ++c) o[c * HW + at[c]] += fk * gm[c];
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t share = mean[c] / scalar_t(HW);
          for (int64_t k = 0; k < HW; ++k) o[c * HW + k] += share;
        }
      }
    }
  });
  return grad;
}

}  // namespace metrix
