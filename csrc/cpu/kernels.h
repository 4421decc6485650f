// The kernels bound by module.cpp (conventions: metrix_kernels/backends/__init__.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace metrix {
std::vector<at::Tensor> pairwise_forward(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                            at::Tensor, at::Tensor, at::Tensor, double, std::vector<double>,
                                            std::vector<double>, int64_t, int64_t, bool, std::optional<at::Tensor>);
std::vector<at::Tensor> pairwise_backward(at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                             at::Tensor, at::Tensor, at::Tensor, at::Tensor, double,
                                             std::vector<double>, std::vector<double>, int64_t, int64_t, bool,
                                             std::optional<at::Tensor>, at::Tensor, at::Tensor,
                                             at::Tensor, bool, std::optional<at::Tensor>);
std::vector<at::Tensor> gram_mixed_forward(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double,
                                              std::vector<double>, std::vector<double>, int64_t, int64_t, bool);
std::vector<at::Tensor> gram_mixed_backward(at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                               at::Tensor, double, std::vector<double>, std::vector<double>,
                                               int64_t, int64_t, bool, at::Tensor, at::Tensor, at::Tensor,
                                               std::vector<at::Tensor>);
std::vector<at::Tensor> mixpool_forward(at::Tensor, at::Tensor, at::Tensor, double, bool);
at::Tensor mixpool_backward(at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, at::Tensor);
std::vector<at::Tensor> unit_rows_forward(at::Tensor);
at::Tensor unit_rows_backward(at::Tensor, at::Tensor, at::Tensor);
std::vector<at::Tensor> assemble_forward(std::vector<at::Tensor>, double, std::vector<double>);
std::vector<at::Tensor> assemble_backward(std::vector<at::Tensor>, double, at::Tensor, at::Tensor, std::vector<double>);
}  // namespace metrix
