// One definition, shared by all ops, of the scratch-buffer pool (a single pool for the whole
// library) and of the argument checks.
#include "common.h"

#include <mutex>
#include <string>
#include <vector>

namespace stripeconv_cpu {
namespace detail {

// ------------------------------------------------------------------------------------------
// Scratch buffers for temporaries (phase planes, layout copies, the dense weight). A fresh
// multi-megabyte allocation comes from mmap and pays a page fault per 4 KB page on first
// touch, which is expensive in a VM (a fresh 2.4 MB weight made a 2.4 ms conv take 4.3 ms).
// A small pool keeps recent buffers; one is reused when nobody else holds its storage.
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (auto v : sizes) n *= v;
  static std::mutex mu;
  static std::vector<at::Tensor> pool;
  constexpr size_t kPoolSize = 6;
  std::lock_guard<std::mutex> lock(mu);
  int best = -1;
  for (size_t i = 0; i < pool.size(); ++i) {
    const at::Tensor& t = pool[i];
    if (t.scalar_type() == options.dtype().toScalarType() && t.numel() >= n && t.storage().use_count() == 1 &&
        (best < 0 || t.numel() < pool[best].numel()))
      best = static_cast<int>(i);
  }
  if (best >= 0) return pool[best].narrow(0, 0, n).view(sizes);
  at::Tensor t = at::empty({n}, options.memory_format(at::MemoryFormat::Contiguous));
  if (t.nbytes() > (size_t(256) << 20)) return t.view(sizes);  // never keep more than 256 MB per buffer
  if (pool.size() < kPoolSize) {
    pool.push_back(t);
  } else {
    for (auto& old : pool)
      if (old.storage().use_count() == 1) {  // replace a free buffer that was too small
        old = t;
        break;
      }
  }
  return t.view(sizes);
}

// ------------------------------------------------------------------------------------------
// Argument checks.

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Geometry check_common(const char* op, at::IntArrayRef in_shape, const at::Tensor& weight, const at::Tensor& mask,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(in_shape.size() == 4, op, ": expected a 4-D input [B, C, H, W], got ", in_shape.size(), "-D shape ",
                    shape_str(in_shape));
  TORCH_CHECK_VALUE(mask.dim() == 3, op, ": stripe_mask must be [out_channels, kh, kw], got shape ",
                    shape_str(mask.sizes()));
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, op, ": stripe_mask must have dtype bool, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device().is_cpu(), op, ": stripe_mask must be a CPU tensor, got device ", mask.device());
  TORCH_CHECK_VALUE(stride.size() == 2, op, ": stride takes 2 values (sh, sw), got ", stride.size());
  TORCH_CHECK_VALUE(dilation.size() == 2, op, ": dilation takes 2 values (dh, dw), got ", dilation.size());
  TORCH_CHECK_VALUE(padding.size() == 4, op, ": padding takes 4 values (top, bottom, left, right), got ",
                    padding.size());
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", shape_str(stride));
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", shape_str(dilation));
  for (auto v : padding) TORCH_CHECK_VALUE(v >= 0, op, ": padding must be >= 0, got ", shape_str(padding));
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);
  for (auto v : in_shape) TORCH_CHECK_VALUE(v >= 0, op, ": input shape must be non-negative, got ", shape_str(in_shape));
  Geometry g;
  g.B = in_shape[0];
  g.C = in_shape[1];
  g.H = in_shape[2];
  g.W = in_shape[3];
  g.N = mask.size(0);
  g.kh = mask.size(1);
  g.kw = mask.size(2);
  g.sh = stride[0];
  g.sw = stride[1];
  g.pt = padding[0];
  g.pb = padding[1];
  g.pl = padding[2];
  g.pr = padding[3];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.G = groups;
  TORCH_CHECK_VALUE(g.C % groups == 0, op, ": in_channels (", g.C, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.N % groups == 0, op, ": out_channels (", g.N, ") must be divisible by groups (", groups, ")");
  g.Cg = g.C / groups;
  g.Ng = g.N / groups;
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": packed weight must be 2-D [num_stripes, in_channels/groups], got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) == g.Cg, op, ": packed weight must be [num_stripes, ", g.Cg, "], got ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got device ", weight.device());
  {
    const at::Tensor mc = mask.contiguous();
    const bool* mp = mc.data_ptr<bool>();
    g.S = 0;
    for (int64_t i = 0; i < mc.numel(); ++i) g.S += mp[i] ? 1 : 0;
  }
  TORCH_CHECK_VALUE(weight.size(0) == g.S, op, ": packed weight has ", weight.size(0),
                    " rows but stripe_mask keeps ", g.S, " stripes");
  const int64_t hnum = g.H + g.pt + g.pb - g.dh * (g.kh - 1) - 1, wnum = g.W + g.pl + g.pr - g.dw * (g.kw - 1) - 1;
  TORCH_CHECK_VALUE(hnum >= 0 && wnum >= 0, op, ": input of spatial size [", g.H, ", ", g.W, "] with padding ",
                          shape_str(padding), " is smaller than the dilated kernel [", g.kh, ", ", g.kw, "] (dilation ",
                          shape_str(dilation), "): no output pixel");
  g.Ho = hnum / g.sh + 1;
  g.Wo = wnum / g.sw + 1;
  g.Hpm = ceil_div(g.H, g.sh);
  g.Wpm = ceil_div(g.W, g.sw);
  return g;
}

void check_float_dtype(const char* op, const char* what, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || is_16bit(t), op, ": ", what,
                    " must be float16, float32, float64 or bfloat16, got ", s);
}

}  // namespace detail
}  // namespace stripeconv_cpu
