// Torch-facing launchers of the CUDA kernels (kernels.cuh) and their torch.library registration:
// torch.ops.stripeconv_cuda.{forward, grad_input, grad_weight}, with the arguments of the op
// contract (stripeconv/ops.py). Included by exactly one translation unit: ops.cu for the CUDA
// build, or a test that compiles it against emulation.h (STRIPECONV_CUDA_EMULATION) to run the
// same launchers and kernels on CPU tensors under another library name.
//
// Activations are made channels_last once per call (the kernels read NHWC); results are
// channels_last and the op converts them to the caller's memory format. Metadata comes from the
// mask on the device, so a call never synchronises with the host.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>

#ifndef STRIPECONV_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include "kernels.cuh"

#ifndef STRIPECONV_CUDA_LIBRARY
#define STRIPECONV_CUDA_LIBRARY stripeconv_cuda
#define STRIPECONV_CUDA_DISPATCH CUDA
#endif

namespace stripeconv_cuda {
namespace {

#ifdef STRIPECONV_CUDA_EMULATION
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
// A small "device", so that test shapes exercise several filter blocks and split-K.
int multiprocessor_count() { return 4; }
int64_t max_shared_bytes() { return 227 * 1024; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, int64_t shared_bytes, Args... args) {
  stripeconv_emu::run_grid(kernel, grid, block, size_t(shared_bytes), args...);
}
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}
int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }
int64_t max_shared_bytes() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, int64_t shared_bytes, Args... args) {
  if (shared_bytes > 48 * 1024) {  // above the default limit a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
  }
  kernel<<<grid, block, size_t(shared_bytes), c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kDouble: return f(TypeTag<double>{});
    case at::kHalf: return f(TypeTag<__half>{});
    case at::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_VALUE(false, "stripeconv_cuda.", op, ": expected float16, bfloat16, float32 or float64 tensors, got ",
                        dtype);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device().type() == kDeviceType, "stripeconv_cuda.", op, ": expected ", name, " on a ", kDeviceType,
                    " device, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), "stripeconv_cuda.", op, ": ", name, " is on ", t.device(),
                    ", expected ", like.device());
}

// Validates the call and returns its geometry (activations NHWC, all groups).
ConvShape make_shape(const char* op, at::IntArrayRef input_shape, const at::Tensor& weight, const at::Tensor& mask,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(input_shape.size() == 4, "stripeconv_cuda.", op, ": expected a 4-D input [B, C, H, W], got ",
                    input_shape);
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 3, "stripeconv_cuda.", op,
                    ": expected a bool stripe mask [N, kh, kw], got ", mask.scalar_type(), " of shape ", mask.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, "stripeconv_cuda.", op,
                    ": stride and dilation take 2 values, padding 4 (top, bottom, left, right)");
  TORCH_CHECK_VALUE(groups >= 1 && input_shape[1] % groups == 0 && mask.size(0) % groups == 0, "stripeconv_cuda.", op,
                    ": channels (", input_shape[1], " in, ", mask.size(0), " out) must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input_shape[1] / groups, "stripeconv_cuda.", op,
                    ": expected a packed weight [S, ", input_shape[1] / groups, "], got ", weight.sizes());
  ConvShape s{};
  s.B = int(input_shape[0]), s.C = int(input_shape[1]), s.H = int(input_shape[2]), s.W = int(input_shape[3]);
  s.N = int(mask.size(0)), s.kh = int(mask.size(1)), s.kw = int(mask.size(2));
  s.sh = int(stride[0]), s.sw = int(stride[1]), s.pt = int(padding[0]), s.pl = int(padding[2]);
  s.dh = int(dilation[0]), s.dw = int(dilation[1]);
  TORCH_CHECK_VALUE(s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && *std::min_element(padding.begin(), padding.end()) >= 0,
                    "stripeconv_cuda.", op, ": stride and dilation must be positive and padding non-negative");
  // The numerators are checked before dividing: C++ division truncates towards zero, so -1 / 2 + 1 == 1.
  const int64_t hnum = input_shape[2] + padding[0] + padding[1] - s.dh * (s.kh - 1) - 1;
  const int64_t wnum = input_shape[3] + padding[2] + padding[3] - s.dw * (s.kw - 1) - 1;
  TORCH_CHECK_VALUE(hnum >= 0 && wnum >= 0, "stripeconv_cuda.", op, ": the padded input ", input_shape,
                          " is smaller than the dilated kernel");
  const int64_t ho = hnum / s.sh + 1, wo = wnum / s.sw + 1;
  s.Ho = int(ho), s.Wo = int(wo);
  s.groups = int(groups), s.Cg = s.C / s.groups, s.Ng = s.N / s.groups;
  s.S = int(weight.size(0));
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;  // pixel and row indices are 32-bit
  TORCH_CHECK(input_shape[0] * input_shape[2] * input_shape[3] <= kMax && input_shape[0] * ho * wo <= kMax &&
                  weight.size(0) <= kMax && int64_t(s.kh) * s.kw * s.groups <= 65535,
              "stripeconv_cuda.", op, ": the call is too large for 32-bit pixel indices");
  return s;
}

// Whether the kernels may copy the channel runs of `tensors` ([..., Cg] rows) in 16-byte pieces:
// a 16-bit type, every run of a group 16-byte aligned.
template <typename T>
bool async_copies(const ConvShape& s, std::initializer_list<const at::Tensor*> tensors) {
  bool ok = async_copyable<T>() && (s.Cg * sizeof(T)) % 16 == 0;
  for (const at::Tensor* t : tensors) ok = ok && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
  return ok;
}

struct RowIndex {
  at::Tensor prefix, row_filter;
};

RowIndex build_rows(const at::Tensor& mask, const ConvShape& s) {
  const at::Tensor m = mask.contiguous();
  const auto opts = mask.options().dtype(at::kInt);
  RowIndex rows{at::empty({s.kh * s.kw, s.N + 1}, opts), at::empty({std::max(s.S, 1)}, opts)};
  launch(build_rows_kernel, dim3(1), dim3(256), int64_t(s.kh) * s.kw * 4, reinterpret_cast<const unsigned char*>(m.data_ptr()),
         s.N, s.kh * s.kw, s.S, rows.prefix.data_ptr<int>(), rows.row_filter.data_ptr<int>());
  return rows;
}

// Filters per forward block: as many as shared memory holds (up to 256, so that two blocks fit
// on an SM), halved while the grid would leave SMs idle.
template <typename T>
int forward_filter_block(const ConvShape& s) {
  const int64_t budget = max_shared_bytes();
  int nb = int(std::min<int64_t>(align_up(s.Ng, 16), 256));
  while (nb > 16 && forward_smem_bytes<T>(nb) > budget) nb -= 16;
  TORCH_CHECK(forward_smem_bytes<T>(nb) <= budget, "stripeconv_cuda.forward: needs ", forward_smem_bytes<T>(nb),
              " bytes of shared memory per block, the device has ", budget);
  const int64_t mtiles = ceil_div(int64_t(s.B) * s.Ho * s.Wo, kTileM), target = 2 * int64_t(multiprocessor_count());
  while (nb > 16 && mtiles * ceil_div(s.Ng, nb) * s.groups < target) nb = int(std::max<int64_t>(16, align_up(nb / 2, 16)));
  return nb;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   int64_t groups) {
  check_tensor("forward", "input", input, input);
  check_tensor("forward", "weight", weight, input);
  check_tensor("forward", "stripe_mask", mask, input);
  TORCH_CHECK_VALUE(weight.scalar_type() == input.scalar_type(), "stripeconv_cuda.forward: weight is ", weight.scalar_type(),
                    ", expected the input's ", input.scalar_type());
  const ConvShape s = make_shape("forward", input.sizes(), weight, mask, stride, padding, dilation, groups);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_tensor("forward", "bias", *bias, input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N && bias->scalar_type() == input.scalar_type(),
                      "stripeconv_cuda.forward: expected a bias [", s.N, "] of ", input.scalar_type(), ", got ",
                      bias->scalar_type(), " ", bias->sizes());
    b = bias->contiguous();
  }
#ifndef STRIPECONV_CUDA_EMULATION
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  at::Tensor y = at::empty({s.B, s.N, s.Ho, s.Wo}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast), w = weight.contiguous();
  const RowIndex rows = build_rows(mask, s);
  dispatch_dtype(input.scalar_type(), "forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int nb = forward_filter_block<T>(s);
    const dim3 grid(unsigned(ceil_div(int64_t(s.B) * s.Ho * s.Wo, kTileM)), unsigned(ceil_div(s.Ng, nb)), unsigned(s.groups));
    launch(forward_kernel<T>, grid, dim3(kThreads), forward_smem_bytes<T>(nb), ptr<T>(x), ptr<T>(w),
           b.defined() ? ptr<T>(b) : static_cast<const T*>(nullptr), ptr<int>(rows.prefix), ptr<int>(rows.row_filter),
           mutable_ptr<T>(y), s, nb, async_copies<T>(s, {&x, &w}));
  });
  return y;
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                      at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  check_tensor("grad_input", "grad_output", grad_output, grad_output);
  check_tensor("grad_input", "weight", weight, grad_output);
  check_tensor("grad_input", "stripe_mask", mask, grad_output);
  TORCH_CHECK_VALUE(weight.scalar_type() == grad_output.scalar_type(), "stripeconv_cuda.grad_input: weight is ",
                    weight.scalar_type(), ", expected grad_output's ", grad_output.scalar_type());
  const ConvShape s = make_shape("grad_input", input_shape, weight, mask, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.B, s.N, s.Ho, s.Wo}), "stripeconv_cuda.grad_input: expected grad_output of shape ",
                    at::IntArrayRef({s.B, s.N, s.Ho, s.Wo}), ", got ", grad_output.sizes());
#ifndef STRIPECONV_CUDA_EMULATION
  const c10::cuda::CUDAGuard guard(grad_output.device());
#endif
  at::Tensor dx = at::empty(input_shape, grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dx.numel() == 0) return dx;
  const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast), w = weight.contiguous();
  const RowIndex rows = build_rows(mask, s);
  const int64_t largest_phase = int64_t(s.B) * ceil_div(s.H, s.sh) * ceil_div(s.W, s.sw);
  const dim3 grid(unsigned(ceil_div(largest_phase, kTileM)), unsigned(ceil_div(s.Cg, kTileN)), unsigned(s.groups * s.sh * s.sw));
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "stripeconv_cuda.grad_input: too many channels, groups or stride phases");
  dispatch_dtype(grad_output.scalar_type(), "grad_input", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(grad_input_kernel<T>, grid, dim3(kThreads), grad_input_smem_bytes<T>(), ptr<T>(dy), ptr<T>(w),
           ptr<int>(rows.prefix), ptr<int>(rows.row_filter), mutable_ptr<T>(dx), s, async_copies<T>(s, {&w}));
  });
  return dx;
}

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  check_tensor("grad_weight", "input", input, input);
  check_tensor("grad_weight", "grad_output", grad_output, input);
  check_tensor("grad_weight", "weight", weight, input);
  check_tensor("grad_weight", "stripe_mask", mask, input);
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type() && weight.scalar_type() == input.scalar_type(),
                    "stripeconv_cuda.grad_weight: expected grad_output, input and weight of one dtype, got ",
                    grad_output.scalar_type(), ", ", input.scalar_type(), ", ", weight.scalar_type());
  const ConvShape s = make_shape("grad_weight", input.sizes(), weight, mask, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.B, s.N, s.Ho, s.Wo}), "stripeconv_cuda.grad_weight: expected grad_output of shape ",
                    at::IntArrayRef({s.B, s.N, s.Ho, s.Wo}), ", got ", grad_output.sizes());
#ifndef STRIPECONV_CUDA_EMULATION
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  at::Tensor gw = at::empty({s.S, s.Cg}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0) return gw;
  const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const RowIndex rows = build_rows(mask, s);
  // Split the pixels until the grid covers the device twice; the splits are summed in order.
  const int64_t M = int64_t(s.B) * s.Ho * s.Wo, ctiles = ceil_div(s.Cg, kTileN);
  const int64_t live_blocks = ceil_div(s.S, kTileM) * ctiles;
  int64_t splits = std::min<int64_t>({ceil_div(2 * int64_t(multiprocessor_count()), live_blocks), ceil_div(M, kTileK), 64,
                                      65535 / ctiles});
  splits = std::max<int64_t>(splits, 1);
  const int64_t pixels_per_split = align_up(ceil_div(M, splits), kTileK);
  splits = ceil_div(M, pixels_per_split);
  const dim3 grid(unsigned(ceil_div(s.Ng, kTileM)), unsigned(s.kh * s.kw * s.groups), unsigned(splits * ctiles));
  dispatch_dtype(input.scalar_type(), "grad_weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename Num<T>::Acc;
    at::Tensor workspace = at::empty({splits, s.S, s.Cg}, input.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    launch(grad_weight_kernel<T>, grid, dim3(kThreads), grad_weight_smem_bytes<T>(), ptr<T>(dy), ptr<T>(x),
           ptr<int>(rows.prefix), ptr<int>(rows.row_filter), mutable_ptr<Acc>(workspace), s, int(splits),
           int(pixels_per_split), async_copies<T>(s, {&x}));
    const int64_t count = int64_t(s.S) * s.Cg;
    launch(reduce_splits_kernel<T>, dim3(unsigned(std::min<int64_t>(ceil_div(count, 256), 8 * int64_t(multiprocessor_count())))),
           dim3(256), 0, ptr<Acc>(workspace), mutable_ptr<T>(gw), count, int(splits));
  });
  return gw;
}

}  // namespace
}  // namespace stripeconv_cuda

#define STRIPECONV_CUDA_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define STRIPECONV_CUDA_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

STRIPECONV_CUDA_LIBRARY_(STRIPECONV_CUDA_LIBRARY, m) {
  m.def("forward(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  m.def("grad_input(Tensor grad_output, Tensor weight, Tensor stripe_mask, int[] input_shape, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("grad_weight(Tensor grad_output, Tensor input, Tensor weight, Tensor stripe_mask, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
}

STRIPECONV_CUDA_LIBRARY_IMPL_(STRIPECONV_CUDA_LIBRARY, STRIPECONV_CUDA_DISPATCH, m) {
  m.impl("forward", &stripeconv_cuda::forward);
  m.impl("grad_input", &stripeconv_cuda::grad_input);
  m.impl("grad_weight", &stripeconv_cuda::grad_weight);
}
