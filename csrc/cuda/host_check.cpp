// Host twin of the CUDA kernels for tests on machines without a GPU (tests/test_backend_cuda.py
// compiles it with g++ and loads it with ctypes). It runs pair_math.cuh, the code the kernels run,
// in the kernels' reduction order (16-lane / 32-lane butterflies, ordered partial merges), behind
// the binding's argument lists, so backends/cuda.py can be tested end to end against the reference.
// float32 only: the test converts.
#include <stdint.h>

#include <vector>

#include "pair_math.cuh"

using namespace mx;

namespace {

template <int FORM>
TermAcc butterfly(std::vector<TermAcc> lanes) {  // the kernels' __shfl_xor_sync merge
  for (size_t off = lanes.size() / 2; off > 0; off /= 2) {
    std::vector<TermAcc> next = lanes;
    for (size_t l = 0; l < lanes.size(); ++l) term_merge<FORM>(next[l], lanes[l ^ off]);
    lanes = next;
  }
  return lanes[0];
}

float butterfly_sum(std::vector<float> lanes) {  // the kernels' __shfl_xor_sync sum
  for (size_t off = lanes.size() / 2; off > 0; off /= 2) {
    std::vector<float> next = lanes;
    for (size_t l = 0; l < lanes.size(); ++l) next[l] += lanes[l ^ off];
    lanes = next;
  }
  return lanes[0];
}

struct Pairwise {
  const float *rows, *cols;
  int64_t R, V, d;
  const int32_t *rli, *rlj, *ridx, *cli, *clj, *cidx;
  const bool* mask;
  float lam;
  int member, label_mode, form, of, mixed_rows;
  SigmaPair sg;

  float dot(int64_t r, int64_t c) const {
    float s = 0.0f;
    for (int64_t k = 0; k < d; ++k) s += rows[r * d + k] * cols[c * d + k];
    return s;
  }
  void weights(int64_t r, int64_t c, float& wp, float& wn) const {
    bool m = member == MEMBER_MASK && mask[r * V + c];
    if (mixed_rows)
      pair_weights(member, label_mode, lam, cli[c], cidx[c], rli[r], rlj[r], ridx[r], m, wp, wn);
    else
      pair_weights(member, label_mode, lam, rli[r], ridx[r], cli[c], clj[c], cidx[c], m, wp, wn);
  }
};

template <int FORM>
void pairwise_forward_t(const Pairwise& p, float* stats) {
  const int64_t R = p.R;
  for (int64_t r = 0; r < R; ++r) {
    std::vector<TermAcc> pos(16, term_empty()), neg(16, term_empty());
    for (int64_t c = 0; c < p.V; ++c) {  // lane tx of the kernel takes columns c0 + tx + 16n
      float wp, wn;
      p.weights(r, c, wp, wn);
      pair_add<FORM>(p.sg, p.of, p.dot(r, c), wp, wn, pos[c % 16], neg[c % 16]);
    }
    TermAcc tp = butterfly<FORM>(pos), tn = butterfly<FORM>(neg);
    stats[r] = term_result<FORM>(tp);
    stats[R + r] = term_result<FORM>(tn);
    stats[2 * R + r] = tp.mass;
    stats[3 * R + r] = tn.mass;
    stats[4 * R + r] = tp.nnz;
    stats[5 * R + r] = tn.nnz;
  }
}

template <int FORM>
void pairwise_backward_t(const Pairwise& p, const float* stats, const float* gpos, const float* gneg, float* grows,
                         float* gcols) {
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t c = 0; c < p.V; ++c) {
      float wp, wn;
      p.weights(r, c, wp, wn);
      float g = pair_grad<FORM>(p.sg, p.of, p.dot(r, c), wp, wn, stats[r], stats[p.R + r], gpos[r], gneg[r]);
      for (int64_t k = 0; k < p.d; ++k) {
        grows[r * p.d + k] += g * p.cols[c * p.d + k];
        gcols[c * p.d + k] += g * p.rows[r * p.d + k];
      }
    }
}

struct Gram {
  const float *P, *G;
  int64_t A, na, ni, B, a0, i0;
  const int32_t *al, *ai, *lb, *io, *ir, *ao, *ar;  // GramArgs i_order, i_range, a_order, a_range
  float lam;
  int member, label_mode, form, of;
  SigmaPair sg;

  bool triple(int64_t a, int64_t i, int64_t j, float& wp, float& wn, MixedSim& ms) const {
    if (!gram_candidate(member, (int32_t)i, (int32_t)j)) return false;
    pair_weights(member, label_mode, lam, al[a0 + a], ai[a0 + a], lb[i], lb[j], (int32_t)i, false, wp, wn);
    if (!(wp > 0.0f) && !(wn > 0.0f)) return false;
    ms = mixed_sim(lam, P[a * B + i], P[a * B + j], G[(i - i0) * B + j]);
    return true;
  }
  template <int FORM>
  float grad(int64_t a, const float* st, const float* gpos, const float* gneg, float s, float wp, float wn) const {
    const int64_t ga = a0 + a;
    return pair_grad<FORM>(sg, of, s, wp, wn, st[ga], st[A + ga], gpos[ga], gneg[ga]);
  }
};

template <int FORM>
void gram_forward_t(const Gram& g, float* st) {
  const int64_t A = g.A;
  for (int64_t a = 0; a < g.na; ++a) {
    const int64_t ga = g.a0 + a;
    TermAcc pos = term_resume<FORM>(st[ga], st[2 * A + ga], st[4 * A + ga]);
    TermAcc neg = term_resume<FORM>(st[A + ga], st[3 * A + ga], st[5 * A + ga]);
    for (int64_t j0 = 0; j0 < g.B; j0 += 32) {  // one warp: 32 consecutive j, then a butterfly
      std::vector<TermAcc> lp(32, term_empty()), ln(32, term_empty());
      for (int64_t l = 0; l < 32 && j0 + l < g.B; ++l)
        for (int64_t k = g.ir[a]; k < g.ir[g.na + a]; ++k) {
          float wp, wn;
          MixedSim ms;
          if (g.triple(a, g.io[k], j0 + l, wp, wn, ms)) pair_add<FORM>(g.sg, g.of, ms.s, wp, wn, lp[l], ln[l]);
        }
      term_merge<FORM>(pos, butterfly<FORM>(lp));
      term_merge<FORM>(neg, butterfly<FORM>(ln));
    }
    st[ga] = term_result<FORM>(pos);
    st[A + ga] = term_result<FORM>(neg);
    st[2 * A + ga] = pos.mass;
    st[3 * A + ga] = neg.mass;
    st[4 * A + ga] = pos.nnz;
    st[5 * A + ga] = neg.nnz;
  }
}

// The three backward kernels in launch order: dP[a, i] (lane l sums j = l, l + 32, ..., then a
// butterfly), dP[a, j], dG[i, j].
template <int FORM>
void gram_backward_t(const Gram& g, const float* st, const float* gpos, const float* gneg, float* dP, float* dG) {
  float wp, wn;
  MixedSim ms;
  for (int64_t a = 0; a < g.na; ++a)
    for (int64_t k = g.ir[a]; k < g.ir[g.na + a]; ++k) {
      const int64_t i = g.io[k];
      std::vector<float> lanes(32, 0.0f);
      for (int64_t j = 0; j < g.B; ++j)
        if (g.triple(a, i, j, wp, wn, ms))
          lanes[j % 32] += g.grad<FORM>(a, st, gpos, gneg, ms.s, wp, wn) * mixed_dpai(g.lam, ms);
      dP[a * g.B + i] += butterfly_sum(lanes);
    }
  for (int64_t a = 0; a < g.na; ++a)
    for (int64_t j = 0; j < g.B; ++j) {
      float acc = 0.0f;
      for (int64_t k = g.ir[a]; k < g.ir[g.na + a]; ++k)
        if (g.triple(a, g.io[k], j, wp, wn, ms))
          acc += g.grad<FORM>(a, st, gpos, gneg, ms.s, wp, wn) * mixed_dpaj(g.lam, ms);
      dP[a * g.B + j] += acc;
    }
  for (int64_t i = 0; i < g.ni; ++i)
    for (int64_t j = 0; j < g.B; ++j) {
      float acc = 0.0f;
      for (int64_t k = g.ar[i]; k < g.ar[g.ni + i]; ++k) {
        const int64_t a = g.ao[k] - g.a0;
        if (g.triple(a, g.i0 + i, j, wp, wn, ms))
          acc += g.grad<FORM>(a, st, gpos, gneg, ms.s, wp, wn) * mixed_dgij(g.lam, ms);
      }
      dG[i * g.B + j] = acc;
    }
}

}  // namespace

extern "C" {

void host_pairwise(const float* rows, const float* cols, int64_t R, int64_t V, int64_t d, const int32_t* rli,
                   const int32_t* rlj, const int32_t* ridx, const int32_t* cli, const int32_t* clj,
                   const int32_t* cidx, const bool* mask, float* stats, float lam, int member, int label_mode,
                   int form, int of, int mixed_rows, float ps, float psh, float ns, float nsh, const float* gpos,
                   const float* gneg, float* grows, float* gcols) {
  const Pairwise p{rows, cols, R, V, d, rli, rlj, ridx, cli, clj, cidx, mask, lam, member, label_mode, form, of,
                   mixed_rows, SigmaPair{ps, psh, ns, nsh}};
  const bool backward = grows != nullptr;
  switch (form) {
    case FORM_EXP: backward ? pairwise_backward_t<FORM_EXP>(p, stats, gpos, gneg, grows, gcols)
                            : pairwise_forward_t<FORM_EXP>(p, stats); break;
    case FORM_HINGE: backward ? pairwise_backward_t<FORM_HINGE>(p, stats, gpos, gneg, grows, gcols)
                              : pairwise_forward_t<FORM_HINGE>(p, stats); break;
    default: backward ? pairwise_backward_t<FORM_SOFTPLUS>(p, stats, gpos, gneg, grows, gcols)
                      : pairwise_forward_t<FORM_SOFTPLUS>(p, stats);
  }
}

void host_gram(const float* P, const float* G, int64_t A, int64_t na, int64_t ni, int64_t B, int64_t a0, int64_t i0,
               const int32_t* al, const int32_t* ai, const int32_t* lb, const int32_t* io, const int32_t* ir,
               const int32_t* ao, const int32_t* ar, float* stats, float lam, int member, int label_mode, int form,
               int of, float ps, float psh, float ns, float nsh, const float* gpos, const float* gneg, float* dP,
               float* dG) {
  const Gram g{P, G, A, na, ni, B, a0, i0, al, ai, lb, io, ir, ao, ar, lam, member, label_mode, form, of,
               SigmaPair{ps, psh, ns, nsh}};
  const bool backward = dP != nullptr;
  switch (form) {
    case FORM_EXP: backward ? gram_backward_t<FORM_EXP>(g, stats, gpos, gneg, dP, dG)
                            : gram_forward_t<FORM_EXP>(g, stats); break;
    case FORM_HINGE: backward ? gram_backward_t<FORM_HINGE>(g, stats, gpos, gneg, dP, dG)
                              : gram_forward_t<FORM_HINGE>(g, stats); break;
    default: backward ? gram_backward_t<FORM_SOFTPLUS>(g, stats, gpos, gneg, dP, dG)
                      : gram_forward_t<FORM_SOFTPLUS>(g, stats);
  }
}

// The mixpool kernels' loops, same tie rule (first maximum) and CSR walk.
void host_mixpool_forward(const float* f, int64_t C, int64_t HW, int64_t M, const int64_t* i, const int64_t* j,
                          float lam, float* pooled, int32_t* argmax) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.0f, best = -INFINITY;
      int32_t arg = 0;
      for (int64_t k = 0; k < HW; ++k) {
        float x = lam * f[(i[m] * C + c) * HW + k] + (1.0f - lam) * f[(j[m] * C + c) * HW + k];
        sum += x;
        if (x > best) best = x, arg = (int32_t)k;
      }
      pooled[m * C + c] = sum / (float)HW + best;
      argmax[m * C + c] = arg;
    }
}

void host_mixpool_backward(const float* gp, int64_t B, int64_t C, int64_t HW, int64_t M, float lam,
                           const int32_t* argmax, const int64_t* order, const int64_t* offsets, float* gf) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      float mean = 0.0f;
      for (int64_t e = offsets[b]; e < offsets[b + 1]; ++e) {
        int64_t k = order[e], m = k < M ? k : k - M;
        mean += (k < M ? lam : 1.0f - lam) * gp[m * C + c];
      }
      for (int64_t k = 0; k < HW; ++k) gf[(b * C + c) * HW + k] = mean / (float)HW;
      for (int64_t e = offsets[b]; e < offsets[b + 1]; ++e) {
        int64_t k = order[e], m = k < M ? k : k - M;
        gf[(b * C + c) * HW + argmax[m * C + c]] += (k < M ? lam : 1.0f - lam) * gp[m * C + c];
      }
    }
}

}  // extern "C"
