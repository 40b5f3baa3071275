// The dense forward of the near-density-1 hand-over: the packed rows scattered into a dense
// [N, Cg, kh, kw] weight, then at::conv2d; and the policy's environment override.
#include "dense.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common.h"

namespace stripeconv_cpu {
namespace detail {

DensePolicy dense_policy() {
  if (env_is("STRIPECONV_CPU_DENSE", "never")) return DensePolicy::kNever;
  if (env_is("STRIPECONV_CPU_DENSE", "always")) return DensePolicy::kAlways;
  return DensePolicy::kAuto;
}

namespace {

template <typename T>
at::Tensor dense_weight_impl(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g) {
  const StripeLists L = build_lists(mask, g);
  std::vector<int64_t> row_of(g.N * g.P(), -1);  // packed row of (filter, position)
  for (int64_t p = 0; p < g.P(); ++p)
    for (int64_t row = L.offsets[p]; row < L.offsets[p + 1]; ++row) row_of[L.filters[row] * g.P() + p] = row;
  at::Tensor w = weight.contiguous();
  at::Tensor d = scratch({g.N, g.Cg, g.kh, g.kw}, weight.options());
  const T* src = w.data_ptr<T>();
  T* dst = d.data_ptr<T>();
  const int64_t P = g.P(), Cg = g.Cg;
  const std::vector<T> zero_row(static_cast<size_t>(Cg), T(0));
  at::parallel_for(0, g.N, 4, [&](int64_t n0, int64_t n1) {
    std::vector<const T*> rows(static_cast<size_t>(P));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t p = 0; p < P; ++p) {
        const int64_t row = row_of[n * P + p];
        rows[p] = row < 0 ? zero_row.data() : src + row * Cg;
      }
      T* d = dst + n * Cg * P;  // dense[n] = [Cg][P], the transpose of the [P][Cg] rows
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t p = 0; p < P; ++p) d[c * P + p] = rows[p][c];
    }
  });
  return d;
}

at::Tensor dense_weight(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g) {
  // A 1x1 conv that keeps every filter: its packed rows are the dense weight (exported 1x1 convs
  // always are; a copy would cost small layers a quarter of their time).
  if (g.P() == 1 && g.S == g.N) return weight.contiguous().view({g.N, g.Cg, 1, 1});
  if (weight.scalar_type() == at::kDouble) return dense_weight_impl<double>(weight, mask, g);
  return dense_weight_impl<float>(weight, mask, g);
}

}  // namespace

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g) {
  return at::conv2d(input, dense_weight(weight, mask, g), bias, {g.sh, g.sw}, {g.pt, g.pl}, {g.dh, g.dw}, g.G);
}

}  // namespace detail
}  // namespace stripeconv_cpu
