// Per-pair maths of the kernel contract (metrix_kernels/backends/__init__.py), shared by the CUDA
// kernels and a host harness (csrc/cuda/host_check.cpp) that tests it against the reference on
// machines without a GPU. Torch-free and usable from plain C++.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MX_HD __host__ __device__ __forceinline__
#else
#define MX_HD inline
#endif

namespace mx {

// Codes shared with the Python side (backends/__init__.py and backends/cuda.py).
enum Form { FORM_EXP = 0, FORM_HINGE = 1, FORM_SOFTPLUS = 2 };
enum Input { IN_S = 0, IN_D = 1, IN_D2 = 2 };
enum Member { MEMBER_ALL = 0, MEMBER_ALL_BUT_SELF = 1, MEMBER_POS_NEG = 2, MEMBER_ANC_NEG = 3,
              MEMBER_POS_POS = 4, MEMBER_NEG_NEG = 5, MEMBER_MASK = 6 };
enum Label { LABEL_INTERPOLATE = 0, LABEL_NEGATIVE = 1, LABEL_DOMINANT = 2 };

// Division and reciprocal square root without the IEEE slow-path subroutine call, whose ABI
// would make ptxas spill the live tile registers around it (2 ulp, arguments always in range).
MX_HD float fast_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

MX_HD float fast_rsqrt(float x) {
#ifdef __CUDA_ARCH__
  return rsqrtf(x);
#else
  return 1.0f / sqrtf(x);
#endif
}

// t(s): s, d = sqrt(max(2 - 2s, 0)) or d^2 = max(2 - 2s, 0). A run-time switch: it is uniform
// across the launch and cheap next to the exp / log of sigma.
MX_HD float sigma_input(int of, float s) {
  if (of == IN_S) return s;
  float x = 2.0f - 2.0f * s;
  if (of == IN_D2) return fmaxf(x, 0.0f);
  return x > 0.0f ? x * fast_rsqrt(x) : 0.0f;
}

// dt/ds as the reference differentiates it (family.Sigma.argument): 0 where d or d2 is 0.
MX_HD float sigma_input_grad(int of, float s) {
  if (of == IN_S) return 1.0f;
  float x = 2.0f - 2.0f * s;
  if (of == IN_D2) return x > 0.0f ? -2.0f : 0.0f;
  return x > 0.0f ? -fast_rsqrt(x) : 0.0f;
}

// sigma(x) for the non-exponential forms; softplus exact as family._softplus (logaddexp(x, 0)).
template <int FORM>
MX_HD float sigma_value(float x) {
  if (FORM == FORM_HINGE) return fmaxf(x, 0.0f);
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

// sigma'(x): the hinge's as torch.relu's (0 at 0), softplus' the logistic function.
template <int FORM>
MX_HD float sigma_grad(float x) {
  if (FORM == FORM_HINGE) return x > 0.0f ? 1.0f : 0.0f;
  float z = expf(-fabsf(x));
  return x >= 0.0f ? fast_div(1.0f, 1.0f + z) : fast_div(z, 1.0f + z);
}

// Running statistics of one term of one row. For FORM_EXP, (m, l) is an online log-sum-exp:
// the term is m + log(l); otherwise l is the plain weighted sum and m is unused.
struct TermAcc {
  float m, l, mass, nnz;
};

MX_HD TermAcc term_empty() { return TermAcc{-INFINITY, 0.0f, 0.0f, 0.0f}; }

template <int FORM>
MX_HD void term_add(TermAcc& t, float x, float w) {
  if (!(w > 0.0f)) return;
  t.mass += w;
  if (FORM == FORM_EXP) {
    t.nnz += 1.0f;
    if (x > t.m) {  // also the first element: exp(-inf) = 0
      t.l = t.l * expf(t.m - x) + w;
      t.m = x;
    } else {
      t.l += w * expf(x - t.m);
    }
  } else {
    float v = sigma_value<FORM>(x);
    t.l += w * v;
    if (v > 0.0f) t.nnz += 1.0f;
  }
}

template <int FORM>
MX_HD void term_merge(TermAcc& t, const TermAcc& o) {
  t.mass += o.mass;
  t.nnz += o.nnz;
  if (FORM == FORM_EXP) {
    if (o.m > t.m) {
      t.l = t.l * expf(t.m - o.m) + o.l;
      t.m = o.m;
    } else if (o.l > 0.0f) {
      t.l += o.l * expf(o.m - t.m);
    }
  } else {
    t.l += o.l;
  }
}

// The contract's term statistic: log of the sum for FORM_EXP (-inf when empty), else the sum.
template <int FORM>
MX_HD float term_result(const TermAcc& t) {
  if (FORM == FORM_EXP) return t.l > 0.0f ? t.m + logf(t.l) : -INFINITY;
  return t.l;
}

// An accumulator that continues from a finished statistic (merging chunked launches).
template <int FORM>
MX_HD TermAcc term_resume(float result, float mass, float nnz) {
  if (FORM == FORM_EXP) {
    bool some = result > -INFINITY;
    return TermAcc{result, some ? 1.0f : 0.0f, mass, nnz};
  }
  return TermAcc{0.0f, result, mass, nnz};
}

// d(term statistic)/dx for one pair, given the row's finished statistic.
template <int FORM>
MX_HD float term_dx(float x, float w, float result) {
  if (!(w > 0.0f)) return 0.0f;
  if (FORM == FORM_EXP) return w * expf(x - result);
  return w * sigma_grad<FORM>(x);
}

// Pair weights (w_pos, w_neg) of a clean side (label z, index a; a = -1 for a proxy) against a
// mixed side (labels li, lj, index mi); clean pairs have li == lj and lam = 1.
MX_HD bool rule_member(int rule, bool pi, bool pj, int32_t a, int32_t mi) {
  switch (rule) {
    case MEMBER_ALL: return true;
    case MEMBER_ALL_BUT_SELF: return mi != a;
    case MEMBER_POS_NEG: return pi && !pj;
    case MEMBER_ANC_NEG: return mi == a && !pj;
    case MEMBER_POS_POS: return pi && pj;
    default: return !pi && !pj;  // MEMBER_NEG_NEG
  }
}

// The soft label y and 1 - y, each as one of 0, 1, lam, 1 - lam: 1 - y formed by subtraction
// would lose a lam below float32's resolution at 1 (y = 1 - lam).
MX_HD void soft_label(int mode, float lam, bool pi, bool pj, float& y, float& not_y) {
  if (mode == LABEL_NEGATIVE) {
    y = 0.0f, not_y = 1.0f;
  } else if (mode == LABEL_DOMINANT) {
    const bool p = lam >= 0.5f ? pi : pj;
    y = p ? 1.0f : 0.0f, not_y = p ? 0.0f : 1.0f;
  } else {
    y = pi ? (pj ? 1.0f : lam) : (pj ? 1.0f - lam : 0.0f);
    not_y = pi ? (pj ? 0.0f : 1.0f - lam) : (pj ? lam : 1.0f);
  }
}

// member: the rule's verdict, or the explicit mask's when rule == MEMBER_MASK.
MX_HD void pair_weights(int rule, int mode, float lam, int32_t z, int32_t a, int32_t li, int32_t lj,
                        int32_t mi, bool mask, float& wp, float& wn) {
  bool pi = li == z, pj = lj == z;
  bool member = rule == MEMBER_MASK ? mask : rule_member(rule, pi, pj, a, mi);
  float y, not_y;
  soft_label(mode, lam, pi, pj, y, not_y);
  wp = member ? y : 0.0f;
  wn = member ? not_y : 0.0f;
}

// Sigma parameters of both terms; both share form and input (every row of the family does).
struct SigmaPair {
  float pos_scale, pos_shift, neg_scale, neg_shift;
};

// Accumulate one pair of similarity s into a row's two terms.
template <int FORM>
MX_HD void pair_add(const SigmaPair& sg, int of, float s, float wp, float wn, TermAcc& pos, TermAcc& neg) {
  float t = sigma_input(of, s);
  term_add<FORM>(pos, sg.pos_scale * t + sg.pos_shift, wp);
  term_add<FORM>(neg, sg.neg_scale * t + sg.neg_shift, wn);
}

// dL/ds of one pair from the row's statistics and the upstream gradients of its two terms.
template <int FORM>
MX_HD float pair_grad(const SigmaPair& sg, int of, float s, float wp, float wn, float pos_stat, float neg_stat,
                      float grad_pos, float grad_neg) {
  if (!(wp > 0.0f) && !(wn > 0.0f)) return 0.0f;
  float t = sigma_input(of, s);
  float g = 0.0f;
  if (wp > 0.0f && grad_pos != 0.0f)
    g += grad_pos * term_dx<FORM>(sg.pos_scale * t + sg.pos_shift, wp, pos_stat) * sg.pos_scale;
  if (wn > 0.0f && grad_neg != 0.0f)
    g += grad_neg * term_dx<FORM>(sg.neg_scale * t + sg.neg_shift, wn, neg_stat) * sg.neg_scale;
  return g * sigma_input_grad(of, s);
}

// Embedding mixup through the Gram identity (SPEC 1.3): s(a, ij) from pa_i = <a, e_i>,
// pa_j = <a, e_j>, g_ij = <e_i, e_j>, for unit e_i, e_j.
struct MixedSim {
  float s, inv_n;
  bool clamped;  // the norm hit its 1e-12 floor: no gradient through it
};

MX_HD MixedSim mixed_sim(float lam, float pai, float paj, float gij) {
  float mu = 1.0f - lam;
  float q = lam * lam + mu * mu + 2.0f * lam * mu * gij;
  bool clamped = !(q > 1e-24f);  // n = sqrt(q) at its 1e-12 floor
  float inv_n = clamped ? 1e12f : fast_rsqrt(q);
  return MixedSim{(lam * pai + mu * paj) * inv_n, inv_n, clamped};
}

// Partial derivatives of s(a, ij) with respect to pa_i, pa_j and g_ij.
MX_HD float mixed_dpai(float lam, const MixedSim& m) { return lam * m.inv_n; }
MX_HD float mixed_dpaj(float lam, const MixedSim& m) { return (1.0f - lam) * m.inv_n; }
MX_HD float mixed_dgij(float lam, const MixedSim& m) {
  return m.clamped ? 0.0f : -m.s * lam * (1.0f - lam) * m.inv_n * m.inv_n;
}

// Which mixing pairs (i, j) a rule enumerates: ordered i != j, or unordered i < j.
MX_HD bool gram_candidate(int rule, int32_t i, int32_t j) {
  return (rule == MEMBER_POS_POS || rule == MEMBER_NEG_NEG) ? i < j : i != j;
}

}  // namespace mx
