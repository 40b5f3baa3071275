// When the forward hands over to the dense oneDNN conv (near density 1), and that dense forward
// (dense.cpp).
#pragma once
#include <ATen/ATen.h>

#include "common.h"

namespace stripeconv_cpu {
namespace detail {

// ------------------------------------------------------------------------------------------
// Dense dispatch near density 1.
//
// Measured on the 2-core AMD EPYC (Zen 4) dev box, fp32, 3x3 pad 1, density 1, 1 thread: on
// NCHW input the stripe forward runs at 0.88-0.98x the best oneDNN conv (NCHW or channels_last,
// whichever is faster; 256->256 8x8: 0.88x, 128->128 16x16: 0.98x, 64->64 32x32: 0.91x) and is
// 1.28x faster than oneDNN on NCHW input for 64->64 32x32, so NCHW input always takes the
// stripe kernel. On channels_last input the stripe kernel pays two layout transposes on top,
// while oneDNN's channels_last path is its fastest: there, at density >= kDenseDensity (0.9,
// where the stripe time, proportional to density, is within ~10% of dense), with symmetric
// padding, the op runs at::conv2d on the unpacked dense weight. A fixed rule rather than a
// timing-based choice keeps results identical across processes (e.g. DDP ranks).
// STRIPECONV_CPU_DENSE=never | always overrides it (the kernel tests use never).
constexpr double kDenseDensity = 0.9;

enum class DensePolicy { kAuto, kNever, kAlways };
DensePolicy dense_policy();

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g);

}  // namespace detail
}  // namespace stripeconv_cpu
