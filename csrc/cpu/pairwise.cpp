// Generic pairwise loss: rows [R, d] against cols [V, d], similarity tiles from BLAS, per-pair
// weights from labels, per-row log-sum-exp statistics. No [R, V] matrix is kept: each thread owns
// one tile of at most kTileElems similarities; backward recomputes the tile and turns it into
// dL/ds before two matrix products.
#include <omp.h>

#include "common.h"
#include "kernels.h"

namespace metrix {
namespace {

constexpr int64_t kTileElems = 1 << 17;
constexpr int64_t kMaxCols = 4096;

struct Pairs {
  const int64_t *rli, *rlj, *ridx, *cli, *clj, *cidx;
  const bool* mask;  // explicit [R, V] membership or null
  int64_t V;
  int member;
  bool mixed_rows;
  Weight pos[4], neg[4];  // by [label_i == z] * 2 + [label_j == z]

  // The weights of pair (r, c) in the two terms; none when the pair does not count.
  void weights(int64_t r, int64_t c, Weight& wp, Weight& wn) const {
    int64_t li, lj, i, z, a;
    if (mixed_rows) {
      li = rli[r], lj = rlj[r], i = ridx[r], z = cli[c], a = cidx[c];
    } else {
      li = cli[c], lj = clj[c], i = cidx[c], z = rli[r], a = ridx[r];
    }
    const bool pi = li == z, pj = lj == z;
    if (mask ? mask[r * V + c] : rule_member(member, pi, pj, i == a)) {
      wp = pos[pi * 2 + pj], wn = neg[pi * 2 + pj];
    } else {
      wp = wn = Weight{};
    }
  }
};

struct Tiling {
  int64_t rt, ct, row_tiles;
};

Tiling tiling(int64_t R, int64_t V) {
  const int64_t ct = std::max<int64_t>(1, std::min(V, kMaxCols));
  const int64_t spread = (R + 4 * omp_get_max_threads() - 1) / (4 * omp_get_max_threads());
  const int64_t rt = std::max<int64_t>(1, std::min(kTileElems / ct, spread));
  return {rt, ct, (R + rt - 1) / rt};
}

// The weights of one tile row, per term: linear, log, and their mass.
template <typename T>
struct RowWeights {
  std::vector<T> wp, lwp, wn, lwn;
  double mass_p = 0.0, mass_n = 0.0;

  explicit RowWeights(int64_t n) : wp(n), lwp(n), wn(n), lwn(n) {}

  void fill(const Pairs& P, int64_t r, int64_t c0, int64_t cn) {
    mass_p = mass_n = 0.0;
    for (int64_t k = 0; k < cn; ++k) {
      Weight a, b;
      P.weights(r, c0 + k, a, b);
      wp[k] = T(a.w), lwp[k] = T(a.lw), wn[k] = T(b.w), lwn[k] = T(b.lw);
      mass_p += a.w, mass_n += b.w;
    }
  }
};

// dL/ds of one tile row, written over the similarities (d: scratch of the row's length).
template <typename T>
void row_grad(const Sigma& sp, const Sigma& sn, T* s, const RowWeights<T>& w, int64_t n, T lse_p, T lse_n, T gp,
              T gn, T* d) {
  std::fill(d, d + n, T(0));
  add_term_grad(sp, s, w.wp.data(), w.lwp.data(), n, lse_p, gp, d);
  add_term_grad(sn, s, w.wn.data(), w.lwn.data(), n, lse_n, gn, d);
  std::copy(d, d + n, s);
}

Pairs make_pairs(const at::Tensor& rli, const at::Tensor& rlj, const at::Tensor& ridx, const at::Tensor& cli,
                 const at::Tensor& clj, const at::Tensor& cidx, const std::optional<at::Tensor>& mask, int64_t V,
                 double lam, int64_t member, int64_t mode, bool mixed_rows) {
  Pairs P{rli.data_ptr<int64_t>(), rlj.data_ptr<int64_t>(), ridx.data_ptr<int64_t>(), cli.data_ptr<int64_t>(),
          clj.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), mask ? mask->data_ptr<bool>() : nullptr,
          V, static_cast<int>(member), mixed_rows, {}, {}};
  for (int k = 0; k < 4; ++k) {
    const double y = soft_label(static_cast<int>(mode), lam, k & 2, k & 1);
    P.pos[k] = Weight::of(y), P.neg[k] = Weight::of(1.0 - y);
  }
  return P;
}

}  // namespace

at::Tensor pairwise_forward(at::Tensor rows, at::Tensor rli, at::Tensor rlj, at::Tensor ridx,
                               at::Tensor cols, at::Tensor cli, at::Tensor clj, at::Tensor cidx,
                               double lam, std::vector<double> sig_pos, std::vector<double> sig_neg, int64_t member,
                               int64_t mode, bool mixed_rows, std::optional<at::Tensor> mask) {
  const int64_t R = rows.size(0), V = cols.size(0);
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Pairs P = make_pairs(rli, rlj, ridx, cli, clj, cidx, mask, V, lam, member, mode, mixed_rows);
  std::vector<Term> tp(R), tn(R);
  const Tiling tl = tiling(R, V);
  dispatch(rows, [&](auto zero) {
    using scalar_t = decltype(zero);
#pragma omp parallel
    {
      // ATen calls in worker threads: autograd's thread-local state does not reach them
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto tile = at::empty({tl.rt * tl.ct}, rows.options());
      RowWeights<scalar_t> w(tl.ct);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tl.row_tiles; ++t) {
        const int64_t r0 = t * tl.rt, rn = std::min(tl.rt, R - r0);
        for (int64_t c0 = 0; c0 < V; c0 += tl.ct) {
          const int64_t cn = std::min(tl.ct, V - c0);
          auto sim = tile.narrow(0, 0, rn * cn).view({rn, cn});
          at::mm_out(sim, rows.narrow(0, r0, rn), cols.narrow(0, c0, cn).t());
          const scalar_t* s = sim.data_ptr<scalar_t>();
          for (int64_t k = 0; k < rn; ++k) {
            w.fill(P, r0 + k, c0, cn);
            tp[r0 + k].mass += w.mass_p, tn[r0 + k].mass += w.mass_n;
            reduce_term(sp, s + k * cn, w.wp.data(), w.lwp.data(), cn, tp[r0 + k]);
            reduce_term(sn, s + k * cn, w.wn.data(), w.lwn.data(), cn, tn[r0 + k]);
          }
        }
      }
    }
  });
  return make_stats(rows, R, tp, tn, sp, sn);
}

std::vector<at::Tensor> pairwise_backward(at::Tensor rows, at::Tensor rli, at::Tensor rlj,
                                             at::Tensor ridx, at::Tensor cols, at::Tensor cli,
                                             at::Tensor clj, at::Tensor cidx, double lam,
                                             std::vector<double> sig_pos, std::vector<double> sig_neg,
                                             int64_t member, int64_t mode, bool mixed_rows,
                                             std::optional<at::Tensor> mask, at::Tensor stats,
                                             at::Tensor grad_pos, at::Tensor grad_neg) {
  const int64_t R = rows.size(0), V = cols.size(0);
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Pairs P = make_pairs(rli, rlj, ridx, cli, clj, cidx, mask, V, lam, member, mode, mixed_rows);
  const auto lse_p = to_vector(stats[0]), lse_n = to_vector(stats[1]);
  const auto gp = to_vector(grad_pos), gn = to_vector(grad_neg);
  const Tiling tl = tiling(R, V);
  const int threads = omp_get_max_threads();
  auto grad_rows = at::zeros_like(rows);
  // each thread accumulates the columns' gradient on its own, summed at the end
  auto grad_cols = at::zeros({threads, V, cols.size(1)}, cols.options());
  dispatch(rows, [&](auto zero) {
    using scalar_t = decltype(zero);
#pragma omp parallel
    {
      // ATen calls in worker threads: autograd's thread-local state does not reach them
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto tile = at::empty({tl.rt * tl.ct}, rows.options());
      auto my_cols = grad_cols[omp_get_thread_num()];
      RowWeights<scalar_t> w(tl.ct);
      std::vector<scalar_t> d(tl.ct);
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tl.row_tiles; ++t) {
        const int64_t r0 = t * tl.rt, rn = std::min(tl.rt, R - r0);
        auto row_block = rows.narrow(0, r0, rn);
        for (int64_t c0 = 0; c0 < V; c0 += tl.ct) {
          const int64_t cn = std::min(tl.ct, V - c0);
          auto sim = tile.narrow(0, 0, rn * cn).view({rn, cn});
          auto col_block = cols.narrow(0, c0, cn);
          at::mm_out(sim, row_block, col_block.t());
          scalar_t* s = sim.data_ptr<scalar_t>();
          for (int64_t k = 0; k < rn; ++k) {
            const int64_t r = r0 + k;
            w.fill(P, r, c0, cn);
            row_grad<scalar_t>(sp, sn, s + k * cn, w, cn, lse_p[r], lse_n[r], gp[r], gn[r], d.data());
          }
          grad_rows.narrow(0, r0, rn).addmm_(sim, col_block);
          my_cols.narrow(0, c0, cn).addmm_(sim.t(), row_block);
        }
      }
    }
  });
  return {grad_rows, grad_cols.sum(0)};
}

}  // namespace metrix
