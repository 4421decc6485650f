// Generic pairwise loss: rows [R, d] against cols [V, d], similarity blocks from BLAS, per-pair
// weights from labels, per-row log-sum-exp statistics. No [R, V] matrix is kept: rows go in blocks
// of at most kBlockElems similarities, each one multi-threaded BLAS product followed by a parallel
// pass over the block's rows (BLAS at full width beats one single-threaded product per thread on
// small tiles). Backward recomputes a block and turns it into dL/ds in place before its gradient
// products. Mixed columns under pos-neg, pos-pos and anc-neg take the grouped path (Groups below).
#include <omp.h>

#include <array>

#include "common.h"
#include "kernels.h"

namespace metrix {
namespace {

constexpr int64_t kBlockElems = 1 << 18;
constexpr int64_t kMaxCols = 4096;
constexpr int64_t kGroupCols = 128;  // columns of a group per backward work item

struct Pairs {
  const int64_t *rli, *rlj, *ridx, *cli, *clj, *cidx;
  const bool* mask;  // explicit [R, V] membership or null
  int64_t V;
  bool mixed_rows;
  bool member[8];         // the rule's membership by [label_i == z] * 4 + [label_j == z] * 2 + [i == a]
  Weight pos[5], neg[5];  // by [label_i == z] * 2 + [label_j == z]; 4: not a member

  // Which of pos / neg applies to pair (r, c); branch-free, so that a row's loop is cheap.
  int code(int64_t r, int64_t c) const {
    int64_t li, lj, i, z, a;
    if (mixed_rows) {
      li = rli[r], lj = rlj[r], i = ridx[r], z = cli[c], a = cidx[c];
    } else {
      li = cli[c], lj = clj[c], i = cidx[c], z = rli[r], a = ridx[r];
    }
    const int pi = li == z, pj = lj == z;
    const bool in = mask ? mask[r * V + c] : member[pi * 4 + pj * 2 + (i == a)];
    return in ? pi * 2 + pj : 4;
  }
};

// The member pairs of one block row, compacted: their columns, similarities and weights per term
// (linear and log), and the row's mass. Mixed columns are mostly not members of a given row
// (pos-neg: about one in the number of classes; anc-neg: one in the batch size), and the
// exponentials then run over the members only.
template <typename T>
struct RowPairs {
  std::vector<int64_t> col;
  std::vector<int8_t> code;
  std::vector<T> s, wp, lwp, wn, lwn;
  int64_t n = 0;
  double mass_p = 0.0, mass_n = 0.0;
  T tab[4][5];  // wp, lwp, wn, lwn by pair code
  const int64_t* last_ids = nullptr;  // what fill_group last filled for
  int64_t last_z = 0;

  RowPairs(const Pairs& P, int64_t cols) : col(cols), code(cols), s(cols), wp(cols), lwp(cols), wn(cols), lwn(cols) {
    for (int k = 0; k < 5; ++k)
      tab[0][k] = T(P.pos[k].w), tab[1][k] = T(P.pos[k].lw), tab[2][k] = T(P.neg[k].w), tab[3][k] = T(P.neg[k].lw);
  }

  // fill for columns ids of a group (Groups below). When the last fill was of the same columns for
  // a row of the same label, the members, codes and weights are the same and only the similarities
  // are gathered again: the rows of a pos-neg or pos-pos group all have its label, and the index
  // that anc-neg membership depends on is the group's key, the same for all its rows.
  void fill_group(const Pairs& P, int64_t r, int64_t cn, const T* sim, const int64_t* ids) {
    const int64_t z = P.rli[r];
    if (ids == last_ids && z == last_z) {
      for (int64_t m = 0; m < n; ++m) s[m] = sim[col[m]];
      return;
    }
    fill(P, r, 0, cn, sim, ids);
    last_ids = ids, last_z = z;
  }

  // the columns are c0 + k, or ids[k] when ids is given (a group's columns)
  void fill(const Pairs& P, int64_t r, int64_t c0, int64_t cn, const T* sim, const int64_t* ids = nullptr) {
    last_ids = nullptr;
    n = 0;
    for (int64_t k = 0; k < cn; ++k) {  // branch-free compaction
      const int x = P.code(r, ids ? ids[k] : c0 + k);
      col[n] = k, code[n] = static_cast<int8_t>(x);
      n += x != 4;
    }
    double mp = 0.0, mn = 0.0;
#pragma omp simd reduction(+ : mp, mn)
    for (int64_t m = 0; m < n; ++m) {
      const int x = code[m];
      s[m] = sim[col[m]], wp[m] = tab[0][x], lwp[m] = tab[1][x], wn[m] = tab[2][x], lwn[m] = tab[3][x];
      mp += P.pos[x].w, mn += P.neg[x].w;
    }
    mass_p = mp, mass_n = mn;
  }
};

// dL/ds of one block row from its member pairs, written over the row's similarities (d: scratch).
template <typename T>
void row_grad(const Sigma& sp, const Sigma& sn, T* sim, int64_t cn, const RowPairs<T>& w, T lse_p, T lse_n, T gp,
              T gn, T* d) {
  std::fill(d, d + w.n, T(0));
  add_term_grad(sp, w.s.data(), w.wp.data(), w.lwp.data(), w.n, lse_p, gp, d);
  add_term_grad(sn, w.s.data(), w.wn.data(), w.lwn.data(), w.n, lse_n, gn, d);
  std::fill(sim, sim + cn, T(0));
  for (int64_t k = 0; k < w.n; ++k) sim[w.col[k]] = d[k];
}

// Mixed columns under pos-neg and pos-pos (every member's label_i is the row's label) or anc-neg
// (every member's i is the row's index): rows and columns fall into groups by that key, and a row
// meets only the columns of its group. The grouped path forms just those similarities, by dot
// products: under pos-neg it skips the (K - 1) / K of the pairs between groups (K classes in the
// batch), under anc-neg all but the row's own mixes. Groups share no row and no column: a backward
// work item (part of one group's columns) owns its columns' gradients.
struct Groups {
  std::vector<int64_t> rows, cols;             // row and column ids, group by group
  std::vector<int64_t> row_start, col_start;   // group g: rows[row_start[g] : row_start[g + 1]], same for cols
  std::vector<int64_t> row_group;              // the group of rows[n]
  int64_t widest = 0;                          // the most columns in a group
};

bool grouped(const Pairs& P, int64_t member) {
  return !P.mask && !P.mixed_rows && (member == POS_NEG || member == POS_POS || member == ANC_NEG);
}

// The groups in order of their key; rows and columns keep their order inside a group. Counting
// by a binary search among the rows' keys, where sorting every column took longer than the
// forward's own work under anc-neg.
Groups make_groups(const Pairs& P, int64_t R, int64_t member) {
  const bool by_index = member == ANC_NEG;
  const auto row_key = [&](int64_t r) { return by_index ? P.ridx[r] : P.rli[r]; };
  const auto col_key = [&](int64_t c) { return by_index ? P.cidx[c] : P.cli[c]; };
  std::vector<int64_t> keys(R);
  for (int64_t r = 0; r < R; ++r) keys[r] = row_key(r);
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const int64_t K = static_cast<int64_t>(keys.size());
  const auto group_of = [&](int64_t key) {  // K when no row has this key
    const int64_t g = std::lower_bound(keys.begin(), keys.end(), key) - keys.begin();
    return g < K && keys[g] == key ? g : K;
  };
  std::vector<int64_t> row_g(R), col_g(P.V), row_count(K + 1, 0), col_count(K + 1, 0);
  for (int64_t r = 0; r < R; ++r) ++row_count[row_g[r] = group_of(row_key(r))];
  for (int64_t c = 0; c < P.V; ++c) ++col_count[col_g[c] = group_of(col_key(c))];
  Groups G;
  G.row_start.assign(1, 0), G.col_start.assign(1, 0);
  std::vector<int64_t> group_id(K, -1);  // among the groups kept: those with columns
  for (int64_t g = 0; g < K; ++g) {
    if (col_count[g] == 0) continue;
    group_id[g] = static_cast<int64_t>(G.row_start.size()) - 1;
    G.row_start.push_back(G.row_start.back() + row_count[g]);
    G.col_start.push_back(G.col_start.back() + col_count[g]);
    G.widest = std::max(G.widest, col_count[g]);
  }
  G.rows.resize(G.row_start.back()), G.row_group.resize(G.row_start.back()), G.cols.resize(G.col_start.back());
  std::vector<int64_t> next_row(G.row_start.begin(), G.row_start.end() - 1);
  std::vector<int64_t> next_col(G.col_start.begin(), G.col_start.end() - 1);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group_id[row_g[r]];
    if (g >= 0) G.row_group[next_row[g]] = g, G.rows[next_row[g]++] = r;
  }
  for (int64_t c = 0; c < P.V; ++c) {
    if (col_g[c] == K) continue;
    const int64_t g = group_id[col_g[c]];
    if (g >= 0) G.cols[next_col[g]++] = c;
  }
  return G;
}

// sim[k] = <x, cols[ids[k]]> for a group's columns, four at a time: four independent sums hide the
// latency of the adds that one dot product's chain would wait on.
template <typename T>
void dots(const T* x, const T* cols, const int64_t* ids, int64_t cn, int64_t d, T* sim) {
  int64_t k = 0;
  for (; k + 4 <= cn; k += 4) {
    const T *y0 = cols + ids[k] * d, *y1 = cols + ids[k + 1] * d, *y2 = cols + ids[k + 2] * d,
            *y3 = cols + ids[k + 3] * d;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t t = 0; t < d; ++t) s0 += x[t] * y0[t], s1 += x[t] * y1[t], s2 += x[t] * y2[t], s3 += x[t] * y3[t];
    sim[k] = s0, sim[k + 1] = s1, sim[k + 2] = s2, sim[k + 3] = s3;
  }
  for (; k < cn; ++k) {
    const T* y = cols + ids[k] * d;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < d; ++t) s += x[t] * y[t];
    sim[k] = s;
  }
}

Pairs make_pairs(const at::Tensor& rli, const at::Tensor& rlj, const at::Tensor& ridx, const at::Tensor& cli,
                 const at::Tensor& clj, const at::Tensor& cidx, const std::optional<at::Tensor>& mask, int64_t V,
                 double lam, int64_t member, int64_t mode, bool mixed_rows) {
  Pairs P{rli.data_ptr<int64_t>(), rlj.data_ptr<int64_t>(), ridx.data_ptr<int64_t>(), cli.data_ptr<int64_t>(),
          clj.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), mask ? mask->data_ptr<bool>() : nullptr,
          V, mixed_rows, {}, {}, {}};
  for (int k = 0; k < 8; ++k) P.member[k] = rule_member(static_cast<int>(member), k & 4, k & 2, k & 1);
  for (int k = 0; k < 4; ++k) {
    const double y = soft_label(static_cast<int>(mode), lam, k & 2, k & 1);
    P.pos[k] = Weight::of(y), P.neg[k] = Weight::of(1.0 - y);
  }
  return P;  // pos[4] = neg[4] = no weight
}

// Calls f(r0, rn, c0, cn, sim) for each block, sim [rn, cn] = rows[r0:] cols[c0:]^T. Returns the
// whole [R, V] similarity matrix when it was one block (the forward's, that backward may reuse), or
// an undefined tensor. saved: that matrix, reused instead of the product.
template <typename F>
at::Tensor for_each_block(const at::Tensor& rows, const at::Tensor& cols, const std::optional<at::Tensor>& saved,
                          F f) {
  const int64_t R = rows.size(0), V = cols.size(0);
  const int64_t cb = std::max<int64_t>(1, std::min(V, kMaxCols));
  const int64_t rb = std::max<int64_t>(1, std::min(R, kBlockElems / cb));
  if (rb >= R && cb >= V) {
    auto sim = saved ? *saved : at::mm(rows, cols.t());
    f(0, R, 0, V, sim);
    return sim;
  }
  auto buf = at::empty({rb * cb}, rows.options());
  for (int64_t r0 = 0; r0 < R; r0 += rb) {
    const int64_t rn = std::min(rb, R - r0);
    for (int64_t c0 = 0; c0 < V; c0 += cb) {
      const int64_t cn = std::min(cb, V - c0);
      auto sim = buf.narrow(0, 0, rn * cn).view({rn, cn});
      at::mm_out(sim, rows.narrow(0, r0, rn), cols.narrow(0, c0, cn).t());
      f(r0, rn, c0, cn, sim);
    }
  }
  return at::Tensor();
}

}  // namespace

// Returns {stats} and, when the similarities were one block, that [R, V] block for backward.
std::vector<at::Tensor> pairwise_forward(at::Tensor rows, at::Tensor rli, at::Tensor rlj, at::Tensor ridx,
                                            at::Tensor cols, at::Tensor cli, at::Tensor clj, at::Tensor cidx,
                                            double lam, std::vector<double> sig_pos, std::vector<double> sig_neg,
                                            int64_t member, int64_t mode, bool mixed_rows,
                                            std::optional<at::Tensor> mask) {
  const int64_t R = rows.size(0), V = cols.size(0);
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Pairs P = make_pairs(rli, rlj, ridx, cli, clj, cidx, mask, V, lam, member, mode, mixed_rows);
  std::vector<Term> tp(R), tn(R);
  at::Tensor whole;
  dispatch(rows, [&](auto zero) {
    using scalar_t = decltype(zero);
    if (grouped(P, member)) {
      const Groups G = make_groups(P, R, member);
      const int64_t d = rows.size(1);
      const scalar_t *x = rows.data_ptr<scalar_t>(), *y = cols.data_ptr<scalar_t>();
#pragma omp parallel
      {
        RowPairs<scalar_t> w(P, G.widest);
        std::vector<scalar_t> sim(G.widest);
#pragma omp for schedule(dynamic, 4)
        for (int64_t n = 0; n < static_cast<int64_t>(G.rows.size()); ++n) {
          const int64_t r = G.rows[n], g = G.row_group[n];
          const int64_t* ids = G.cols.data() + G.col_start[g];
          const int64_t cn = G.col_start[g + 1] - G.col_start[g];
          dots(x + r * d, y, ids, cn, d, sim.data());
          w.fill_group(P, r, cn, sim.data(), ids);
          tp[r].mass += w.mass_p, tn[r].mass += w.mass_n;
          reduce_term(sp, w.s.data(), w.wp.data(), w.lwp.data(), w.n, tp[r]);
          reduce_term(sn, w.s.data(), w.wn.data(), w.lwn.data(), w.n, tn[r]);
        }
      }
      return;
    }
    whole = for_each_block(rows, cols, std::nullopt, [&](int64_t r0, int64_t rn, int64_t c0, int64_t cn, at::Tensor& sim) {
      const scalar_t* s = sim.data_ptr<scalar_t>();
#pragma omp parallel
      {
        RowPairs<scalar_t> w(P, cn);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < rn; ++k) {
          w.fill(P, r0 + k, c0, cn, s + k * cn);
          tp[r0 + k].mass += w.mass_p, tn[r0 + k].mass += w.mass_n;
          reduce_term(sp, w.s.data(), w.wp.data(), w.lwp.data(), w.n, tp[r0 + k]);
          reduce_term(sn, w.s.data(), w.wn.data(), w.lwn.data(), w.n, tn[r0 + k]);
        }
      }
    });
  });
  auto stats = make_stats(rows, R, tp, tn, sp, sn);
  if (!whole.defined()) return {stats};
  return {stats, whole};
}

// same: rows and cols are one tensor (the caller passed the same object), so only their summed
// gradient can reach autograd: it is returned whole in grad_rows, from one product (D + D^T) X
// where the block is the whole [R, R] matrix; grad_cols is then zero. saved: the forward's
// similarity matrix, if it returned one (overwritten).
std::vector<at::Tensor> pairwise_backward(at::Tensor rows, at::Tensor rli, at::Tensor rlj,
                                             at::Tensor ridx, at::Tensor cols, at::Tensor cli,
                                             at::Tensor clj, at::Tensor cidx, double lam,
                                             std::vector<double> sig_pos, std::vector<double> sig_neg,
                                             int64_t member, int64_t mode, bool mixed_rows,
                                             std::optional<at::Tensor> mask, at::Tensor stats,
                                             at::Tensor grad_pos, at::Tensor grad_neg, bool same,
                                             std::optional<at::Tensor> saved) {
  const int64_t R = rows.size(0), V = cols.size(0);
  const Sigma sp = sigma_from(sig_pos), sn = sigma_from(sig_neg);
  const Pairs P = make_pairs(rli, rlj, ridx, cli, clj, cidx, mask, V, lam, member, mode, mixed_rows);
  const auto lse_p = to_vector(stats[0]), lse_n = to_vector(stats[1]);
  const auto gp = to_vector(grad_pos), gn = to_vector(grad_neg);
  auto grad_rows = at::zeros_like(rows);
  auto grad_cols = same ? grad_rows : at::zeros_like(cols);
  dispatch(rows, [&](auto zero) {
    using scalar_t = decltype(zero);
    if (!same && grouped(P, member)) {
      // Work items are (group, up to kGroupCols of its columns), so that a few large groups (the
      // classes of a batch) still spread over the threads. An item owns its columns' gradients;
      // its rows' gradients go to a per-thread buffer. Items go to threads round-robin and the
      // buffers are summed in thread order: the same result on every run with as many threads.
      const Groups G = make_groups(P, R, member);
      const int64_t d = rows.size(1), groups = static_cast<int64_t>(G.row_start.size()) - 1;
      std::vector<std::array<int64_t, 2>> items;  // (group, first column in it)
      int64_t most_rows = 0;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t c = G.col_start[g]; c < G.col_start[g + 1]; c += kGroupCols) items.push_back({g, c});
        most_rows = std::max(most_rows, G.row_start[g + 1] - G.row_start[g]);
      }
      const int64_t chunk = std::min(kGroupCols, G.widest);
      const scalar_t *x = rows.data_ptr<scalar_t>(), *y = cols.data_ptr<scalar_t>();
      scalar_t *gx = grad_rows.data_ptr<scalar_t>(), *gy = grad_cols.data_ptr<scalar_t>();
      const int threads = omp_get_max_threads();
      std::vector<scalar_t> gx_threads(threads * R * d, scalar_t(0));
#pragma omp parallel num_threads(threads)
      {
        RowPairs<scalar_t> w(P, chunk);
        std::vector<scalar_t> ds(most_rows * chunk), scratch(chunk);
        scalar_t* gx_own = gx_threads.data() + omp_get_thread_num() * R * d;
#pragma omp for schedule(static, 1)
        for (int64_t item = 0; item < static_cast<int64_t>(items.size()); ++item) {
          const auto [g, c0] = items[item];
          const int64_t* ids = G.cols.data() + c0;
          const int64_t cn = std::min(kGroupCols, G.col_start[g + 1] - c0);
          const int64_t n0 = G.row_start[g], rn = G.row_start[g + 1] - n0;
          for (int64_t n = 0; n < rn; ++n) {  // dL/ds of each row of the group, and the rows' gradients
            const int64_t r = G.rows[n0 + n];
            scalar_t* dsr = ds.data() + n * cn;
            dots(x + r * d, y, ids, cn, d, dsr);
            w.fill_group(P, r, cn, dsr, ids);
            row_grad<scalar_t>(sp, sn, dsr, cn, w, lse_p[r], lse_n[r], gp[r], gn[r], scratch.data());
            add_weighted_rows(gx_own + r * d, d, w.n, [&](int64_t m) {  // members only: the others are 0
              const int64_t k = w.col[m];
              return std::pair<scalar_t, const scalar_t*>(dsr[k], y + ids[k] * d);
            });
          }
          for (int64_t k = 0; k < cn; ++k)  // the item's columns' gradients
            add_weighted_rows(gy + ids[k] * d, d, rn, [&](int64_t n) {
              return std::pair<scalar_t, const scalar_t*>(ds[n * cn + k], x + G.rows[n0 + n] * d);
            });
        }
      }
      for (int t = 0; t < threads; ++t)
        for (int64_t e = 0; e < R * d; ++e) gx[e] += gx_threads[t * R * d + e];
      return;
    }
    for_each_block(rows, cols, saved, [&](int64_t r0, int64_t rn, int64_t c0, int64_t cn, at::Tensor& sim) {
      scalar_t* s = sim.data_ptr<scalar_t>();
#pragma omp parallel
      {
        RowPairs<scalar_t> w(P, cn);
        std::vector<scalar_t> d(cn);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < rn; ++k) {
          const int64_t r = r0 + k;
          w.fill(P, r, c0, cn, s + k * cn);
          row_grad<scalar_t>(sp, sn, s + k * cn, cn, w, lse_p[r], lse_n[r], gp[r], gn[r], d.data());
        }
      }
      if (same && rn == R && cn == V) {
        add_transpose(s, R);
        at::mm_out(grad_rows, sim, rows);
        return;
      }
      grad_rows.narrow(0, r0, rn).addmm_(sim, cols.narrow(0, c0, cn));
      grad_cols.narrow(0, c0, cn).addmm_(sim.t(), rows.narrow(0, r0, rn));
    });
  });
  return {grad_rows, same ? at::zeros({}, cols.options()).expand_as(cols) : grad_cols};
}

}  // namespace metrix
