// Feature mixup + global average + global max pooling in one pass over H*W per pair: the mixed
// maps lam * f_i + (1 - lam) * f_j never exist. Forward reads the maps channels-last (one copy of
// the batch) so that each step over H*W is a vector over the channels. Backward runs per example
// over the pairs that use it, so no two threads write the same map: each pair adds its mean part
// to every position and its max part at the saved argmax. The argmax is kept as uint8 where H*W
// allows (the caller's choice, backends/cpu.py): [M, C] positions are the op's largest saved
// tensor, and a quarter of int32's memory traffic shows in a digits training step.
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace metrix {

namespace {

// The lanes of a vector of positions (whole numbers in T), or one position, stored as Index. With
// AVX2, uint8 stores and loads (load_positions) take a few vector instructions; GCC makes the
// generic loops into one instruction per lane.
template <typename Index, typename V>
inline void store_positions(const V& arg, Index* at) {
  if constexpr (std::is_arithmetic_v<V>) {
    *at = static_cast<Index>(arg);
  } else {
    for (size_t l = 0; l < sizeof(V) / sizeof(arg[0]); ++l) at[l] = static_cast<Index>(arg[l]);
  }
}

#if defined(__AVX2__)
inline void store_positions(const Lanes<float>::type& arg, uint8_t* at) {
  // the low byte of each int32 lane, gathered into the low four bytes of each 128-bit half
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i v = _mm256_shuffle_epi8(_mm256_cvttps_epi32(reinterpret_cast<const __m256&>(arg)), low_bytes);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(at),
                   _mm_unpacklo_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}
#endif

// Mean + max of lam * x + (1 - lam) * y over H*W for the channels of one V (a Lanes vector, or a
// scalar for the last C % lanes channels); x, y [H*W, C] channels-last.
template <typename T, typename V, typename Index>
[[gnu::always_inline]] inline void pool_lanes(const T* x, const T* y, int64_t HW, int64_t C, T a, T b, T inv, T* out,
                                              Index* at) {
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
  std::memcpy(out, &pooled, sizeof pooled);
  store_positions(arg, at);
}

// Up to this many positions the backward adds the max part by compares in registers (below),
// beyond it by a scalar store at the argmax of each channel.
constexpr int64_t kCompareHW = 8;

// Integers as wide as T, so that a compare of argmax lanes selects lanes of a Lanes<T> vector.
template <typename T>
using SameWidthInt = Lanes<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>;

// Lanes of saved positions (uint8 or int32) as the lanes of a SameWidthInt vector.
template <typename Index, typename Out>
inline void load_positions(const Index* at, Out& out) {
  for (size_t l = 0; l < sizeof(Out) / sizeof(out[0]); ++l) out[l] = at[l];
}

#if defined(__AVX2__)
inline void load_positions(const uint8_t* at, Lanes<int32_t>::type& out) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
  std::memcpy(&out, &v, sizeof out);
}
inline void load_positions(const uint8_t* at, Lanes<int64_t>::type& out) {
  int32_t four;
  std::memcpy(&four, at, sizeof four);
  const __m256i v = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
  std::memcpy(&out, &v, sizeof out);
}
#endif

// Gradient of one example's [C, HW] map (HW <= N) from the n pairs that use it, with their factors:
// per vector of channels, the mean part and the max part at each of N positions stay in registers
// across the pairs, the max part added by one compare-and-add per position instead of a scalar
// store at the argmax of each channel.
template <typename T, int N, typename Index>
void pool_grad_compare(const T* g, const Index* am, int64_t C, int64_t HW, const int64_t* pairs,
                       const double* factors, int64_t n, T* o) {
  using V = typename Lanes<T>::type;
  using Positions = typename SameWidthInt<T>::type;
  using Lane = decltype(+Positions{}[0]);
  constexpr int64_t L = sizeof(V) / sizeof(T);
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V mean = V{}, max_part[N] = {}, v;
    Positions arg;
    for (int64_t k = 0; k < n; ++k) {
      std::memcpy(&v, g + pairs[k] * C + c, sizeof v);
      v *= T(factors[k]);
      load_positions(am + pairs[k] * C + c, arg);
      mean += v;
      for (int h = 0; h < N; ++h) max_part[h] += arg == Lane(h) ? v : V{};
    }
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < HW; ++h) o[(c + l) * HW + h] = max_part[h][l] + mean[l] / T(HW);
  }
  for (; c < C; ++c) {
    T mean = 0, max_part[N] = {};
    for (int64_t k = 0; k < n; ++k) {
      const T v = T(factors[k]) * g[pairs[k] * C + c];
      mean += v;
      max_part[am[pairs[k] * C + c]] += v;
    }
    for (int64_t h = 0; h < HW; ++h) o[c * HW + h] = max_part[h] + mean / T(HW);
  }
}

// f(scalar zero, argmax pointer) for the float types of dispatch and a uint8 or int32 argmax.
template <typename F>
void dispatch_pool(const at::Tensor& features, at::Tensor& argmax, F f) {
  dispatch(features, [&](auto zero) {
    if (argmax.scalar_type() == at::kByte) return f(zero, argmax.data_ptr<uint8_t>());
    TORCH_CHECK(argmax.scalar_type() == at::kInt, "mixpool: argmax must be uint8 or int32, got ", argmax.scalar_type());
    f(zero, argmax.data_ptr<int32_t>());
  });
}

}  // namespace

std::vector<at::Tensor> mixpool_forward(at::Tensor features, at::Tensor i, at::Tensor j, double lam,
                                        bool small_argmax) {
  const int64_t M = i.size(0), C = features.size(1), HW = features.size(2) * features.size(3);
  auto last = features.permute({0, 2, 3, 1}).contiguous();  // [B, H, W, C]
  auto pooled = at::empty({M, C}, features.options());
  TORCH_CHECK(!small_argmax || HW <= 256, "mixpool: a uint8 argmax holds at most 256 positions, got ", HW);
  auto argmax = at::empty({M, C}, small_argmax ? at::kByte : at::kInt);
  const int64_t *pi = i.data_ptr<int64_t>(), *pj = j.data_ptr<int64_t>();
  dispatch_pool(features, argmax, [&](auto zero, auto* am) {
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
      scalar_t* o = out + m * C;
      auto* at = am + m * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) pool_lanes<scalar_t, V>(x + c, y + c, HW, C, a, b, inv, o + c, at + c);
      for (; c < C; ++c) pool_lanes<scalar_t, scalar_t>(x + c, y + c, HW, C, a, b, inv, o + c, at + c);
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
  dispatch_pool(features, argmax, [&](auto zero, const auto* am) {
    using scalar_t = decltype(zero);
    const scalar_t* g = gp.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const bool by_compare = HW <= kCompareHW;
#pragma omp parallel
    {
      std::vector<scalar_t> mean(by_compare ? 0 : C);  // the scatter path's
#pragma omp for schedule(dynamic)
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* o = out + b * C * HW;
        const int64_t* pairs = pair.data() + start[b];
        const double* factors = factor.data() + start[b];
        const int64_t n = start[b + 1] - start[b];
        if (by_compare) {
          // Small maps (the digits model's 2 x 2): positions rounded up to 1, 2, 4 or 8
          const auto run = [&](auto positions) {
            pool_grad_compare<scalar_t, decltype(positions)::value>(g, am, C, HW, pairs, factors, n, o);
          };
          if (HW <= 1) run(std::integral_constant<int, 1>{});
          else if (HW <= 2) run(std::integral_constant<int, 2>{});
          else if (HW <= 4) run(std::integral_constant<int, 4>{});
          else run(std::integral_constant<int, 8>{});
          continue;
        }
        // larger maps: the mean part per channel, the max part by a store at the argmax
        std::fill(mean.begin(), mean.end(), scalar_t(0));
        std::fill(o, o + C * HW, scalar_t(0));
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t fk = scalar_t(factors[k]);
          const scalar_t* gm = g + pairs[k] * C;
          const auto* at = am + pairs[k] * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) mean[c] += fk * gm[c];
          for (int64_t c = 0; c < C; ++c) o[c * HW + at[c]] += fk * gm[c];
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t share = mean[c] / scalar_t(HW);
          for (int64_t h = 0; h < HW; ++h) o[c * HW + h] += share;
        }
      }
    }
  });
  return grad;
}

}  // namespace metrix
