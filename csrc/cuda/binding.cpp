// Torch binding of the CUDA kernels (module metrix_kernels._cuda). Thin on purpose: it checks
// tensors and forwards pointers; chunking, matmuls and dtype handling live in
// metrix_kernels/backends/cuda.py, where the host tests exercise them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "kernels.cuh"
#include "pair_math.cuh"  // the enum codes

namespace {

using torch::Tensor;

void check(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mx::DTYPE_F32;
    case at::kHalf: return mx::DTYPE_F16;
    case at::kBFloat16: return mx::DTYPE_BF16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void ok(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "metrix CUDA kernel: ", cudaGetErrorString(err)); }

mx::PairwiseArgs pairwise_args(const Tensor& rows, const Tensor& cols, const Tensor& row_li, const Tensor& row_lj,
                               const Tensor& row_idx, const Tensor& col_li, const Tensor& col_lj,
                               const Tensor& col_idx, const c10::optional<Tensor>& mask, const Tensor& stats,
                               double lam, int64_t member, int64_t label_mode, int64_t form, int64_t of,
                               bool mixed_rows, double pos_scale, double pos_shift, double neg_scale,
                               double neg_shift) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1), "rows [R, d], cols [V, d]");
  check(rows, "rows", rows.scalar_type());
  check(cols, "cols", rows.scalar_type());
  const int64_t R = rows.size(0), V = cols.size(0);
  for (const Tensor* t : {&row_li, &row_lj, &row_idx}) {
    check(*t, "row labels", at::kInt);
    TORCH_CHECK(t->numel() == R, "row labels must have R entries");
  }
  for (const Tensor* t : {&col_li, &col_lj, &col_idx}) {
    check(*t, "column labels", at::kInt);
    TORCH_CHECK(t->numel() == V, "column labels must have V entries");
  }
  check(stats, "stats", at::kFloat);
  TORCH_CHECK(stats.numel() == 6 * R, "stats must be [6, R]");
  const bool* mask_ptr = nullptr;
  if (member == mx::MEMBER_MASK) {
    TORCH_CHECK(mask.has_value(), "member_mask required");
    check(*mask, "member_mask", at::kBool);
    TORCH_CHECK(mask->numel() == R * V, "member_mask must be [R, V]");
    mask_ptr = mask->data_ptr<bool>();
  }
  mx::PairwiseArgs p{};
  p.rows = rows.data_ptr();
  p.cols = cols.data_ptr();
  p.R = R;
  p.V = V;
  p.d = rows.size(1);
  p.dtype = dtype_code(rows);
  p.row_li = row_li.data_ptr<int32_t>();
  p.row_lj = row_lj.data_ptr<int32_t>();
  p.row_idx = row_idx.data_ptr<int32_t>();
  p.col_li = col_li.data_ptr<int32_t>();
  p.col_lj = col_lj.data_ptr<int32_t>();
  p.col_idx = col_idx.data_ptr<int32_t>();
  p.mask = mask_ptr;
  p.lam = (float)lam;
  p.member = (int)member;
  p.label_mode = (int)label_mode;
  p.form = (int)form;
  p.of = (int)of;
  p.mixed_rows = mixed_rows;
  p.pos_scale = (float)pos_scale;
  p.pos_shift = (float)pos_shift;
  p.neg_scale = (float)neg_scale;
  p.neg_shift = (float)neg_shift;
  p.stats = stats.data_ptr<float>();
  return p;
}

void pairwise_forward(const Tensor& rows, const Tensor& cols, const Tensor& row_li, const Tensor& row_lj,
                      const Tensor& row_idx, const Tensor& col_li, const Tensor& col_lj, const Tensor& col_idx,
                      const c10::optional<Tensor>& mask, const Tensor& stats, double lam, int64_t member,
                      int64_t label_mode, int64_t form, int64_t of, bool mixed_rows, double pos_scale,
                      double pos_shift, double neg_scale, double neg_shift) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto p = pairwise_args(rows, cols, row_li, row_lj, row_idx, col_li, col_lj, col_idx, mask, stats, lam, member,
                               label_mode, form, of, mixed_rows, pos_scale, pos_shift, neg_scale, neg_shift);
  ok(mx::pairwise_forward(p, c10::cuda::getCurrentCUDAStream()));
}

void pairwise_backward(const Tensor& rows, const Tensor& cols, const Tensor& row_li, const Tensor& row_lj,
                       const Tensor& row_idx, const Tensor& col_li, const Tensor& col_lj, const Tensor& col_idx,
                       const c10::optional<Tensor>& mask, const Tensor& stats, double lam, int64_t member,
                       int64_t label_mode, int64_t form, int64_t of, bool mixed_rows, double pos_scale,
                       double pos_shift, double neg_scale, double neg_shift, const Tensor& grad_pos,
                       const Tensor& grad_neg, const Tensor& grad_rows, const Tensor& grad_cols) {
  const c10::cuda::CUDAGuard guard(rows.device());
  auto p = pairwise_args(rows, cols, row_li, row_lj, row_idx, col_li, col_lj, col_idx, mask, stats, lam, member,
                         label_mode, form, of, mixed_rows, pos_scale, pos_shift, neg_scale, neg_shift);
  for (const Tensor* t : {&grad_pos, &grad_neg}) {
    check(*t, "term gradients", at::kFloat);
    TORCH_CHECK(t->numel() == p.R, "term gradients must be [R]");
  }
  check(grad_rows, "grad_rows", at::kFloat);
  check(grad_cols, "grad_cols", at::kFloat);
  TORCH_CHECK(grad_rows.numel() == p.R * p.d && grad_cols.numel() == p.V * p.d, "gradient buffers [R, d], [V, d]");
  p.grad_pos = grad_pos.data_ptr<float>();
  p.grad_neg = grad_neg.data_ptr<float>();
  p.grad_rows = grad_rows.data_ptr<float>();
  p.grad_cols = grad_cols.data_ptr<float>();
  ok(mx::pairwise_backward(p, c10::cuda::getCurrentCUDAStream()));
}

mx::GramArgs gram_args(const Tensor& P, const Tensor& G, int64_t a0, int64_t i0, const Tensor& anchor_label,
                       const Tensor& anchor_index, const Tensor& labels, const Tensor& i_order,
                       const Tensor& i_range, const Tensor& stats, double lam, int64_t member, int64_t label_mode,
                       int64_t form, int64_t of, double pos_scale, double pos_shift, double neg_scale,
                       double neg_shift) {
  check(P, "P", at::kFloat);
  check(G, "G", at::kFloat);
  check(anchor_label, "anchor_label", at::kInt);
  check(anchor_index, "anchor_index", at::kInt);
  check(labels, "labels", at::kInt);
  check(i_order, "i_order", at::kInt);
  check(i_range, "i_range", at::kInt);
  check(stats, "stats", at::kFloat);
  TORCH_CHECK(P.dim() == 2 && G.dim() == 2 && P.size(1) == G.size(1), "P [na, B], G [ni, B]");
  const int64_t A = anchor_label.numel(), B = labels.numel();
  TORCH_CHECK(anchor_index.numel() == A && stats.numel() == 6 * A, "anchor arrays [A], stats [6, A]");
  TORCH_CHECK(P.size(1) == B && a0 >= 0 && a0 + P.size(0) <= A && i0 >= 0 && i0 + G.size(0) <= B, "chunk bounds");
  TORCH_CHECK(i_order.numel() == B && i_range.numel() == 2 * P.size(0), "i_order [B], i_range [2, na]");
  mx::GramArgs g{};
  g.P = P.data_ptr<float>();
  g.G = G.data_ptr<float>();
  g.A = A;
  g.na = P.size(0);
  g.ni = G.size(0);
  g.B = B;
  g.a0 = a0;
  g.i0 = i0;
  g.anchor_label = anchor_label.data_ptr<int32_t>();
  g.anchor_index = anchor_index.data_ptr<int32_t>();
  g.labels = labels.data_ptr<int32_t>();
  g.i_order = i_order.data_ptr<int32_t>();
  g.i_range = i_range.data_ptr<int32_t>();
  g.lam = (float)lam;
  g.member = (int)member;
  g.label_mode = (int)label_mode;
  g.form = (int)form;
  g.of = (int)of;
  g.pos_scale = (float)pos_scale;
  g.pos_shift = (float)pos_shift;
  g.neg_scale = (float)neg_scale;
  g.neg_shift = (float)neg_shift;
  g.stats = stats.data_ptr<float>();
  return g;
}

void gram_forward(const Tensor& P, const Tensor& G, int64_t a0, int64_t i0, const Tensor& anchor_label,
                  const Tensor& anchor_index, const Tensor& labels, const Tensor& i_order, const Tensor& i_range,
                  const Tensor& stats, double lam, int64_t member, int64_t label_mode, int64_t form, int64_t of,
                  double pos_scale, double pos_shift, double neg_scale, double neg_shift) {
  const c10::cuda::CUDAGuard guard(P.device());
  auto g = gram_args(P, G, a0, i0, anchor_label, anchor_index, labels, i_order, i_range, stats, lam, member,
                     label_mode, form, of, pos_scale, pos_shift, neg_scale, neg_shift);
  Tensor partial = torch::empty({mx::gram_partial_size(g.na, g.B)}, P.options());
  g.partial = partial.data_ptr<float>();
  ok(mx::gram_forward(g, c10::cuda::getCurrentCUDAStream()));
}

void gram_backward(const Tensor& P, const Tensor& G, int64_t a0, int64_t i0, const Tensor& anchor_label,
                   const Tensor& anchor_index, const Tensor& labels, const Tensor& i_order, const Tensor& i_range,
                   const Tensor& a_order, const Tensor& a_range, const Tensor& stats, double lam, int64_t member,
                   int64_t label_mode, int64_t form, int64_t of, double pos_scale, double pos_shift,
                   double neg_scale, double neg_shift, const Tensor& grad_pos, const Tensor& grad_neg,
                   const Tensor& dP, const Tensor& dG) {
  const c10::cuda::CUDAGuard guard(P.device());
  auto g = gram_args(P, G, a0, i0, anchor_label, anchor_index, labels, i_order, i_range, stats, lam, member,
                     label_mode, form, of, pos_scale, pos_shift, neg_scale, neg_shift);
  check(a_order, "a_order", at::kInt);
  check(a_range, "a_range", at::kInt);
  TORCH_CHECK(a_order.numel() == g.A && a_range.numel() == 2 * g.ni, "a_order [A], a_range [2, ni]");
  g.a_order = a_order.data_ptr<int32_t>();
  g.a_range = a_range.data_ptr<int32_t>();
  check(grad_pos, "grad_pos", at::kFloat);
  check(grad_neg, "grad_neg", at::kFloat);
  check(dP, "dP", at::kFloat);
  check(dG, "dG", at::kFloat);
  TORCH_CHECK(grad_pos.numel() == g.A && grad_neg.numel() == g.A, "term gradients must be [A]");
  TORCH_CHECK(dP.sizes() == P.sizes() && dG.sizes() == G.sizes(), "dP like P, dG like G");
  g.grad_pos = grad_pos.data_ptr<float>();
  g.grad_neg = grad_neg.data_ptr<float>();
  g.dP = dP.data_ptr<float>();
  g.dG = dG.data_ptr<float>();
  ok(mx::gram_backward(g, c10::cuda::getCurrentCUDAStream()));
}

mx::MixpoolArgs mixpool_args(const Tensor& features, const Tensor& i, const Tensor& j, double lam,
                             const Tensor& argmax) {
  check(features, "features", features.scalar_type());
  TORCH_CHECK(features.dim() == 4, "features [B, C, H, W]");
  check(i, "i", at::kLong);
  check(j, "j", at::kLong);
  check(argmax, "argmax", at::kInt);
  mx::MixpoolArgs p{};
  p.features = features.data_ptr();
  p.B = features.size(0);
  p.C = features.size(1);
  p.HW = features.size(2) * features.size(3);
  p.M = i.numel();
  TORCH_CHECK(p.HW > 0 && j.numel() == p.M && argmax.numel() == p.M * p.C, "shapes");
  p.dtype = dtype_code(features);
  p.i = i.data_ptr<int64_t>();
  p.j = j.data_ptr<int64_t>();
  p.lam = (float)lam;
  p.argmax = argmax.data_ptr<int32_t>();
  return p;
}

void mixpool_forward(const Tensor& features, const Tensor& i, const Tensor& j, double lam, const Tensor& pooled,
                     const Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(features.device());
  auto p = mixpool_args(features, i, j, lam, argmax);
  check(pooled, "pooled", features.scalar_type());
  TORCH_CHECK(pooled.numel() == p.M * p.C, "pooled [M, C]");
  p.pooled = pooled.data_ptr();
  ok(mx::mixpool_forward(p, c10::cuda::getCurrentCUDAStream()));
}

void mixpool_backward(const Tensor& grad_pooled, const Tensor& features, const Tensor& i, const Tensor& j,
                      double lam, const Tensor& argmax, const Tensor& order, const Tensor& offsets,
                      const Tensor& grad_features) {
  const c10::cuda::CUDAGuard guard(features.device());
  auto p = mixpool_args(features, i, j, lam, argmax);
  check(grad_pooled, "grad_pooled", features.scalar_type());
  check(order, "order", at::kLong);
  check(offsets, "offsets", at::kLong);
  check(grad_features, "grad_features", at::kFloat);
  TORCH_CHECK(grad_pooled.numel() == p.M * p.C && order.numel() == 2 * p.M && offsets.numel() == p.B + 1 &&
                  grad_features.numel() == features.numel(),
              "shapes");
  p.grad_pooled = grad_pooled.data_ptr();
  p.order = order.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.grad_features = grad_features.data_ptr<float>();
  ok(mx::mixpool_backward(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metrix-kernels CUDA kernels (see metrix_kernels/backends/cuda.py)";
  // the torch it was built against: backends/cuda.py refuses the extension under another one
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  m.def("pairwise_forward", &pairwise_forward);
  m.def("pairwise_backward", &pairwise_backward);
  m.def("gram_forward", &gram_forward);
  m.def("gram_backward", &gram_backward);
  m.def("mixpool_forward", &mixpool_forward);
  m.def("mixpool_backward", &mixpool_backward);
}
