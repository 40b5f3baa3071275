// stripeconv_cpu::conv2d: the forward kernel with its gradients attached by a C++ autograd
// function. It computes exactly what the op contract's stripe_conv2d computes on the cpu backend
// (same kernels, same gradient formulas, same output memory formats); eager StripeConv2d calls
// on CPU use it because the Python op machinery costs ~20 us a call, more than the whole layer at
// batch 1 and low density. torch.compile and the other backends go through stripe_conv2d.
//
// The gradient kernels are differentiable too, so derivatives of any order work (create_graph):
// they are linear in each argument and adjoint to the forward, so their gradients are the three
// ops again (see stripeconv/ops.py for the same formulas on the Python op).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <initializer_list>
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

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static ConvArgs load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
};

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

// Through the dispatcher, so that each call is itself differentiable when grad mode is on.
at::Tensor call_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& mask, const ConvArgs& a) {
  static const auto op = op_handle<ForwardFn>("stripeconv_cpu::conv2d");
  return op.call(input, weight, bias, mask, a.stride, a.padding, a.dilation, a.groups);
}

at::Tensor call_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                           at::IntArrayRef input_size, const ConvArgs& a) {
  static const auto op = op_handle<GradInputFn>("stripeconv_cpu::grad_input");
  return like_grad_output(op.call(grad_output, weight, mask, input_size, a.stride, a.padding, a.dilation, a.groups),
                          grad_output);
}

at::Tensor call_grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& mask, const ConvArgs& a) {
  static const auto op = op_handle<GradWeightFn>("stripeconv_cpu::grad_weight");
  return op.call(grad_output, input, weight, mask, a.stride, a.padding, a.dilation, a.groups).contiguous();
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
    ConvArgs{stride, padding, dilation, groups}.save(ctx);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &mask = saved[2];
    const ConvArgs a = ConvArgs::load(ctx);
    const at::Tensor& grad_output = grad_outputs[0];
    // A first-order backward goes straight to the kernels; under create_graph the calls are recorded.
    c10::optional<at::AutoDispatchBelowADInplaceOrView> kernels_only;
    if (!at::GradMode::is_enabled()) kernels_only.emplace();
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_input = call_grad_input(grad_output, weight, mask, input.sizes(), a);
    if (ctx->needs_input_grad(1)) grad_weight = call_grad_weight(grad_output, input, weight, mask, a);
    if (ctx->needs_input_grad(2)) grad_bias = grad_output.sum({0, 2, 3});
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// grad_input(gy, W): d/d gy = conv2d(g, W), d/d W = grad_weight(gy, g).
class GradInputFunction : public torch::autograd::Function<GradInputFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& weight,
                            const at::Tensor& mask, std::vector<int64_t> input_size, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ConvArgs a{stride, padding, dilation, groups};
    ctx->save_for_backward({grad_output, weight, mask});
    a.save(ctx);
    return call_grad_input(grad_output, weight, mask, input_size, a);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &grad_output = saved[0], &weight = saved[1], &mask = saved[2];
    const ConvArgs a = ConvArgs::load(ctx);
    at::Tensor d_grad_output, d_weight;
    if (ctx->needs_input_grad(0)) d_grad_output = call_conv2d(grads[0], weight, c10::nullopt, mask, a);
    if (ctx->needs_input_grad(1)) d_weight = call_grad_weight(grad_output, grads[0], weight, mask, a);
    return {d_grad_output, d_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// grad_weight(gy, x): d/d gy = conv2d(x, g), d/d x = grad_input(gy, g); the weight gives only the shape.
class GradWeightFunction : public torch::autograd::Function<GradWeightFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& mask, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ConvArgs a{stride, padding, dilation, groups};
    ctx->save_for_backward({grad_output, input, mask});
    a.save(ctx);
    return call_grad_weight(grad_output, input, weight, mask, a);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &grad_output = saved[0], &input = saved[1], &mask = saved[2];
    const ConvArgs a = ConvArgs::load(ctx);
    at::Tensor d_grad_output, d_input;
    if (ctx->needs_input_grad(0)) d_grad_output = call_conv2d(input, grads[0], c10::nullopt, mask, a);
    if (ctx->needs_input_grad(1)) d_input = call_grad_input(grad_output, grads[0], mask, input.sizes(), a);
    return {d_grad_output, d_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether a call has anything for autograd to do: a gradient to record, or a tangent (which the
// Function refuses, as it has no forward-mode formula).
bool needs_autograd(std::initializer_list<const at::Tensor*> tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const at::Tensor* t : tensors)
    if (t->defined() && ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined())) return true;
  return false;
}

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor no_bias;
  if (!needs_autograd({&input, &weight, bias.has_value() ? &*bias : &no_bias})) {
    // Inference: the kernel alone, without an autograd node's bookkeeping (a few us of a small layer's call).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return run_forward(input, weight, bias, mask, stride, padding, dilation, groups);
  }
  return StripeConv2dFunction::apply(input, weight, bias, mask, stride.vec(), padding.vec(), dilation.vec(), groups);
}

at::Tensor grad_input_autograd(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                               at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  return GradInputFunction::apply(grad_output, weight, mask, input_size.vec(), stride.vec(), padding.vec(),
                                  dilation.vec(), groups);
}

at::Tensor grad_weight_autograd(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  return GradWeightFunction::apply(grad_output, input, weight, mask, stride.vec(), padding.vec(), dilation.vec(),
                                   groups);
}

}  // namespace
}  // namespace stripeconv_cpu

TORCH_LIBRARY_FRAGMENT(stripeconv_cpu, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(stripeconv_cpu, CPU, m) { m.impl("conv2d", &stripeconv_cpu::run_forward); }

// The raw forward kernel has no derivative (conv2d is its differentiable form): its result raises
// when differentiated instead of being silently treated as a constant.
TORCH_LIBRARY_IMPL(stripeconv_cpu, Autograd, m) {
  m.impl("conv2d", &stripeconv_cpu::conv2d_autograd);
  m.impl("forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("grad_input", &stripeconv_cpu::grad_input_autograd);
  m.impl("grad_weight", &stripeconv_cpu::grad_weight_autograd);
}
