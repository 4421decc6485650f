// Embedding mixup through the Gram matrix (SPEC 1.3): the similarity of anchor a to the mix of
// (e_i, e_j) is (lam S_ai + (1 - lam) S_aj) r_ij with S = anchors emb^T and r_ij = 1 / |lam e_i +
// (1 - lam) e_j|, a function of G_ij = <e_i, e_j>. Examples are sorted by label so that the mixing
// set of an anchor is a few contiguous ranges of j for each i (the membership rule), and the soft
// label is one constant per pair set. Memory: S [A, B] and r [B, B] (their gradients in backward);
// neither mixed embeddings nor anchor-to-mixed similarities exist.
#include <omp.h>

#include "common.h"
#include "kernels.h"

namespace metrix {
namespace {

struct Layout {
  at::Tensor emb_s, perm, S, r;  // sorted embeddings, their original indices, S, r_ij
  std::vector<int64_t> lab, orig, pos, begin, end;  // sorted labels / originals; per anchor: sorted
                                                     // position (or -1) and its class range
  int64_t A, B;
};

// same_anchors: the anchors are the embeddings themselves, so S is a row permutation of G.
Layout layout(const at::Tensor& anchors, const at::Tensor& anchor_label, const at::Tensor& anchor_index,
              const at::Tensor& emb, const at::Tensor& labels, double lam, bool same_anchors) {
  Layout L;
  L.A = anchors.size(0), L.B = emb.size(0);
  auto sorted = labels.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto lab_s = std::get<0>(sorted).contiguous();
  L.perm = std::get<1>(sorted).contiguous();
  L.lab.assign(lab_s.data_ptr<int64_t>(), lab_s.data_ptr<int64_t>() + L.B);
  L.orig.assign(L.perm.data_ptr<int64_t>(), L.perm.data_ptr<int64_t>() + L.B);
  std::vector<int64_t> where(L.B);
  for (int64_t p = 0; p < L.B; ++p) where[L.orig[p]] = p;
  const int64_t* al = anchor_label.data_ptr<int64_t>();
  const int64_t* ai = anchor_index.data_ptr<int64_t>();
  L.pos.resize(L.A), L.begin.resize(L.A), L.end.resize(L.A);
  for (int64_t a = 0; a < L.A; ++a) {
    L.begin[a] = std::lower_bound(L.lab.begin(), L.lab.end(), al[a]) - L.lab.begin();
    L.end[a] = std::upper_bound(L.lab.begin(), L.lab.end(), al[a]) - L.lab.begin();
    L.pos[a] = ai[a] >= 0 ? where[ai[a]] : -1;
  }
  L.emb_s = emb.index_select(0, L.perm);
  L.r = at::mm(L.emb_s, L.emb_s.t());
  L.S = same_anchors ? L.r.index_select(0, at::tensor(where, L.perm.options())) : at::mm(anchors, L.emb_s.t());
  // r_ij = 1 / max(sqrt(lam^2 + (1 - lam)^2 + 2 lam (1 - lam) G_ij), 1e-12), in place of G
  const double q = lam * lam + (1 - lam) * (1 - lam), c = 2 * lam * (1 - lam);
  L.r.mul_(c).add_(q).clamp_min_(0).sqrt_().clamp_min_(1e-12).reciprocal_();
  return L;
}

// Calls f(i, j0, j1) for the pairs of anchor a: i with every j in [j0, j1), in sorted positions.
template <typename F>
void for_each_range(int rule, int64_t begin, int64_t end, int64_t pos, int64_t B, F f) {
  switch (rule) {
    case ANC_NEG:
      if (pos >= 0) {
        f(pos, 0, begin), f(pos, end, B);
        return;
      }
      [[fallthrough]];  // a proxy anchor stands for its whole class
    case POS_NEG:
      for (int64_t i = begin; i < end; ++i) f(i, 0, begin), f(i, end, B);
      return;
    case POS_POS:
      for (int64_t i = begin; i < end; ++i) f(i, i + 1, end);
      return;
    default:  // NEG_NEG
      for (int64_t i = 0; i < begin; ++i) f(i, i + 1, begin), f(i, end, B);
      for (int64_t i = end; i < B; ++i) f(i, i + 1, B);
  }
}

// Interpolation factor on sorted position i when mixed with j: pairs (i, j) with i < j in the
// original order carry lam on i; only unordered pair sets (pos-pos, neg-neg) can be flipped.
template <typename T>
inline T lam_on_i(const Layout& L, int64_t i, int64_t j, T lam, bool unordered) {
  return unordered && L.orig[j] < L.orig[i] ? T(1) - lam : lam;
}

template <typename T>
void mixed_sims(const Layout& L, int64_t a, int64_t i, int64_t j0, int64_t j1, T lam, bool unordered, T* out) {
  const T* Sa = L.S.data_ptr<T>() + a * L.B;
  const T* ri = L.r.data_ptr<T>() + i * L.B;
  const T sai = Sa[i];
  if (!unordered) {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) out[j - j0] = (lam * sai + (T(1) - lam) * Sa[j]) * ri[j];
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const T l = lam_on_i(L, i, j, lam, unordered);
    out[j - j0] = (l * sai + (T(1) - l) * Sa[j]) * ri[j];
  }
}

// The constant soft label of a pair set: which of label_i / label_j equal the anchor's.
double pair_set_label(int rule, int mode, double lam) {
  const bool pi = rule != NEG_NEG, pj = rule == POS_POS;
  return soft_label(mode, lam, pi, pj);
}

}  // namespace

at::Tensor gram_mixed_forward(at::Tensor anchors, at::Tensor anchor_label, at::Tensor anchor_index,
                                 at::Tensor emb, at::Tensor labels, double lam, std::vector<double> sig_pos,
                                 std::vector<double> sig_neg, int64_t member, int64_t mode, bool same_anchors) {
  TORCH_CHECK(member >= POS_NEG && member <= NEG_NEG, "gram_mixed: member must be a mixing pair set");
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Layout L = layout(anchors, anchor_label, anchor_index, emb, labels, lam, same_anchors);
  const int rule = static_cast<int>(member);
  const bool unordered = rule == POS_POS || rule == NEG_NEG;
  const Weight wp = Weight::of(pair_set_label(rule, static_cast<int>(mode), lam));
  const Weight wn = Weight::of(1.0 - wp.w);
  std::vector<Term> tp(L.A), tn(L.A);
  dispatch(emb, [&](auto zero) {
    using scalar_t = decltype(zero);
#pragma omp parallel
    {
      // ATen calls in worker threads: autograd's thread-local state does not reach them
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<scalar_t> s(L.B), w_p(L.B, scalar_t(wp.w)), lw_p(L.B, scalar_t(wp.lw)), w_n(L.B, scalar_t(wn.w)),
          lw_n(L.B, scalar_t(wn.lw));
#pragma omp for schedule(dynamic, 4)
      for (int64_t a = 0; a < L.A; ++a) {
        for_each_range(rule, L.begin[a], L.end[a], L.pos[a], L.B, [&](int64_t i, int64_t j0, int64_t j1) {
          if (j1 <= j0) return;
          mixed_sims<scalar_t>(L, a, i, j0, j1, scalar_t(lam), unordered, s.data());
          tp[a].mass += (j1 - j0) * wp.w, tn[a].mass += (j1 - j0) * wn.w;
          if (wp.w > 0) reduce_term(sp, s.data(), w_p.data(), lw_p.data(), j1 - j0, tp[a]);
          if (wn.w > 0) reduce_term(sn, s.data(), w_n.data(), lw_n.data(), j1 - j0, tn[a]);
        });
      }
    }
  });
  return make_stats(anchors, L.A, tp, tn, sp, sn);
}

std::vector<at::Tensor> gram_mixed_backward(at::Tensor anchors, at::Tensor anchor_label,
                                               at::Tensor anchor_index, at::Tensor emb, at::Tensor labels,
                                               double lam, std::vector<double> sig_pos, std::vector<double> sig_neg,
                                               int64_t member, int64_t mode, bool same_anchors, at::Tensor stats,
                                               at::Tensor grad_pos, at::Tensor grad_neg) {
  TORCH_CHECK(member >= POS_NEG && member <= NEG_NEG, "gram_mixed: member must be a mixing pair set");
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Layout L = layout(anchors, anchor_label, anchor_index, emb, labels, lam, same_anchors);
  const int rule = static_cast<int>(member);
  const bool unordered = rule == POS_POS || rule == NEG_NEG;
  const Weight wp = Weight::of(pair_set_label(rule, static_cast<int>(mode), lam));
  const Weight wn = Weight::of(1.0 - wp.w);
  const auto lse_p = to_vector(stats[0]), lse_n = to_vector(stats[1]);
  const auto gp = to_vector(grad_pos), gn = to_vector(grad_neg);
  // Anchors of one label touch the rows i of dG of that label only (except for neg-neg): one
  // group per label, processed by one thread, keeps dG free of races.
  std::vector<int64_t> order(L.A);
  for (int64_t a = 0; a < L.A; ++a) order[a] = a;
  const int64_t* al = anchor_label.data_ptr<int64_t>();
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t z) { return al[x] < al[z]; });
  std::vector<int64_t> group_start;
  for (int64_t k = 0; k < L.A; ++k)
    if (k == 0 || al[order[k]] != al[order[k - 1]]) group_start.push_back(k);
  group_start.push_back(L.A);
  const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;
  const bool private_dG = rule == NEG_NEG;
  const int threads = omp_get_max_threads();

  auto dS = at::zeros_like(L.S);
  auto dG = at::zeros({private_dG ? threads : 1, L.B, L.B}, emb.options());
  dispatch(emb, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t lm = scalar_t(lam), c = scalar_t(lam * (1 - lam));
    const scalar_t* r = L.r.data_ptr<scalar_t>();
#pragma omp parallel
    {
      // ATen calls in worker threads: autograd's thread-local state does not reach them
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<scalar_t> s(L.B), d(L.B), w_p(L.B, scalar_t(wp.w)), lw_p(L.B, scalar_t(wp.lw)),
          w_n(L.B, scalar_t(wn.w)), lw_n(L.B, scalar_t(wn.lw));
      scalar_t* g = dG.data_ptr<scalar_t>() + (private_dG ? omp_get_thread_num() * L.B * L.B : 0);
#pragma omp for schedule(dynamic)
      for (int64_t k = 0; k < groups; ++k) {
        for (int64_t o = group_start[k]; o < group_start[k + 1]; ++o) {
          const int64_t a = order[o];
          const scalar_t gpa = scalar_t(wp.w > 0 ? gp[a] : 0), gna = scalar_t(wn.w > 0 ? gn[a] : 0);
          const scalar_t lp = scalar_t(lse_p[a]), ln = scalar_t(lse_n[a]);
          scalar_t* dSa = dS.data_ptr<scalar_t>() + a * L.B;
          for_each_range(rule, L.begin[a], L.end[a], L.pos[a], L.B, [&](int64_t i, int64_t j0, int64_t j1) {
            if (j1 <= j0) return;
            mixed_sims<scalar_t>(L, a, i, j0, j1, lm, unordered, s.data());
            const scalar_t* ri = r + i * L.B;
            scalar_t* gi = g + i * L.B;
            const int64_t n = j1 - j0;
            std::fill(d.begin(), d.begin() + n, scalar_t(0));
            add_term_grad(sp, s.data(), w_p.data(), lw_p.data(), n, lp, gpa, d.data());
            add_term_grad(sn, s.data(), w_n.data(), lw_n.data(), n, ln, gna, d.data());
            // ds/dS_ai = l r, ds/dS_aj = (1 - l) r, ds/dG_ij = -s lam (1 - lam) r^2 (0 where the norm was clamped)
            scalar_t dsi = 0;
            if (!unordered) {
#pragma omp simd reduction(+ : dsi)
              for (int64_t j = j0; j < j1; ++j) {
                const scalar_t dr = d[j - j0] * ri[j];
                dsi += dr * lm;
                dSa[j] += dr * (scalar_t(1) - lm);
                gi[j] -= ri[j] < scalar_t(1e12) ? dr * s[j - j0] * c * ri[j] : scalar_t(0);
              }
            } else {
              for (int64_t j = j0; j < j1; ++j) {
                const scalar_t dr = d[j - j0] * ri[j], l = lam_on_i(L, i, j, lm, unordered);
                dsi += dr * l;
                dSa[j] += dr * (scalar_t(1) - l);
                gi[j] -= ri[j] < scalar_t(1e12) ? dr * s[j - j0] * c * ri[j] : scalar_t(0);
              }
            }
            dSa[i] += dsi;
          });
        }
      }
    }
  });
  auto dGs = dG.sum(0);
  auto grad_anchors = at::mm(dS, L.emb_s);
  auto grad_sorted = at::mm(dS.t(), anchors) + at::mm(dGs + dGs.t(), L.emb_s);
  auto grad_emb = at::zeros_like(emb).index_copy_(0, L.perm, grad_sorted);
  return {grad_anchors, grad_emb};
}

}  // namespace metrix
