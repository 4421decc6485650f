// Feature mixup + global average + global max pooling in one pass over H*W per pair: the mixed
// maps lam * f_i + (1 - lam) * f_j never exist. Forward reads the maps channels-last (one copy of
// the batch) so that each step over H*W is a vector over the channels. Backward runs per example
// over the pairs that use it, so no two threads write the same map: each pair adds its mean part
// to a channel vector and its max part at the saved argmax.
#include "common.h"
#include "kernels.h"

namespace metrix {

namespace {

// One 32-byte vector of channels (8 floats or 4 doubles) as a GCC vector type: the select of the
// argmax compiles to a blend in registers (auto-vectorized, it became a masked store per step over
// H*W, slower than scalar code on AMD CPUs).
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(32)));
};

// Mean + max of lam * x + (1 - lam) * y over H*W for the channels of one V (a Lanes vector, or a
// scalar for the last C % lanes channels); x, y [H*W, C] channels-last.
template <typename T, typename V>
[[gnu::always_inline]] inline void pool_lanes(const T* x, const T* y, int64_t HW, int64_t C, T a, T b, T inv, T* out,
                                              int32_t* at) {
  constexpr int L = sizeof(V) / sizeof(T);
  V sum = V{} + T(0), best = V{} - std::numeric_limits<T>::infinity(), arg = V{} + T(0), vx, vy;
  for (int64_t k = 0; k < HW; ++k) {
    std::memcpy(&vx, x + k * C, sizeof vx);
    std::memcpy(&vy, y + k * C, sizeof vy);
    const V v = a * vx + b * vy;
    sum += v;
    const auto more = v > best;  // the first maximum, as a scan over H*W
    best = more ? v : best;
    arg = more ? V{} + T(k) : arg;
  }
  const V pooled = sum * inv + best;
  T lanes[L];
  std::memcpy(out, &pooled, sizeof pooled);
  std::memcpy(lanes, &arg, sizeof arg);
  for (int c = 0; c < L; ++c) at[c] = static_cast<int32_t>(lanes[c]);
}

constexpr int64_t kCompareHW = 8;

}  // namespace

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
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* x = f + pi[m] * HW * C;
      const scalar_t* y = f + pj[m] * HW * C;
      using V = typename Lanes<scalar_t>::type;
      constexpr int64_t L = sizeof(V) / sizeof(scalar_t);
      int64_t c = 0;
      for (; c + L <= C; c += L) pool_lanes<scalar_t, V>(x + c, y + c, HW, C, a, b, inv, out + m * C + c, am + m * C + c);
      for (; c < C; ++c) pool_lanes<scalar_t, scalar_t>(x + c, y + c, HW, C, a, b, inv, out + m * C + c, am + m * C + c);
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
    using V = typename Lanes<scalar_t>::type;
    constexpr int64_t L = sizeof(V) / sizeof(scalar_t);
    // Small maps (the digits model's 2 x 2): the max part goes to a channels-last [H*W, C] buffer by
    // one compare-and-add vector per position, cheaper than a scalar store per channel up to about
    // 8 positions. Larger maps: a store at the argmax per channel.
    const bool by_compare = HW <= kCompareHW;
#pragma omp parallel
    {
      std::vector<scalar_t> mean(C), acc(by_compare ? HW * C : 0);
#pragma omp for schedule(dynamic)
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* o = out + b * C * HW;
        std::fill(mean.begin(), mean.end(), scalar_t(0));
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        if (!by_compare) std::fill(o, o + C * HW, scalar_t(0));
        for (int64_t k = start[b]; k < start[b + 1]; ++k) {
          const scalar_t fk = scalar_t(factor[k]);
          const scalar_t* gm = g + pair[k] * C;
          const int32_t* at = am + pair[k] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) mean[c] += fk * gm[c];
          if (!by_compare) {
            for (int64_t c = 0; c < C; ++c) o[c * HW + at[c]] += fk * gm[c];
            continue;
          }
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            V v, arg, sum;
            scalar_t lanes[L];
            std::memcpy(&v, gm + c, sizeof v);
            v *= fk;
            for (int64_t l = 0; l < L; ++l) lanes[l] = scalar_t(at[c + l]);
            std::memcpy(&arg, lanes, sizeof arg);
            for (int64_t h = 0; h < HW; ++h) {
              std::memcpy(&sum, &acc[h * C + c], sizeof sum);
              sum += arg == scalar_t(h) ? v : V{};
              std::memcpy(&acc[h * C + c], &sum, sizeof sum);
            }
          }
          for (; c < C; ++c) acc[at[c] * C + c] += fk * gm[c];
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t share = mean[c] / scalar_t(HW);
          for (int64_t h = 0; h < HW; ++h) o[c * HW + h] = (by_compare ? acc[h * C + c] : o[c * HW + h]) + share;
        }
      }
    }
  });
  return grad;
}

}  // namespace metrix
