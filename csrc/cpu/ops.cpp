// Op entry points (argument checks, dtype and dense dispatch) and the torch.library registration
// of stripeconv_cpu; the overview below describes the whole CPU backend.
//
// Compiled CPU kernels of stripe_conv2d: torch.ops.stripeconv_cpu.{forward, grad_input, grad_weight}.
//
// The op contract is in stripeconv/ops.py, the packed format in stripeconv/packing.py: packed
// weight rows are the kept stripes ordered by kernel position p = i * kw + j first, filter
// second. The per-position row lists (and their split by group) are rebuilt from the mask here
// on every call (an O(N * kh * kw) scan).
//
// Every op is a sum over kept positions of shifted 1x1 convolutions, with zero wasted work at
// any density:
//   forward      y[n, o]  += sum_c  W[row(n,p), c] * x[c, o + shift_p]   for n in S_p
//   grad input   gx[c, i] += sum_n  W[row(n,p), c] * gy[n, i - shift_p]  for n in S_p
//   grad weight  gW[row(n,p), c] = sum_o gy[n, o] * x[c, o + shift_p]
// (S_p: the filters that keep position p, restricted to one group.)
//
// Layout: NCHW. channels_last tensors are transposed in and out: image by image in the thread's
// cache where whole images per thread allow it, else as whole tensors; small planes (2x2, 4x4)
// run several images side by side to fill the vector lanes (run_acc_engine_staged); NCHW planes
// whose size aliases in L1 (32x32 fp32) are copied image by image into the same padded buffers.
// Grad weight reads x in channels_last and grad_output in place in either layout. Forward and
// grad input run on one engine ("acc", see run_acc_engine): the output plane is cut into chunks of up to 128
// pixels, and for each chunk, each position and each block of up to 6 output channels a
// micro-kernel keeps an accumulator tile of up to 24 vector registers (6 x 64 or 3 x 128 pixels)
// through the whole reduction (vectorised over pixels, weights broadcast, read in place from the
// packed rows) and adds it to the output once. Grad input's flat path reduces over all
// (position, filter) pairs in one call, so few filters per position still make long reductions.
// Grad weight (see grad_weight_impl) is an outer-product GEMM over pixels on channels_last x.
// Near density 1 the forward may hand over to the dense oneDNN conv (see kDenseDensity).
//
// Borders are handled by lane masks, never by a padded copy:
//  * flat path (output row pitch == input row pitch, e.g. stride 1 with "same" padding): the
//    plane is treated as one flat array; the input of output pixel f at position p is
//    f + rq * pitch + cq (a constant shift), so a chunk reads contiguous inputs;
//    lanes whose column wraps or whose row falls outside the image are masked on the load
//    (masked loads never touch memory for masked lanes), or, where every lane of the chunk
//    reads inside the channel plane, loaded and dropped at the store (masked loads cost an FMA
//    port slot). Also fast for small widths (8x8).
//  * row path (any other geometry): each output row is processed as the exact valid segment
//    of every position.
// Stride > 1: the input is split once per call into stride_h * stride_w phase planes (a plain,
// unpadded copy); every position then reads one phase plane with unit stride. Grad input with
// stride > 1 writes gradient phase planes (one engine run per phase, only the positions of that
// phase) and interleaves them into grad_input at the end.
//
// Determinism: every output element is written by exactly one task, and its sum is taken in a
// fixed order (positions in order, then the reduction index in order) whatever the number of
// threads; grad weight tasks own blocks of rows x channels and reduce over pixels in order.
// Threads: at::parallel_for.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "dense.h"
#include "impl.h"
#include "layout.h"

namespace stripeconv_cpu {
namespace {
using namespace detail;

// ------------------------------------------------------------------------------------------
// Op entry points.

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& stripe_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.forward";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected a 4-D input [B, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, ": input must be a CPU tensor, got device ", input.device());
  check_float_dtype(op, "input", input);
  TORCH_CHECK_VALUE(weight.scalar_type() == input.scalar_type(), op, ": weight dtype (", weight.scalar_type(),
                    ") must match input dtype (", input.scalar_type(), ")");
  Geometry g = check_common(op, input.sizes(), weight, stripe_mask, stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.N, op, ": bias must be [", g.N, "], got shape ",
                      shape_str(bias->sizes()));
    TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), op, ": bias dtype (", bias->scalar_type(),
                      ") must match input dtype (", input.scalar_type(), ")");
    TORCH_CHECK_VALUE(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got device ", bias->device());
  }
  if (is_16bit(input)) {  // computed in fp32, rounded once at the end
    c10::optional<at::Tensor> b32;
    if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat);
    return forward_impl<float>(input.to(at::kFloat), weight.to(at::kFloat), b32, stripe_mask, g)
        .to(input.scalar_type());
  }
  auto stripe = [&]() {
    if (input.scalar_type() == at::kDouble) return forward_impl<double>(input, weight, bias, stripe_mask, g);
    return forward_impl<float>(input, weight, bias, stripe_mask, g);
  };
  const DensePolicy policy = dense_policy();
  // at::conv2d takes symmetric padding only and refuses empty planes and empty weights
  const bool nonempty = g.B > 0 && g.H > 0 && g.W > 0 && g.Ho > 0 && g.Wo > 0 && g.Cg > 0 && g.N > 0;
  const bool dense_ok = g.pt == g.pb && g.pl == g.pr && nonempty &&
                        static_cast<double>(g.S) >= kDenseDensity * static_cast<double>(g.N * g.P());
  if (policy == DensePolicy::kNever || !dense_ok) return stripe();
  const bool dense_faster = is_channels_last(input) ? prefers_dense_channels_last(g) : prefers_dense_nchw(g);
  if (policy == DensePolicy::kAlways || dense_faster)
    return dense_forward(input, weight, bias, stripe_mask, g);
  return stripe();
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& stripe_mask,
                      at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.grad_input";
  TORCH_CHECK_VALUE(grad_output.dim() == 4, op, ": expected a 4-D grad_output [B, N, Ho, Wo], got ", grad_output.dim(),
                    "-D");
  TORCH_CHECK_VALUE(grad_output.device().is_cpu(), op, ": grad_output must be a CPU tensor, got device ",
                    grad_output.device());
  check_float_dtype(op, "grad_output", grad_output);
  TORCH_CHECK_VALUE(weight.scalar_type() == grad_output.scalar_type(), op, ": weight dtype (", weight.scalar_type(),
                    ") must match grad_output dtype (", grad_output.scalar_type(), ")");
  Geometry g = check_common(op, input_shape, weight, stripe_mask, stride, padding, dilation, groups);
  const std::vector<int64_t> expect{g.B, g.N, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expect), op, ": grad_output must have shape ",
                    shape_str(expect), " for input_shape ", shape_str(input_shape), ", got ",
                    shape_str(grad_output.sizes()));
  if (is_16bit(grad_output))
    return grad_input_impl<float>(grad_output.to(at::kFloat), weight.to(at::kFloat), stripe_mask, g)
        .to(grad_output.scalar_type());
  if (grad_output.scalar_type() == at::kDouble) return grad_input_impl<double>(grad_output, weight, stripe_mask, g);
  return grad_input_impl<float>(grad_output, weight, stripe_mask, g);
}

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& stripe_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.grad_weight";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected a 4-D input [B, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(grad_output.dim() == 4, op, ": expected a 4-D grad_output [B, N, Ho, Wo], got ", grad_output.dim(),
                    "-D");
  TORCH_CHECK_VALUE(input.device().is_cpu() && grad_output.device().is_cpu(), op,
                    ": input and grad_output must be CPU tensors, got ", input.device(), " and ", grad_output.device());
  check_float_dtype(op, "input", input);
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type() && weight.scalar_type() == input.scalar_type(), op,
                    ": input, grad_output and weight must share a dtype, got ", input.scalar_type(), ", ",
                    grad_output.scalar_type(), " and ", weight.scalar_type());
  Geometry g = check_common(op, input.sizes(), weight, stripe_mask, stride, padding, dilation, groups);
  const std::vector<int64_t> expect{g.B, g.N, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expect), op, ": grad_output must have shape ",
                    shape_str(expect), ", got ", shape_str(grad_output.sizes()));
  if (is_16bit(input))
    return grad_weight_impl<float>(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                                   stripe_mask, g)
        .to(input.scalar_type());
  if (input.scalar_type() == at::kDouble) return grad_weight_impl<double>(grad_output, input, weight, stripe_mask, g);
  return grad_weight_impl<float>(grad_output, input, weight, stripe_mask, g);
}

}  // namespace
}  // namespace stripeconv_cpu

TORCH_LIBRARY(stripeconv_cpu, m) {
  m.def(
      "forward(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
  m.def(
      "grad_input(Tensor grad_output, Tensor weight, Tensor stripe_mask, int[] input_shape, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def(
      "grad_weight(Tensor grad_output, Tensor input, Tensor weight, Tensor stripe_mask, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(stripeconv_cpu, CPU, m) {
  m.impl("forward", &stripeconv_cpu::forward);
  m.impl("grad_input", &stripeconv_cpu::grad_input);
  m.impl("grad_weight", &stripeconv_cpu::grad_weight);
}
