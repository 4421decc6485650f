// The loss from per-anchor term statistics (family.assemble) and its gradient in closed form, in
// double: the formula under autograd is some fifty small torch ops per call.
// Codes: metrix_kernels.backends.AssemblyCodes, flattened to doubles.
#include "common.h"
#include "kernels.h"

namespace metrix {

namespace {

enum Rho { IDENTITY = 0, LOG = 1, LOG1P = 2, NEGLOG = 3 };
enum Tau { TAU_IDENTITY = 0, TAU_RELU = 1, TAU_SOFTPLUS = 2 };
enum Reduction { MEAN = 0, MEAN_POSITIVE_ANCHORS = 1, PROXY_ANCHOR = 2, NONZERO_PAIRS = 3 };

struct Term {
  bool exp;  // the term sum is a logarithm
  int rho;
  bool per_mass;
  double scale, fill;
};

struct Codes {
  Term pos, neg;
  int tau, reduction;
};

Codes codes_from(const std::vector<double>& v) {
  TORCH_CHECK(v.size() == 12, "assembly codes must be the 12 fields of AssemblyCodes");
  auto term = [&](int k) {
    return Term{v[k] != 0, static_cast<int>(v[k + 1]), v[k + 2] != 0, v[k + 3], v[k + 4]};
  };
  return {term(0), term(5), static_cast<int>(v[10]), static_cast<int>(v[11])};
}

// (rho of the term, its derivative in the term sum); an empty term (mass <= 0) is (fill, 0).
std::pair<double, double> rho(const Term& t, double total, double mass) {
  if (mass <= 0) return {t.fill, 0.0};
  double value = total, slope = 1.0;
  if (t.exp) {
    switch (t.rho) {
      case IDENTITY: value = slope = std::exp(total); break;
      case LOG: break;
      case LOG1P: value = sigma_value(SOFTPLUS, total), slope = sigma_grad(SOFTPLUS, total); break;
      default: value = -total, slope = -1.0;
    }
  }
  if (t.per_mass) value /= mass, slope /= mass;
  return {t.scale * value, t.scale * slope};
}

// (tau(x), tau'(x)), relu' = 0 at 0 as torch takes it.
std::pair<double, double> tau(int form, double x) {
  if (form == TAU_IDENTITY) return {x, 1.0};
  const int sigma = form == TAU_RELU ? HINGE : SOFTPLUS;  // relu and softplus are sigma forms too
  return {sigma_value(sigma, x), sigma_grad(sigma, x)};
}

// One anchor's statistics, read from stats [6, A] at column a.
struct Anchor {
  double pos, pos_slope, neg, neg_slope, pos_mass, neg_mass;
};

template <typename T>
Anchor anchor(const Codes& c, const T* s, int64_t A, int64_t a) {
  const auto [pos, pos_slope] = rho(c.pos, s[a], s[2 * A + a]);
  const auto [neg, neg_slope] = rho(c.neg, s[A + a], s[3 * A + a]);
  return {pos, pos_slope, neg, neg_slope, double(s[2 * A + a]), double(s[3 * A + a])};
}

// One loss of family.assemble's reductions and its two divisors.
template <typename T>
double reduce(const Codes& c, const T* s, int64_t A, double* divisors) {
  double sum_p = 0, sum_n = 0, count_p = 0, count_n = 0;
  for (int64_t a = 0; a < A; ++a) {
    const Anchor x = anchor(c, s, A, a);
    if (c.reduction == MEAN || c.reduction == MEAN_POSITIVE_ANCHORS) {
      if (c.reduction == MEAN_POSITIVE_ANCHORS && !(x.pos_mass > 0)) continue;
      sum_p += tau(c.tau, x.pos + x.neg).first;
      count_p += 1;
    } else {
      sum_p += x.pos, sum_n += x.neg;
      if (c.reduction == PROXY_ANCHOR) {
        count_p += x.pos_mass > 0, count_n += 1;
      } else {
        count_p += s[4 * A + a], count_n += s[5 * A + a];
      }
    }
  }
  divisors[0] = std::max(count_p, 1.0);
  divisors[1] = std::max(count_n, 1.0);
  return sum_p / divisors[0] + sum_n / divisors[1];
}

// scale * d loss / d (pos_sum, neg_sum) into rows 0 and 1 of g [6, A] (rows 2-5 zero).
template <typename T>
void gradient(const Codes& c, const T* s, int64_t A, const double* divisors, double scale, T* g) {
  std::fill(g, g + 6 * A, T(0));
  for (int64_t a = 0; a < A; ++a) {
    const Anchor x = anchor(c, s, A, a);
    double g_pos, g_neg;
    if (c.reduction == MEAN || c.reduction == MEAN_POSITIVE_ANCHORS) {
      if (c.reduction == MEAN_POSITIVE_ANCHORS && !(x.pos_mass > 0)) continue;
      // an empty term's slope is 0 even where tau' is not finite (both terms empty)
      const double outer = tau(c.tau, x.pos + x.neg).second;
      g_pos = x.pos_mass > 0 ? outer * x.pos_slope / divisors[0] : 0.0;
      g_neg = x.neg_mass > 0 ? outer * x.neg_slope / divisors[0] : 0.0;
    } else {
      g_pos = x.pos_slope / divisors[0];
      g_neg = x.neg_slope / divisors[1];
    }
    g[a] = T(scale * g_pos);
    g[A + a] = T(scale * g_neg);
  }
}

void check_stats(const std::vector<at::Tensor>& stats) {
  TORCH_CHECK(stats.size() == 1 || stats.size() == 2, "assemble takes one or two statistics tensors");
  for (const auto& s : stats) {
    TORCH_CHECK(s.dim() == 2 && s.size(0) == 6, "assemble takes statistics [6, A], got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == stats[0].scalar_type(), "assemble's statistics must share one dtype");
  }
}

}  // namespace

std::vector<at::Tensor> assemble_forward(std::vector<at::Tensor> stats, double weight, std::vector<double> codes) {
  const Codes c = codes_from(codes);
  check_stats(stats);
  auto loss = at::empty({}, stats[0].options());
  auto divisors = at::empty({int64_t(stats.size()), 2}, stats[0].options().dtype(at::kDouble));
  dispatch(stats[0], [&](auto zero) {
    using T = decltype(zero);
    double total = 0;
    for (size_t k = 0; k < stats.size(); ++k) {
      const at::Tensor s = stats[k].contiguous();
      const double part = reduce(c, s.data_ptr<T>(), s.size(1), divisors.data_ptr<double>() + 2 * k);
      total += k == 0 ? part : weight * part;
    }
    *loss.data_ptr<T>() = T(total);
  });
  return {loss, divisors};
}

std::vector<at::Tensor> assemble_backward(std::vector<at::Tensor> stats, double weight, at::Tensor divisors,
                                          at::Tensor grad_loss, std::vector<double> codes) {
  const Codes c = codes_from(codes);
  check_stats(stats);
  const double upstream = grad_loss.item<double>();
  std::vector<at::Tensor> grads;
  dispatch(stats[0], [&](auto zero) {
    using T = decltype(zero);
    for (size_t k = 0; k < stats.size(); ++k) {
      const at::Tensor s = stats[k].contiguous();
      grads.push_back(at::empty_like(s));
      gradient(c, s.data_ptr<T>(), s.size(1), divisors.data_ptr<double>() + 2 * k,
               k == 0 ? upstream : upstream * weight, grads.back().data_ptr<T>());
    }
  });
  return grads;
}

}  // namespace metrix
