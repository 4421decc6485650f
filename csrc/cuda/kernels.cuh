// Host-side launchers of the CUDA kernels: plain pointers and a stream, no torch types, so the
// kernels compile with nvcc alone and the torch binding (binding.cpp) with the host compiler.
// Every launcher returns the launch's cudaError_t. Labels and indices are int32; embeddings are
// row-major and contiguous; statistics and gradients are float32.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace mx {

enum DType { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };

// The pair metadata of the contract: per side label_i, label_j, index; mixed_rows says which side
// carries the pair labels (the other is the clean side, whose label_i is z).
struct PairwiseArgs {
  const void* rows;  // [R, d], dtype
  const void* cols;  // [V, d], dtype
  int64_t R, V, d;
  int dtype;
  const int32_t *row_li, *row_lj, *row_idx, *col_li, *col_lj, *col_idx;
  const bool* mask;  // [R, V] when member == MEMBER_MASK
  float lam;
  int member, label_mode, form, of;
  bool mixed_rows;
  float pos_scale, pos_shift, neg_scale, neg_shift;
  float* stats;            // [6, R]
  const float* grad_pos;   // [R] (backward)
  const float* grad_neg;   // [R] (backward)
  float* grad_rows;        // [R, d], zero on entry (backward)
  float* grad_cols;        // [V, d], zero on entry (backward)
};

cudaError_t pairwise_forward(const PairwiseArgs& p, cudaStream_t stream);
cudaError_t pairwise_backward(const PairwiseArgs& p, cudaStream_t stream);

// One chunk of embedding mixup: anchors [a0, a0 + na) against mixing pairs (i, j) with
// i in [i0, i0 + ni) and j in [0, B). P = anchors_chunk @ emb^T [na, B], G = emb_chunk @ emb^T
// [ni, B], both float32, computed by the caller. The caller also groups the i an anchor can mix
// (every member triple (a, i, j) has i in a's group) as two lists: the i of anchor a_loc are
// i_order[k], k in [i_range[a_loc], i_range[na + a_loc]), all in [i0, i0 + ni); the anchors of
// i = i0 + i_loc are a_order[k], k in [a_range[i_loc], a_range[ni + i_loc]), all in [a0, a0 + na).
struct GramArgs {
  const float* P;
  const float* G;
  int64_t A, na, ni, B, a0, i0;  // A: all anchors (the stats' length)
  const int32_t* anchor_label;  // [A]
  const int32_t* anchor_index;  // [A], -1 for proxies
  const int32_t* labels;        // [B]
  const int32_t* i_order;       // [B]: emb indices, grouped
  const int32_t* i_range;       // [2, na]
  const int32_t* a_order;       // [A]: anchor indices, grouped (backward)
  const int32_t* a_range;       // [2, ni] (backward)
  float lam;
  int member, label_mode, form, of;
  float pos_scale, pos_shift, neg_scale, neg_shift;
  float* stats;           // [6, A]: merged into in place; starts as the empty statistics
  float* partial;         // forward scratch: gram_partial_size(na, B) floats
  const float* grad_pos;  // [A] (backward)
  const float* grad_neg;  // [A] (backward)
  float* dP;              // [na, B]: accumulated into (backward)
  float* dG;              // [ni, B]: overwritten (backward)
};

int64_t gram_partial_size(int64_t na, int64_t B);
cudaError_t gram_forward(const GramArgs& g, cudaStream_t stream);
cudaError_t gram_backward(const GramArgs& g, cudaStream_t stream);

// Fused feature mixing + average + max pooling over H*W of m = lam * f_i + (1 - lam) * f_j.
struct MixpoolArgs {
  const void* features;  // [B, C, HW], dtype
  int64_t B, C, HW, M;
  int dtype;
  const int64_t *i, *j;  // [M]
  float lam;
  void* pooled;           // [M, C], dtype (forward)
  int32_t* argmax;        // [M, C]
  const void* grad_pooled;   // [M, C], dtype (backward)
  const int64_t* order;      // [2M]: entries k of cat(i, j), grouped by example (backward)
  const int64_t* offsets;    // [B + 1]: example b owns order[offsets[b] : offsets[b + 1]]
  float* grad_features;      // [B, C, HW] float32, fully written (backward)
};

cudaError_t mixpool_forward(const MixpoolArgs& p, cudaStream_t stream);
cudaError_t mixpool_backward(const MixpoolArgs& p, cudaStream_t stream);

}  // namespace mx
