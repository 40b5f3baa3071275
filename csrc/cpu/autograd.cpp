// stripeconv_cpu::conv2d: the forward kernel with its gradients attached by a C++ autograd
// function. It computes exactly what the op contract's stripe_conv2d computes on the cpu backend
// (same kernels, same gradient formulas, same output memory formats); eager StripeConv2d calls
// on CPU use it because the Python op machinery costs ~20 us a call, more than the whole layer at
// batch 1 and low density. torch.compile and the other backends go through stripe_conv2d.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <vector>

namespace stripeconv_cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using GradInputFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using GradWeightFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor run_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  static const auto op = op_handle<ForwardFn>("stripeconv_cpu::forward");
  return op.call(input, weight, bias, mask, stride, padding, dilation, groups);
}

// The contract's rule: a gradient w.r.t. the input follows grad_output's memory format.
at::Tensor like_grad_output(const at::Tensor& t, const at::Tensor& grad_output) {
  const bool nhwc = grad_output.dim() == 4 && !grad_output.is_contiguous() &&
                    grad_output.is_contiguous(at::MemoryFormat::ChannelsLast);
  return t.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

class StripeConv2dFunction : public torch::autograd::Function<StripeConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = run_forward(input, weight, bias, mask, stride, padding, dilation, groups);
    ctx->save_for_backward({input, weight, mask});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto grad_input_op = op_handle<GradInputFn>("stripeconv_cpu::grad_input");
    static const auto grad_weight_op = op_handle<GradWeightFn>("stripeconv_cpu::grad_weight");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &mask = saved[2];
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const at::Tensor& grad_output = grad_outputs[0];
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0))
      grad_input = like_grad_output(
          grad_input_op.call(grad_output, weight, mask, input.sizes(), stride, padding, dilation, groups),
          grad_output);
    if (ctx->needs_input_grad(1))
      grad_weight = grad_weight_op.call(grad_output, input, weight, mask, stride, padding, dilation, groups)
                        .contiguous();
    if (ctx->needs_input_grad(2)) grad_bias = grad_output.sum({0, 2, 3});
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  return StripeConv2dFunction::apply(input, weight, bias, mask, stride.vec(), padding.vec(), dilation.vec(), groups);
}

}  // namespace
}  // namespace stripeconv_cpu

TORCH_LIBRARY_FRAGMENT(stripeconv_cpu, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(stripeconv_cpu, CPU, m) { m.impl("conv2d", &stripeconv_cpu::run_forward); }

// The kernels themselves have no derivative: called with inputs that require grad (directly, or
// by conv2d's backward under create_graph=True), their results raise when differentiated instead
// of being silently treated as constants.
TORCH_LIBRARY_IMPL(stripeconv_cpu, Autograd, m) {
  m.impl("conv2d", &stripeconv_cpu::conv2d_autograd);
  m.impl("forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("grad_input", torch::autograd::autogradNotImplementedFallback());
  m.impl("grad_weight", torch::autograd::autogradNotImplementedFallback());
}
