// Shared pieces of the CPU kernels: the sigma of a loss row, soft labels and membership of a
// pair, a vectorizable exp, and the running per-row statistics (see metrix_kernels/backends).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace metrix {

enum Form { EXP = 0, HINGE = 1, SOFTPLUS = 2 };
enum Of { OF_S = 0, OF_D = 1, OF_D2 = 2 };
enum Member { ALL = 0, ALL_BUT_SELF = 1, POS_NEG = 2, ANC_NEG = 3, POS_POS = 4, NEG_NEG = 5 };
enum LabelMode { INTERPOLATE = 0, NEGATIVE = 1, DOMINANT = 2 };

// One 32-byte vector of T (8 floats, 4 doubles, 8 int32) as a GCC vector type, for loops whose
// vector form the compiler does not find by itself: selects kept in registers, sums kept in
// registers across rows.
template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(32)));
};

// out[0:d] += sum_n coef_n * row_n[0:d] over n < count, (coef_n, row_n) = term(n): the sum stays
// in registers across the rows, 4 vectors of out at a time, where an axpy per row would load and
// store out once per row.
template <typename T, typename Term>
inline void add_weighted_rows(T* out, int64_t d, int64_t count, Term term) {
  using V = typename Lanes<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  int64_t t = 0;
  for (; t + 4 * L <= d; t += 4 * L) {
    V a[4], v;
    std::memcpy(a, out + t, sizeof a);
    for (int64_t n = 0; n < count; ++n) {
      const auto [coef, row] = term(n);
      for (int u = 0; u < 4; ++u) std::memcpy(&v, row + t + u * L, sizeof v), a[u] += coef * v;
    }
    std::memcpy(out + t, a, sizeof a);
  }
  for (; t < d; ++t) {
    T a = out[t];
    for (int64_t n = 0; n < count; ++n) {
      const auto [coef, row] = term(n);
      a += coef * row[t];
    }
    out[t] = a;
  }
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// sigma(s) = form(scale * t(s) + shift), passed from Python as [form, of, scale, shift].
struct Sigma {
  int form, of;
  double scale, shift;
};

inline Sigma sigma_from(const std::vector<double>& v) {
  TORCH_CHECK(v.size() == 4, "sigma must be [form, of, scale, shift]");
  return {static_cast<int>(v[0]), static_cast<int>(v[1]), v[2], v[3]};
}

// exp on floats without a library call, so that loops over a row vectorize (Cephes expf
// polynomial, about 1 ulp). exp(x) is 0 below -87 (and for -inf); inputs above 88 never meet a
// counted pair.
[[gnu::always_inline]] inline float fast_exp(float x) {
  const bool zero = !(x >= -87.0f);
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return zero ? 0.0f : p * scale;
}
[[gnu::always_inline]] inline double fast_exp(double x) { return x >= -745.0 ? std::exp(x) : 0.0; }  // 0 for NaN = -inf - -inf

// x = scale * t(s) + shift and dx/ds, t in {s, d = sqrt(max(2 - 2s, 0)), d2 = max(2 - 2s, 0)};
// the derivatives of d and d2 are 0 where they are 0 (family.Sigma.argument).
// OF is a template argument so that the loops over a row are branch-free and vectorize.
template <int OF, typename T>
[[gnu::always_inline]] inline T argument(T s, T scale, T shift) {
  if (OF == OF_S) return scale * s + shift;
  const T u = std::max(T(2) - T(2) * s, T(0));
  return scale * (OF == OF_D2 ? u : std::sqrt(u)) + shift;
}

template <int OF, typename T>
[[gnu::always_inline]] inline T argument_grad(T s, T scale) {
  if (OF == OF_S) return scale;
  const T u = T(2) - T(2) * s;
  if (OF == OF_D2) return u > T(0) ? T(-2) * scale : T(0);
  return u > T(0) ? -scale / std::sqrt(std::max(u, T(1e-30))) : T(0);
}

// Runs f(std::integral_constant<int, OF>) for the sigma input of p.
template <typename F>
inline void with_input(const Sigma& p, F f) {
  if (p.of == OF_S) return f(std::integral_constant<int, OF_S>{});
  if (p.of == OF_D) return f(std::integral_constant<int, OF_D>{});
  f(std::integral_constant<int, OF_D2>{});
}

// Non-exponential sigma values and derivatives (exp is handled in log space by the callers).
template <typename T>
inline T sigma_value(int form, T x) {
  if (form == HINGE) return std::max(x, T(0));
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline T sigma_grad(int form, T x) {
  if (form == HINGE) return x > T(0) ? T(1) : T(0);
  return T(1) / (T(1) + std::exp(-x));
}

// Soft label of a mixed pair for a clean example of label z: pi = [label_i == z], pj = [label_j == z].
inline double soft_label(int mode, double lam, bool pi, bool pj) {
  if (mode == NEGATIVE) return 0.0;
  if (mode == DOMINANT) return (lam >= 0.5 ? pi : pj) ? 1.0 : 0.0;
  return lam * pi + (1.0 - lam) * pj;
}

// The weight of a pair in one term, linear and as a logarithm: exponential sigmas add log w to
// their argument, which stays exact for weights below the float range (lam near 0 or 1).
// lw = -inf: the pair does not count in the term.
struct Weight {
  double w = 0.0, lw = -kInf;
  static Weight of(double w) { return {w, w > 0 ? std::log(w) : -kInf}; }
};

// Whether a pair counts for the clean side: same_index = (mixed side's i == clean side's index).
inline bool rule_member(int rule, bool pi, bool pj, bool same_index) {
  switch (rule) {
    case ALL: return true;
    case ALL_BUT_SELF: return !same_index;
    case POS_NEG: return pi && !pj;
    case ANC_NEG: return same_index && !pj;
    case POS_POS: return pi && pj;
    default: return !pi && !pj;
  }
}

// Running statistics of one term of one row. For exp sigmas sum is relative to max (log-sum-exp).
struct Term {
  double max = -kInf, sum = 0.0, mass = 0.0;
  int64_t nnz = 0;

  void merge_exp(double m, double s) {
    if (m == -kInf) return;
    if (m > max) {
      sum = sum * std::exp(max - m) + s;
      max = m;
    } else {
      sum += s * std::exp(m - max);
    }
  }
  double value(bool exp_form) const {
    if (!exp_form) return sum;
    return max == -kInf ? -kInf : max + std::log(sum);
  }
};

// Adds a row of similarities s with pair weights w / log weights lw to a term (mass apart).
template <typename T>
void reduce_term(const Sigma& p, const T* s, const T* w, const T* lw, int64_t n, Term& term) {
  constexpr T none = -std::numeric_limits<T>::infinity();
  const T scale = T(p.scale), shift = T(p.shift);
  const int form = p.form;
  with_input(p, [&](auto of) {
    constexpr int OF = decltype(of)::value;
    int64_t used = 0;
    if (form == EXP) {
      T m = none;
#pragma omp simd reduction(max : m) reduction(+ : used)
      for (int64_t k = 0; k < n; ++k) {
        m = std::max(m, argument<OF>(s[k], scale, shift) + lw[k]);
        used += lw[k] > none;
      }
      if (used == 0) return;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < n; ++k) sum += fast_exp(argument<OF>(s[k], scale, shift) + lw[k] - m);
      term.nnz += used;
      term.merge_exp(m, sum);
      return;
    }
    T sum = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (lw[k] == none) continue;
      const T v = sigma_value(form, argument<OF>(s[k], scale, shift));
      sum += w[k] * v;
      used += v > T(0);
    }
    term.sum += sum;
    term.nnz += used;
  });
}

// d[k] += g * d term / d s_k along a row, from the term's weights and saved sum (lse).
template <typename T>
void add_term_grad(const Sigma& p, const T* s, const T* w, const T* lw, int64_t n, T lse, T g, T* d) {
  if (g == T(0)) return;
  constexpr T none = -std::numeric_limits<T>::infinity();
  const T scale = T(p.scale), shift = T(p.shift);
  const int form = p.form;
  with_input(p, [&](auto of) {
    constexpr int OF = decltype(of)::value;
    if (form == EXP) {
      // w exp(x) / exp(lse) = exp(x + lw - lse); 0 where lw = -inf
#pragma omp simd
      for (int64_t k = 0; k < n; ++k)
        d[k] += g * fast_exp(argument<OF>(s[k], scale, shift) + lw[k] - lse) * argument_grad<OF>(s[k], scale);
      return;
    }
    for (int64_t k = 0; k < n; ++k) {
      if (lw[k] == none) continue;
      d[k] += g * w[k] * sigma_grad(form, argument<OF>(s[k], scale, shift)) * argument_grad<OF>(s[k], scale);
    }
  });
}

// Writes the [6, R] statistics of the backend contract (float64 for float64 inputs, else float32).
template <typename T>
void write_stats_as(at::Tensor stats, const std::vector<Term>& pos, const std::vector<Term>& neg,
                    const Sigma& sp, const Sigma& sn) {
  auto st = stats.accessor<T, 2>();
  for (size_t r = 0; r < pos.size(); ++r) {
    st[0][r] = static_cast<T>(pos[r].value(sp.form == EXP));
    st[1][r] = static_cast<T>(neg[r].value(sn.form == EXP));
    st[2][r] = static_cast<T>(pos[r].mass);
    st[3][r] = static_cast<T>(neg[r].mass);
    st[4][r] = static_cast<T>(pos[r].nnz);
    st[5][r] = static_cast<T>(neg[r].nnz);
  }
}

inline at::Tensor make_stats(const at::Tensor& like, int64_t rows, const std::vector<Term>& pos,
                             const std::vector<Term>& neg, const Sigma& sp, const Sigma& sn) {
  const bool wide = like.scalar_type() == at::kDouble;
  auto stats = at::zeros({6, rows}, wide ? at::kDouble : at::kFloat);
  if (wide) {
    write_stats_as<double>(stats, pos, neg, sp, sn);
  } else {
    write_stats_as<float>(stats, pos, neg, sp, sn);
  }
  return stats;
}

// a += a^T for a square [n, n] matrix.
template <typename T>
void add_transpose(T* a, int64_t n) {
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i) {
    a[i * n + i] *= T(2);
    for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = a[j * n + i] = a[i * n + j] + a[j * n + i];
  }
}

// Runs f(T{}) with T the C++ type of a float32 / float64 tensor.
template <typename F>
void dispatch(const at::Tensor& x, F f) {
  if (x.scalar_type() == at::kDouble) return f(double{});
  TORCH_CHECK(x.scalar_type() == at::kFloat, "metrix cpu kernels take float32 or float64, got ", x.scalar_type());
  f(float{});
}

// Upstream gradients and saved sums as double vectors (small: one entry per row).
inline std::vector<double> to_vector(const at::Tensor& x) {
  auto c = x.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

}  // namespace metrix
