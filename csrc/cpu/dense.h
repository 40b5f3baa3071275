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
// At density >= kDenseDensity (0.9, where the stripe time, proportional to density, is within
// ~10% of dense) and with symmetric padding, the op may run at::conv2d on the unpacked dense
// weight instead of the stripe kernel. Which is faster depends on the layout and the shape:
//
// NCHW input (2-core AMD EPYC Zen 4, fp32, 3x3 pad 1, density 1): the stripe forward runs at
// 0.88-0.98x the best oneDNN conv and 1.28x faster than oneDNN on NCHW input for 64->64 32x32,
// so NCHW input takes the stripe kernel, except when the output plane is small (<= 64 pixels)
// and the batch is not (>= 8): there the stripe engine has a single 64-pixel chunk per image
// and oneDNN's NCHW path is faster (2 threads: 256->256 8x8 b16 0.85x -> 0.92x of the best
// oneDNN time), while at batch 1 unpacking the weights, which every training step pays (the
// unpacked weight is kept only while weight and mask are unchanged), dominates (512->512 7x7
// b1: 0.85x stripe vs 0.55x dense).
//
// channels_last input (2-core Xeon, AVX-512, density 1, 2 threads, stripe kernel vs hand-over):
// torch's channels_last conv is fast on large planes and slow on small ones (it reorders the
// weight each call, and planes of 4x4 and below leave oneDNN), so the hand-over needs an output
// plane of >= 49 pixels, >= 784 output pixels in the batch and >= 64 M multiply-adds.
// 512->512 4x4 b1 0.78 vs 4.40 ms, b64 24.3 vs 34.9; 256->256 8x8 b1 0.61 vs 1.30, b64 26.8 vs
// 17.9; 64->64 56x56 b1 1.67 vs 0.85 (0.81 vs 0.70 once batch-1 images ran in bands, and 128->128
// 28x28 b1 1.10 vs 0.72); 16->16 32x32 b4 0.19 vs 0.29. Whole VGG-16 (CIFAR, density 1): batch 1
// 28.7 -> 13.1 ms against the hand-over on every layer (dense 10.2 ms).
//
// A fixed rule rather than a timing-based choice keeps results identical across processes and
// runs (DDP ranks, resumed training). STRIPECONV_CPU_DENSE=never | always overrides it (the
// kernel tests use never).
constexpr double kDenseDensity = 0.9;

enum class DensePolicy { kAuto, kNever, kAlways };

inline bool prefers_dense_nchw(const Geometry& g) { return g.Ho * g.Wo <= 64 && g.B >= 8; }
inline bool prefers_dense_channels_last(const Geometry& g) {
  const int64_t pixels = g.B * g.Ho * g.Wo;
  return g.Ho * g.Wo >= 49 && pixels >= 784 && static_cast<double>(pixels) * g.N * g.Cg * g.P() >= 64e6;
}
DensePolicy dense_policy();

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g);

}  // namespace detail
}  // namespace stripeconv_cpu
