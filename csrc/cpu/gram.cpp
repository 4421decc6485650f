// Embedding mixup through the Gram matrix (SPEC 1.3): the similarity of anchor a to the mix of
// (e_i, e_j) is (lam S_ai + (1 - lam) S_aj) r_ij with S = anchors emb^T and r_ij = 1 / |lam e_i +
// (1 - lam) e_j|, a function of G_ij = <e_i, e_j>. Examples are sorted by label so that the mixing
// set of an anchor is a few contiguous ranges of j for each i (the membership rule), and the soft
// label is one constant per pair set. Memory: G and r [B, B], S [A, B] unless the anchors are the
// embeddings (S is then rows of G), their gradients in backward; neither mixed embeddings nor
// anchor-to-mixed similarities exist.
#include <omp.h>

#include <numeric>

#include "common.h"
#include "kernels.h"

namespace metrix {
namespace {

struct Layout {
  at::Tensor emb_s, G, S, r;  // sorted embeddings, their Gram matrix, S (undefined when same), r_ij
  std::vector<int64_t> lab, orig, pos, begin, end, srow;  // sorted labels / originals; per anchor: sorted
                                                           // position (or -1), class range, row of S in G
  int64_t A, B;
  bool sorted, same;  // labels came sorted (emb_s is emb); the anchors are emb

  template <typename T>
  const T* S_row(int64_t a) const {
    return same ? G.data_ptr<T>() + srow[a] * B : S.data_ptr<T>() + a * B;
  }
  // The gradient in the original order of emb from that of emb_s.
  at::Tensor unsort(const at::Tensor& g) const {
    return sorted ? g : at::empty_like(g).index_copy_(0, at::tensor(orig, g.options().dtype(at::kLong)), g);
  }
};

// same: anchors and emb are one tensor, so S is a row permutation of G and only their summed
// gradient reaches autograd. saved: {G, r[, S]} as the forward returned them, or empty.
Layout layout(const at::Tensor& anchors, const at::Tensor& anchor_label, const at::Tensor& anchor_index,
              const at::Tensor& emb, const at::Tensor& labels, double lam, bool same,
              const std::vector<at::Tensor>& saved = {}) {
  Layout L;
  L.A = anchors.size(0), L.B = emb.size(0), L.same = same;
  const int64_t* lp = labels.data_ptr<int64_t>();
  L.sorted = std::is_sorted(lp, lp + L.B);  // the ops layer groups pos-neg / anc-neg batches by class
  L.orig.resize(L.B);
  std::iota(L.orig.begin(), L.orig.end(), int64_t(0));
  if (!L.sorted) std::stable_sort(L.orig.begin(), L.orig.end(), [&](int64_t x, int64_t z) { return lp[x] < lp[z]; });
  L.lab.resize(L.B);
  std::vector<int64_t> where(L.B);
  for (int64_t p = 0; p < L.B; ++p) L.lab[p] = lp[L.orig[p]], where[L.orig[p]] = p;
  const int64_t* al = anchor_label.data_ptr<int64_t>();
  const int64_t* ai = anchor_index.data_ptr<int64_t>();
  L.pos.resize(L.A), L.begin.resize(L.A), L.end.resize(L.A), L.srow.resize(same ? L.A : 0);
  for (int64_t a = 0; a < L.A; ++a) {
    L.begin[a] = std::lower_bound(L.lab.begin(), L.lab.end(), al[a]) - L.lab.begin();
    L.end[a] = std::upper_bound(L.lab.begin(), L.lab.end(), al[a]) - L.lab.begin();
    L.pos[a] = ai[a] >= 0 ? where[ai[a]] : -1;
    if (same) L.srow[a] = where[a];
  }
  L.emb_s = L.sorted ? emb : emb.index_select(0, at::tensor(L.orig, labels.options()));
  if (!saved.empty()) {
    L.G = saved[0], L.r = saved[1];
    if (!same) L.S = saved[2];
    return L;
  }
  L.G = at::mm(L.emb_s, L.emb_s.t());
  if (!same) L.S = at::mm(anchors, L.emb_s.t());
  // r_ij = 1 / max(sqrt(lam^2 + (1 - lam)^2 + 2 lam (1 - lam) G_ij), 1e-12)
  L.r = at::empty_like(L.G);
  dispatch(emb, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t q = scalar_t(lam * lam + (1 - lam) * (1 - lam)), c = scalar_t(2 * lam * (1 - lam));
    const scalar_t* g = L.G.data_ptr<scalar_t>();
    scalar_t* r = L.r.data_ptr<scalar_t>();
    const int64_t n = L.B * L.B;
#pragma omp parallel for simd schedule(static)
    for (int64_t k = 0; k < n; ++k)
      r[k] = scalar_t(1) / std::max(std::sqrt(std::max(g[k] * c + q, scalar_t(0))), scalar_t(1e-12));
  });
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
  const T* Sa = L.S_row<T>(a);
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

// Returns {stats, G, r[, S]}: the products, for backward to reuse.
std::vector<at::Tensor> gram_mixed_forward(at::Tensor anchors, at::Tensor anchor_label, at::Tensor anchor_index,
                                              at::Tensor emb, at::Tensor labels, double lam,
                                              std::vector<double> sig_pos, std::vector<double> sig_neg,
                                              int64_t member, int64_t mode, bool same) {
  TORCH_CHECK(member >= POS_NEG && member <= NEG_NEG, "gram_mixed: member must be a mixing pair set");
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Layout L = layout(anchors, anchor_label, anchor_index, emb, labels, lam, same);
  const int rule = static_cast<int>(member);
  const bool unordered = rule == POS_POS || rule == NEG_NEG;
  const Weight wp = Weight::of(pair_set_label(rule, static_cast<int>(mode), lam));
  const Weight wn = Weight::of(1.0 - wp.w);
  std::vector<Term> tp(L.A), tn(L.A);
  dispatch(emb, [&](auto zero) {
    using scalar_t = decltype(zero);
#pragma omp parallel
    {
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
  auto stats = make_stats(anchors, L.A, tp, tn, sp, sn);
  if (same) return {stats, L.G, L.r};
  return {stats, L.G, L.r, L.S};
}

std::vector<at::Tensor> gram_mixed_backward(at::Tensor anchors, at::Tensor anchor_label,
                                               at::Tensor anchor_index, at::Tensor emb, at::Tensor labels,
                                               double lam, std::vector<double> sig_pos, std::vector<double> sig_neg,
                                               int64_t member, int64_t mode, bool same, at::Tensor stats,
                                               at::Tensor grad_pos, at::Tensor grad_neg, std::vector<at::Tensor> saved) {
  TORCH_CHECK(member >= POS_NEG && member <= NEG_NEG, "gram_mixed: member must be a mixing pair set");
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Layout L = layout(anchors, anchor_label, anchor_index, emb, labels, lam, same, saved);
  const int rule = static_cast<int>(member);
  const bool unordered = rule == POS_POS || rule == NEG_NEG;
  const Weight wp = Weight::of(pair_set_label(rule, static_cast<int>(mode), lam));
  const Weight wn = Weight::of(1.0 - wp.w);
  const auto lse_p = to_vector(stats[0]), lse_n = to_vector(stats[1]);
  const auto gp = to_vector(grad_pos), gn = to_vector(grad_neg);
  // Anchors of one label touch the rows i of dG of that label only (except for neg-neg): one
  // group per label, processed by one thread, keeps dG free of races.
  std::vector<int64_t> order(L.A);
  std::iota(order.begin(), order.end(), int64_t(0));
  const int64_t* al = anchor_label.data_ptr<int64_t>();
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t z) { return al[x] < al[z]; });
  std::vector<int64_t> group_start;
  for (int64_t k = 0; k < L.A; ++k)
    if (k == 0 || al[order[k]] != al[order[k - 1]]) group_start.push_back(k);
  group_start.push_back(L.A);
  const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;
  // When the anchors are emb, dS is accumulated into dG at the anchors' rows (S_a = G_srow[a]):
  // in their label's rows too, unless the anchor labels disagree with the labels.
  bool private_dG = rule == NEG_NEG;
  for (int64_t a = 0; same && a < L.A; ++a) private_dG |= L.srow[a] < L.begin[a] || L.srow[a] >= L.end[a];
  const int threads = omp_get_max_threads();

  auto dS = same ? at::Tensor() : at::zeros_like(L.S);
  auto dG = at::zeros({private_dG ? threads : 1, L.B, L.B}, emb.options());
  dispatch(emb, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t lm = scalar_t(lam), c = scalar_t(lam * (1 - lam));
    const scalar_t* r = L.r.data_ptr<scalar_t>();
#pragma omp parallel num_threads(threads)
    {
      std::vector<scalar_t> s(L.B), d(L.B), dSa(L.B), w_p(L.B, scalar_t(wp.w)), lw_p(L.B, scalar_t(wp.lw)),
          w_n(L.B, scalar_t(wn.w)), lw_n(L.B, scalar_t(wn.lw));
      scalar_t* g = dG.data_ptr<scalar_t>() + (private_dG ? omp_get_thread_num() * L.B * L.B : 0);
      // round-robin, not first come: a private dG then holds the same groups on every run
#pragma omp for schedule(static, 1)
      for (int64_t k = 0; k < groups; ++k) {
        for (int64_t o = group_start[k]; o < group_start[k + 1]; ++o) {
          const int64_t a = order[o];
          const scalar_t gpa = scalar_t(wp.w > 0 ? gp[a] : 0), gna = scalar_t(wn.w > 0 ? gn[a] : 0);
          const scalar_t lp = scalar_t(lse_p[a]), ln = scalar_t(lse_n[a]);
          std::fill(dSa.begin(), dSa.end(), scalar_t(0));  // its own row: it may be row i of dG
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
          scalar_t* to = same ? g + L.srow[a] * L.B : dS.data_ptr<scalar_t>() + a * L.B;
#pragma omp simd
          for (int64_t j = 0; j < L.B; ++j) to[j] += dSa[j];
        }
      }
    }
  });
  // G = emb_s emb_s^T, S = anchors emb_s^T: dL/demb_s = (dG + dG^T) emb_s + dS^T anchors, dL/danchors = dS emb_s
  auto dGs = private_dG ? dG.sum(0) : dG[0];
  dispatch(emb, [&](auto zero) { add_transpose(dGs.data_ptr<decltype(zero)>(), L.B); });
  auto grad_sorted = at::mm(dGs, L.emb_s);
  if (same) {  // dS is in dG: the whole gradient, and memory-free zeros for the other side
    return {at::zeros({}, anchors.options()).expand_as(anchors), L.unsort(grad_sorted)};
  }
  grad_sorted.addmm_(dS.t(), anchors);
  return {at::mm(dS, L.emb_s), L.unsort(grad_sorted)};
}

}  // namespace metrix
