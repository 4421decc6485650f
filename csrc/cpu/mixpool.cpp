// Feature mixup + global average + global max pooling in one pass over H*W per (pair, channel):
// the mixed maps lam * f_i + (1 - lam) * f_j never exist. Backward spreads the mean part evenly
// and routes the max part to the saved argmax; it runs per (example, channel) over the pairs that
// use the example, so no two threads write the same map.
#include "common.h"
#include "kernels.h"

namespace metrix {

std::vector<at::Tensor> mixpool_forward(at::Tensor features, at::Tensor i, at::Tensor j, double lam) {
  const int64_t M = i.size(0), C = features.size(1), HW = features.size(2) * features.size(3);
  auto pooled = at::empty({M, C}, features.options());
  auto argmax = at::empty({M, C}, at::kInt);
  const int64_t *pi = i.data_ptr<int64_t>(), *pj = j.data_ptr<int64_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  dispatch(features, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* f = features.data_ptr<scalar_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    const scalar_t a = scalar_t(lam), b = scalar_t(1 - lam);
#pragma omp parallel for schedule(static)
    for (int64_t mc = 0; mc < M * C; ++mc) {
      const int64_t m = mc / C, c = mc % C;
      const scalar_t* x = f + (pi[m] * C + c) * HW;
      const scalar_t* y = f + (pj[m] * C + c) * HW;
      scalar_t sum = 0, best = -std::numeric_limits<scalar_t>::infinity();
      int32_t at = 0;
      for (int64_t k = 0; k < HW; ++k) {
        const scalar_t v = a * x[k] + b * y[k];
        sum += v;
        if (v > best) best = v, at = static_cast<int32_t>(k);
      }
      out[mc] = sum / scalar_t(HW) + best;
      am[mc] = at;
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
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      scalar_t* o = out + bc * HW;
      scalar_t mean = 0;
      for (int64_t k = start[b]; k < start[b + 1]; ++k) mean += scalar_t(factor[k]) * g[pair[k] * C + c];
      mean /= scalar_t(HW);
      for (int64_t k = 0; k < HW; ++k) o[k] = mean;
      for (int64_t k = start[b]; k < start[b + 1]; ++k) {
        const int64_t mc = pair[k] * C + c;
        o[am[mc]] += scalar_t(factor[k]) * g[mc];
      }
    }
  });
  return grad;
}

}  // namespace metrix
