// The three op implementations, templates on the compute dtype (float or double), defined and
// instantiated in forward.cpp, grad_input.cpp and grad_weight.cpp; ops.cpp dispatches to them.
#pragma once
#include <ATen/ATen.h>

#include "common.h"

namespace stripeconv_cpu {
namespace detail {

template <typename T>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& mask, const Geometry& g);

template <typename T>
at::Tensor grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                           const Geometry& g);

template <typename T>
at::Tensor grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& mask, const Geometry& g);

}  // namespace detail
}  // namespace stripeconv_cpu
