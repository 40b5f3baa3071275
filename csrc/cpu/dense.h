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
// padding, the op runs at::conv2d on the unpacked dense weight. NCHW input does the same when
// the output plane is small (<= 64 pixels) and the batch is not (>= 8): there the stripe engine
// has a single 64-pixel chunk per image and oneDNN's NCHW path is the faster one (density 1,
// 2 threads: 256->256 8x8 b16 0.85x -> 0.92x of the best oneDNN time, 128->128 8x8 b16
// 0.86x -> 0.93x), while at batch 1 unpacking and reordering the weights dominate (512->512
// 7x7 b1: 0.85x stripe vs 0.55x dense). A fixed rule rather than a timing-based choice keeps
// results identical across processes and runs (DDP ranks, resumed training).
// STRIPECONV_CPU_DENSE=never | always overrides it (the kernel tests use never).
constexpr double kDenseDensity = 0.9;

enum class DensePolicy { kAuto, kNever, kAlways };

inline bool prefers_dense_nchw(const Geometry& g) { return g.Ho * g.Wo <= 64 && g.B >= 8; }
DensePolicy dense_policy();

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g);

}  // namespace detail
}  // namespace stripeconv_cpu
