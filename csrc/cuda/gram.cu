// Embedding mixup through the Gram identity (SPEC 1.3): the anchor-to-mixed similarity of every
// triple (anchor a, pair (i, j)) comes from P = anchors @ emb^T and G = emb @ emb^T, which the
// caller provides one chunk at a time (rows a0.. of P, rows i0.. of G). No mixed embedding and no
// [A, B, B] tensor exist.
//
// Membership confines i to a group of the anchor (its class for pos-neg / pos-pos, itself for
// anc-neg; neg-neg is one dense group). The caller lists each anchor's i of the chunk and each
// i's anchors of the chunk (GramArgs i_order / i_range, a_order / a_range), so the loops over i and
// over a visit the group only: O(A * B * group) work instead of O(A * B * B).
//
// Every output has a single owner that loops over the remaining index in a fixed order, so results
// are deterministic without atomics:
//   forward  thread (a, j), loop i: per-anchor statistics, merged over j by warp shuffles, then
//            over j blocks (and over chunks) by the finalize kernel, in order;
//   backward warp (a, i), lanes over j, then a butterfly: dP[a, i];  thread (a, j), loop i: dP[a, j];
//            thread (i, j), loop a: dG[i, j].
// A block is 8 warps; a warp's 32 lanes take 32 consecutive j, so G reads coalesce.
#include "common.cuh"

namespace mx {
namespace {

constexpr int WARPS = 8, LANES = 32, THREADS = WARPS * LANES, NPART = 8;
constexpr unsigned ALL_LANES = 0xffffffffu;

// Weights and mixed similarity of triple (a, i, j); false when it is no member of a's mixing set.
__device__ __forceinline__ bool triple(const GramArgs& g, int64_t a_loc, int64_t i, int64_t j, float& wp, float& wn,
                                       MixedSim& ms) {
  if (!gram_candidate(g.member, (int32_t)i, (int32_t)j)) return false;
  const int64_t a = g.a0 + a_loc;
  pair_weights(g.member, g.label_mode, g.lam, g.anchor_label[a], g.anchor_index[a], g.labels[i], g.labels[j],
               (int32_t)i, false, wp, wn);
  if (!(wp > 0.0f) && !(wn > 0.0f)) return false;
  ms = mixed_sim(g.lam, g.P[a_loc * g.B + i], g.P[a_loc * g.B + j], g.G[(i - g.i0) * g.B + j]);
  return true;
}

__device__ __forceinline__ SigmaPair sigmas(const GramArgs& g) {
  return SigmaPair{g.pos_scale, g.pos_shift, g.neg_scale, g.neg_shift};
}

template <int FORM>
__device__ __forceinline__ float triple_grad(const GramArgs& g, int64_t a_loc, float s, float wp, float wn) {
  const int64_t a = g.a0 + a_loc, A = g.A;
  return pair_grad<FORM>(sigmas(g), g.of, s, wp, wn, g.stats[a], g.stats[A + a], g.grad_pos[a], g.grad_neg[a]);
}

// partial layout: [j block][NPART][na] with NPART = pos (m, l, mass, nnz), neg (m, l, mass, nnz).
template <int FORM>
__global__ void __launch_bounds__(THREADS) forward_kernel(const GramArgs g) {
  const int64_t a_loc = (int64_t)blockIdx.x * WARPS + threadIdx.x / LANES;
  const int64_t j = (int64_t)blockIdx.y * LANES + threadIdx.x % LANES;
  TermAcc pos = term_empty(), neg = term_empty();
  if (a_loc < g.na && j < g.B) {
    const int64_t end = g.i_range[g.na + a_loc];
    for (int64_t k = g.i_range[a_loc]; k < end; ++k) {
      float wp, wn;
      MixedSim ms;
      if (triple(g, a_loc, g.i_order[k], j, wp, wn, ms)) pair_add<FORM>(sigmas(g), g.of, ms.s, wp, wn, pos, neg);
    }
  }
#pragma unroll
  for (int off = LANES / 2; off > 0; off >>= 1) {
    term_merge<FORM>(pos, TermAcc{__shfl_xor_sync(ALL_LANES, pos.m, off), __shfl_xor_sync(ALL_LANES, pos.l, off),
                                  __shfl_xor_sync(ALL_LANES, pos.mass, off), __shfl_xor_sync(ALL_LANES, pos.nnz, off)});
    term_merge<FORM>(neg, TermAcc{__shfl_xor_sync(ALL_LANES, neg.m, off), __shfl_xor_sync(ALL_LANES, neg.l, off),
                                  __shfl_xor_sync(ALL_LANES, neg.mass, off), __shfl_xor_sync(ALL_LANES, neg.nnz, off)});
  }
  if (threadIdx.x % LANES == 0 && a_loc < g.na) {
    float* out = g.partial + (int64_t)blockIdx.y * NPART * g.na + a_loc;
    const float v[NPART] = {pos.m, pos.l, pos.mass, pos.nnz, neg.m, neg.l, neg.mass, neg.nnz};
#pragma unroll
    for (int k = 0; k < NPART; ++k) out[k * g.na] = v[k];
  }
}

// Merge the j-block partials of each anchor, in order, into its running statistics.
template <int FORM>
__global__ void finalize_kernel(const GramArgs g, const int64_t nblocks) {
  const int64_t a_loc = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (a_loc >= g.na) return;
  const int64_t a = g.a0 + a_loc, A = g.A;
  float* st = g.stats;
  TermAcc pos = term_resume<FORM>(st[a], st[2 * A + a], st[4 * A + a]);
  TermAcc neg = term_resume<FORM>(st[A + a], st[3 * A + a], st[5 * A + a]);
  for (int64_t b = 0; b < nblocks; ++b) {
    const float* v = g.partial + b * NPART * g.na + a_loc;
    term_merge<FORM>(pos, TermAcc{v[0], v[g.na], v[2 * g.na], v[3 * g.na]});
    term_merge<FORM>(neg, TermAcc{v[4 * g.na], v[5 * g.na], v[6 * g.na], v[7 * g.na]});
  }
  st[a] = term_result<FORM>(pos);
  st[A + a] = term_result<FORM>(neg);
  st[2 * A + a] = pos.mass;
  st[3 * A + a] = neg.mass;
  st[4 * A + a] = pos.nnz;
  st[5 * A + a] = neg.nnz;
}

// dP[a, i] += sum_j dL/ds * ds/dP[a, i]. A block per anchor, a warp per i of its group, lanes over j,
// summed by a butterfly: a thread per (a, i) would leave almost every thread idle, and lanes over j
// read G coalesced.
template <int FORM>
__global__ void __launch_bounds__(THREADS) grad_ai_kernel(const GramArgs g) {
  const int64_t a_loc = blockIdx.x;
  const int lane = threadIdx.x % LANES;
  const int64_t end = g.i_range[g.na + a_loc];
  for (int64_t k = g.i_range[a_loc] + threadIdx.x / LANES; k < end; k += WARPS) {
    const int64_t i = g.i_order[k];
    float acc = 0.0f;
    for (int64_t j = lane; j < g.B; j += LANES) {
      float wp, wn;
      MixedSim ms;
      if (triple(g, a_loc, i, j, wp, wn, ms)) acc += triple_grad<FORM>(g, a_loc, ms.s, wp, wn) * mixed_dpai(g.lam, ms);
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(ALL_LANES, acc, off);
    if (lane == 0) g.dP[a_loc * g.B + i] += acc;
  }
}

// dP[a, j] += sum_i dL/ds * ds/dP[a, j]
template <int FORM>
__global__ void __launch_bounds__(THREADS) grad_aj_kernel(const GramArgs g) {
  const int64_t a_loc = (int64_t)blockIdx.x * WARPS + threadIdx.x / LANES;
  const int64_t j = (int64_t)blockIdx.y * LANES + threadIdx.x % LANES;
  if (a_loc >= g.na || j >= g.B) return;
  float acc = 0.0f;
  const int64_t end = g.i_range[g.na + a_loc];
  for (int64_t k = g.i_range[a_loc]; k < end; ++k) {
    float wp, wn;
    MixedSim ms;
    if (triple(g, a_loc, g.i_order[k], j, wp, wn, ms))
      acc += triple_grad<FORM>(g, a_loc, ms.s, wp, wn) * mixed_dpaj(g.lam, ms);
  }
  g.dP[a_loc * g.B + j] += acc;
}

// dG[i, j] = sum_a dL/ds * ds/dG[i, j], over the anchors of i's group
template <int FORM>
__global__ void __launch_bounds__(THREADS) grad_ij_kernel(const GramArgs g) {
  const int64_t i_loc = (int64_t)blockIdx.x * WARPS + threadIdx.x / LANES;
  const int64_t j = (int64_t)blockIdx.y * LANES + threadIdx.x % LANES;
  if (i_loc >= g.ni || j >= g.B) return;
  float acc = 0.0f;
  const int64_t end = g.a_range[g.ni + i_loc];
  for (int64_t k = g.a_range[i_loc]; k < end; ++k) {
    const int64_t a_loc = g.a_order[k] - g.a0;
    float wp, wn;
    MixedSim ms;
    if (triple(g, a_loc, g.i0 + i_loc, j, wp, wn, ms))
      acc += triple_grad<FORM>(g, a_loc, ms.s, wp, wn) * mixed_dgij(g.lam, ms);
  }
  g.dG[i_loc * g.B + j] = acc;
}

}  // namespace

int64_t gram_partial_size(int64_t na, int64_t B) { return (int64_t)blocks_for(B, LANES) * NPART * na; }

cudaError_t gram_forward(const GramArgs& g, cudaStream_t stream) {
  if (g.na == 0 || g.ni == 0 || g.B == 0) return cudaSuccess;
  return dispatch_form(g.form, [&](auto form) {
    constexpr int F = decltype(form)::value;
    const dim3 grid(blocks_for(g.na, WARPS), blocks_for(g.B, LANES));
    forward_kernel<F><<<grid, THREADS, 0, stream>>>(g);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    finalize_kernel<F><<<blocks_for(g.na, 128), 128, 0, stream>>>(g, (int64_t)grid.y);
    return cudaGetLastError();
  });
}

cudaError_t gram_backward(const GramArgs& g, cudaStream_t stream) {
  if (g.na == 0 || g.ni == 0 || g.B == 0) return cudaSuccess;
  return dispatch_form(g.form, [&](auto form) {
    constexpr int F = decltype(form)::value;
    grad_ai_kernel<F><<<(unsigned)g.na, THREADS, 0, stream>>>(g);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    grad_aj_kernel<F><<<dim3(blocks_for(g.na, WARPS), blocks_for(g.B, LANES)), THREADS, 0, stream>>>(g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    grad_ij_kernel<F><<<dim3(blocks_for(g.ni, WARPS), blocks_for(g.B, LANES)), THREADS, 0, stream>>>(g);
    return cudaGetLastError();
  });
}

}  // namespace mx
