// The dense forward of the near-density-1 hand-over: the packed rows scattered into a dense
// [N, Cg, kh, kw] weight (kept for the next call while weight and mask are unchanged), then
// at::conv2d; and the policy's environment override.
#include "dense.h"

#include <ATen/Parallel.h>

#include <list>
#include <mutex>
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
void dense_weight_impl(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g, at::Tensor& d) {
  const StripeLists L = build_lists(mask, g);
  std::vector<int64_t> row_of(g.N * g.P(), -1);  // packed row of (filter, position)
  for (int64_t p = 0; p < g.P(); ++p)
    for (int64_t row = L.offsets[p]; row < L.offsets[p + 1]; ++row) row_of[L.filters[row] * g.P() + p] = row;
  at::Tensor w = weight.contiguous();
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
}

// ------------------------------------------------------------------------------------------
// Unpacked weights of recent hand-overs. At inference the weight and mask do not change between
// calls, and unpacking cost more than the conv itself on small planes (512->512 4x4, batch 1,
// 2 threads: 1.5 ms of unpacking for a 0.6 ms conv). An entry matches only the same tensors
// (TensorImpl identity, held weakly so the address cannot be reused while the entry exists) at
// the same version counter, data pointer, shape and strides: an in-place update (optimizer step,
// masked_fill_ of the mask) or a `.data` swap makes a new entry. Bounded by entry count and
// bytes (STRIPECONV_CPU_DENSE_CACHE_MB, default 256; 0 turns the cache off), least recently
// used first out.

struct TensorStamp {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  const void* data;
  int64_t version;
  std::vector<int64_t> sizes, strides;

  explicit TensorStamp(const at::Tensor& t)
      : impl(t.getIntrusivePtr()), data(t.data_ptr()), version(static_cast<int64_t>(t._version())),
        sizes(t.sizes().vec()), strides(t.strides().vec()) {}
  bool alive() const { return !impl.expired(); }
  bool same_tensor(const at::Tensor& t) const {
    return alive() && impl._unsafe_get_target() == t.unsafeGetTensorImpl();
  }
  bool matches(const at::Tensor& t) const {
    return same_tensor(t) && data == t.data_ptr() && version == static_cast<int64_t>(t._version()) &&
           t.sizes() == at::IntArrayRef(sizes) && t.strides() == at::IntArrayRef(strides);
  }
};

struct CachedDense {
  TensorStamp weight, mask;
  at::Tensor dense;
};

int64_t cache_budget_bytes() {
  const char* e = std::getenv("STRIPECONV_CPU_DENSE_CACHE_MB");
  const int64_t mb = e != nullptr ? std::atoll(e) : 256;
  return mb > 0 ? mb << 20 : 0;
}

at::Tensor cached_dense_weight(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g) {
  static std::mutex mu;
  // most recently used first; never destroyed, so no tensor is freed during static destruction at exit
  static auto& cache = *new std::list<CachedDense>();
  constexpr size_t kMaxEntries = 512;
  const std::vector<int64_t> dense_sizes{g.N, g.Cg, g.kh, g.kw};
  const int64_t bytes_needed = g.N * g.Cg * g.P() * static_cast<int64_t>(weight.element_size());
  const int64_t budget = cache_budget_bytes();
  // inference tensors keep no version counter, so a change to them could not be seen
  const bool cacheable = bytes_needed <= budget && !weight.is_inference() && !mask.is_inference();
  const auto same_kind = [&](const at::Tensor& d) {
    return d.sizes() == at::IntArrayRef(dense_sizes) && d.scalar_type() == weight.scalar_type();
  };
  at::Tensor d;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (!it->weight.same_tensor(weight)) continue;
      if (it->weight.matches(weight) && it->mask.matches(mask) && same_kind(it->dense)) {
        cache.splice(cache.begin(), cache, it);
        return it->dense;
      }
      // the weight changed (a training step): rewrite its buffer unless a caller still holds it,
      // rather than pay a fresh multi-MB allocation every step
      if (same_kind(it->dense) && it->dense.use_count() == 1 && it->dense.storage().use_count() == 1)
        d = std::move(it->dense);
      cache.erase(it);
      break;
    }
  }
  if (!d.defined())
    d = cacheable ? at::empty(dense_sizes, weight.options().memory_format(at::MemoryFormat::Contiguous))
                  : scratch(dense_sizes, weight.options());
  if (weight.scalar_type() == at::kDouble)
    dense_weight_impl<double>(weight, mask, g, d);
  else
    dense_weight_impl<float>(weight, mask, g, d);
  if (!cacheable) return d;
  std::lock_guard<std::mutex> lock(mu);
  cache.push_front(CachedDense{TensorStamp(weight), TensorStamp(mask), d});
  int64_t bytes = 0;
  size_t entries = 0;
  for (auto it = cache.begin(); it != cache.end();) {
    const int64_t size = static_cast<int64_t>(it->dense.nbytes());
    if (it->weight.alive() && it->mask.alive() && entries < kMaxEntries && bytes + size <= budget) {
      bytes += size;
      ++entries;
      ++it;
    } else {
      it = cache.erase(it);
    }
  }
  return d;
}

at::Tensor dense_weight(const at::Tensor& weight, const at::Tensor& mask, const Geometry& g) {
  // A 1x1 conv that keeps every filter: its packed rows are the dense weight (exported 1x1 convs
  // always are; a copy would cost small layers a quarter of their time).
  if (g.P() == 1 && g.S == g.N) return weight.contiguous().view({g.N, g.Cg, 1, 1});
  return cached_dense_weight(weight, mask, g);
}

}  // namespace

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g) {
  return at::conv2d(input, dense_weight(weight, mask, g), bias, {g.sh, g.sw}, {g.pt, g.pl}, {g.dh, g.dw}, g.G);
}

}  // namespace detail
}  // namespace stripeconv_cpu
