// The generic fused pairwise loss: per-row term statistics of sigma(s) over all columns, s = <row, col>,
// without any [R, V] tensor. A block owns 64 rows and walks the columns in 64-wide tiles; each of its
// 256 threads holds a 4 x 4 block of dot products and the running statistics of its 4 rows, merged
// across the 16 threads of a row by shuffles in a fixed order (deterministic, no atomics).
// Backward recomputes each tile. Row and column gradients are two launches, each owning its output
// rows, so no two blocks ever write the same element.
#include "common.cuh"

namespace mx {
namespace {

constexpr int TILE = 64, BK = 16, THREADS = 256, PER = 4;  // 16 x 16 threads, 4 x 4 pairs each

// acc[m][n] = <A[a0 + ty + 16m], B[b0 + tx + 16n]> in float32; rows past nA / nB read as zeros.
template <typename T>
__device__ __forceinline__ void dot_tile(const T* __restrict__ A, int64_t nA, int64_t a0, const T* __restrict__ B,
                                         int64_t nB, int64_t b0, int64_t d, float (*As)[TILE + 1],
                                         float (*Bs)[TILE + 1], float (&acc)[PER][PER]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lk = threadIdx.x % BK, lr = threadIdx.x / BK;  // this thread loads column lk of rows lr + 16q
#pragma unroll
  for (int m = 0; m < PER; ++m)
#pragma unroll
    for (int n = 0; n < PER; ++n) acc[m][n] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    const int64_t k = k0 + lk;
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      const int r = lr + 16 * q;
      As[lk][r] = (a0 + r < nA && k < d) ? to_float(A[(a0 + r) * d + k]) : 0.0f;
      Bs[lk][r] = (b0 + r < nB && k < d) ? to_float(B[(b0 + r) * d + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[PER], b[PER];
#pragma unroll
      for (int m = 0; m < PER; ++m) a[m] = As[kk][ty + 16 * m];
#pragma unroll
      for (int n = 0; n < PER; ++n) b[n] = Bs[kk][tx + 16 * n];
#pragma unroll
      for (int m = 0; m < PER; ++m)
#pragma unroll
        for (int n = 0; n < PER; ++n) acc[m][n] = fmaf(a[m], b[n], acc[m][n]);
    }
    __syncthreads();
  }
}

// Pair weights of row r and column c under the contract's labelling.
__device__ __forceinline__ void weights(const PairwiseArgs& p, int64_t r, int64_t c, float& wp, float& wn) {
  const bool mask = p.member == MEMBER_MASK && p.mask[r * p.V + c];
  if (p.mixed_rows)
    pair_weights(p.member, p.label_mode, p.lam, p.col_li[c], p.col_idx[c], p.row_li[r], p.row_lj[r], p.row_idx[r],
                 mask, wp, wn);
  else
    pair_weights(p.member, p.label_mode, p.lam, p.row_li[r], p.row_idx[r], p.col_li[c], p.col_lj[c], p.col_idx[c],
                 mask, wp, wn);
}

__device__ __forceinline__ TermAcc shfl_xor(const TermAcc& t, int lane_mask) {
  return TermAcc{__shfl_xor_sync(0xffffffffu, t.m, lane_mask), __shfl_xor_sync(0xffffffffu, t.l, lane_mask),
                 __shfl_xor_sync(0xffffffffu, t.mass, lane_mask), __shfl_xor_sync(0xffffffffu, t.nnz, lane_mask)};
}

template <typename T, int FORM>
__global__ void __launch_bounds__(THREADS) forward_kernel(const PairwiseArgs p) {
  __shared__ float As[BK][TILE + 1], Bs[BK][TILE + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t r0 = (int64_t)blockIdx.x * TILE;
  const SigmaPair sg{p.pos_scale, p.pos_shift, p.neg_scale, p.neg_shift};
  const T* rows = static_cast<const T*>(p.rows);
  const T* cols = static_cast<const T*>(p.cols);
  TermAcc pos[PER], neg[PER];
#pragma unroll
  for (int m = 0; m < PER; ++m) pos[m] = neg[m] = term_empty();

  for (int64_t c0 = 0; c0 < p.V; c0 += TILE) {
    float acc[PER][PER];
    dot_tile(rows, p.R, r0, cols, p.V, c0, p.d, As, Bs, acc);
#pragma unroll
    for (int m = 0; m < PER; ++m) {
      const int64_t r = r0 + ty + 16 * m;
#pragma unroll
      for (int n = 0; n < PER; ++n) {
        const int64_t c = c0 + tx + 16 * n;
        if (r < p.R && c < p.V) {
          float wp, wn;
          weights(p, r, c, wp, wn);
          pair_add<FORM>(sg, p.of, acc[m][n], wp, wn, pos[m], neg[m]);
        }
      }
    }
  }

  // The 16 threads of a row are 16 consecutive lanes: butterfly merge within them.
#pragma unroll
  for (int m = 0; m < PER; ++m) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      term_merge<FORM>(pos[m], shfl_xor(pos[m], off));
      term_merge<FORM>(neg[m], shfl_xor(neg[m], off));
    }
    const int64_t r = r0 + ty + 16 * m;
    if (tx == 0 && r < p.R) {
      p.stats[r] = term_result<FORM>(pos[m]);
      p.stats[p.R + r] = term_result<FORM>(neg[m]);
      p.stats[2 * p.R + r] = pos[m].mass;
      p.stats[3 * p.R + r] = neg[m].mass;
      p.stats[4 * p.R + r] = pos[m].nnz;
      p.stats[5 * p.R + r] = neg[m].nnz;
    }
  }
}

// own_rows: the block owns 64 rows and accumulates grad_rows = dL/ds @ cols over all column tiles;
// otherwise it owns 64 columns and accumulates grad_cols = dL/ds^T @ rows over all row tiles.
template <typename T, int FORM>
__global__ void __launch_bounds__(THREADS, 2) backward_kernel(const PairwiseArgs p, const bool own_rows) {
  __shared__ float As[BK][TILE + 1], Bs[BK][TILE + 1];
  __shared__ float Gs[TILE][TILE + 1];  // dL/ds of the tile, [own][other]
  __shared__ float Os[TILE][TILE + 1];  // a 64 x 64 slice of the other side's embeddings
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const SigmaPair sg{p.pos_scale, p.pos_shift, p.neg_scale, p.neg_shift};
  const T* own = static_cast<const T*>(own_rows ? p.rows : p.cols);
  const T* oth = static_cast<const T*>(own_rows ? p.cols : p.rows);
  const int64_t n_own = own_rows ? p.R : p.V, n_oth = own_rows ? p.V : p.R, d = p.d;
  float* out = own_rows ? p.grad_rows : p.grad_cols;
  const int64_t o0 = (int64_t)blockIdx.x * TILE;

  for (int64_t t0 = 0; t0 < n_oth; t0 += TILE) {
    float acc[PER][PER];
    dot_tile(own, n_own, o0, oth, n_oth, t0, d, As, Bs, acc);
#pragma unroll
    for (int m = 0; m < PER; ++m) {
#pragma unroll
      for (int n = 0; n < PER; ++n) {
        const int64_t o = o0 + ty + 16 * m, t = t0 + tx + 16 * n;
        float g = 0.0f;
        if (o < n_own && t < n_oth) {
          const int64_t r = own_rows ? o : t, c = own_rows ? t : o;
          float wp, wn;
          weights(p, r, c, wp, wn);
          g = pair_grad<FORM>(sg, p.of, acc[m][n], wp, wn, p.stats[r], p.stats[p.R + r], p.grad_pos[r],
                                  p.grad_neg[r]);
        }
        Gs[ty + 16 * m][tx + 16 * n] = g;
      }
    }
    for (int64_t k0 = 0; k0 < d; k0 += TILE) {
      const int lk = threadIdx.x % TILE, lt = threadIdx.x / TILE;
#pragma unroll
      for (int q = 0; q < TILE / (THREADS / TILE); ++q) {
        const int tt = lt + (THREADS / TILE) * q;
        Os[tt][lk] = (t0 + tt < n_oth && k0 + lk < d) ? to_float(oth[(t0 + tt) * d + k0 + lk]) : 0.0f;
      }
      __syncthreads();  // also publishes Gs
      float acc2[PER][PER];
#pragma unroll
      for (int m = 0; m < PER; ++m)
#pragma unroll
        for (int n = 0; n < PER; ++n) acc2[m][n] = 0.0f;
#pragma unroll 4
      for (int tt = 0; tt < TILE; ++tt) {
        float g[PER], e[PER];
#pragma unroll
        for (int m = 0; m < PER; ++m) g[m] = Gs[ty + 16 * m][tt];
#pragma unroll
        for (int n = 0; n < PER; ++n) e[n] = Os[tt][tx + 16 * n];
#pragma unroll
        for (int m = 0; m < PER; ++m)
#pragma unroll
          for (int n = 0; n < PER; ++n) acc2[m][n] = fmaf(g[m], e[n], acc2[m][n]);
      }
      // This block alone owns these output rows: a plain read-modify-write.
#pragma unroll
      for (int m = 0; m < PER; ++m) {
#pragma unroll
        for (int n = 0; n < PER; ++n) {
          const int64_t o = o0 + ty + 16 * m, k = k0 + tx + 16 * n;
          if (o < n_own && k < d) out[o * d + k] += acc2[m][n];
        }
      }
      __syncthreads();  // Os and Gs are rewritten next
    }
  }
}

}  // namespace

template <typename F>
cudaError_t dispatch(const PairwiseArgs& p, F&& f) {
  return dispatch_dtype(p.dtype, [&](auto t) {
    return dispatch_form(p.form, [&](auto form) { return f(t, form); });
  });
}

cudaError_t pairwise_forward(const PairwiseArgs& p, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  return dispatch(p, [&](auto t, auto form) {
    forward_kernel<decltype(t), decltype(form)::value><<<blocks_for(p.R, TILE), THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t pairwise_backward(const PairwiseArgs& p, cudaStream_t stream) {
  if (p.R == 0 || p.V == 0) return cudaSuccess;
  return dispatch(p, [&](auto t, auto form) {
    auto kernel = backward_kernel<decltype(t), decltype(form)::value>;
    kernel<<<blocks_for(p.R, TILE), THREADS, 0, stream>>>(p, true);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    kernel<<<blocks_for(p.V, TILE), THREADS, 0, stream>>>(p, false);
    return cudaGetLastError();
  });
}

}  // namespace mx
