// Shared by every CPU kernel file: small helpers, the scratch-buffer pool, the geometry of a call
// with the per-position stripe lists rebuilt from the mask, and the argument checks.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace stripeconv_cpu {
namespace detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == value;
}
// STRIPECONV_CPU_ISA=generic forces the portable micro-kernels (the tests use it).
inline bool force_generic() { return env_is("STRIPECONV_CPU_ISA", "generic"); }

// Scratch buffers for temporaries, reused across calls (see common.cpp).
at::Tensor scratch(at::IntArrayRef sizes, const at::TensorOptions& options);

// ------------------------------------------------------------------------------------------
// Geometry and the stripe lists derived from the mask.

struct Geometry {
  int64_t B = 0, C = 0, H = 0, W = 0, N = 0, kh = 0, kw = 0;
  int64_t sh = 1, sw = 1, pt = 0, pb = 0, pl = 0, pr = 0, dh = 1, dw = 1;
  int64_t G = 1, Cg = 0, Ng = 0, Ho = 0, Wo = 0, S = 0;
  int64_t Hpm = 0, Wpm = 0;  // phase plane extents (== H, W for stride 1)
  int64_t P() const { return kh * kw; }
  bool strided() const { return sh > 1 || sw > 1; }
  int64_t phase_rows(int64_t a) const { return a < H ? ceil_div(H - a, sh) : 0; }
  int64_t phase_cols(int64_t b) const { return b < W ? ceil_div(W - b, sw) : 0; }
};

struct StripeLists {
  std::vector<int64_t> offsets;  // [P + 1]: rows of position p are offsets[p] .. offsets[p+1]
  std::vector<int64_t> filters;  // [S]: filter of every packed row
  std::vector<int64_t> gbegin;   // [P * (G + 1)]: first row of group g at position p
  int64_t group_begin(const Geometry& g, int64_t p, int64_t grp) const { return gbegin[p * (g.G + 1) + grp]; }
};

inline StripeLists build_lists(const at::Tensor& mask, const Geometry& g) {
  StripeLists L;
  const int64_t P = g.P();
  auto m = mask.accessor<bool, 3>();
  L.offsets.assign(P + 1, 0);
  L.gbegin.assign(P * (g.G + 1), 0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t i = p / g.kw, j = p % g.kw;
    L.offsets[p] = static_cast<int64_t>(L.filters.size());
    for (int64_t grp = 0; grp < g.G; ++grp) {
      L.gbegin[p * (g.G + 1) + grp] = static_cast<int64_t>(L.filters.size());
      for (int64_t n = grp * g.Ng; n < (grp + 1) * g.Ng; ++n)
        if (m[n][i][j]) L.filters.push_back(n);
    }
    L.gbegin[p * (g.G + 1) + g.G] = static_cast<int64_t>(L.filters.size());
  }
  L.offsets[P] = static_cast<int64_t>(L.filters.size());
  return L;
}

// Where position p reads its input: phase plane (pa, pb) and the shift inside it.
struct PosGeo {
  int64_t phase;   // pa * sw + pb
  int64_t hin, win;  // valid extent of that phase plane
  int64_t rq, cq;  // output (ho, wo) reads phase plane (ho + rq, wo + cq)
};

inline PosGeo position_geo(const Geometry& g, int64_t p) {
  const int64_t i = p / g.kw, j = p % g.kw;
  const int64_t rs = i * g.dh - g.pt, cs = j * g.dw - g.pl;
  PosGeo q;
  const int64_t pa = rs - floor_div(rs, g.sh) * g.sh, pb = cs - floor_div(cs, g.sw) * g.sw;
  q.phase = pa * g.sw + pb;
  q.hin = g.phase_rows(pa);
  q.win = g.phase_cols(pb);
  q.rq = floor_div(rs, g.sh);
  q.cq = floor_div(cs, g.sw);
  return q;
}

// ------------------------------------------------------------------------------------------
// Argument checks (common.cpp).

std::string shape_str(at::IntArrayRef s);
Geometry check_common(const char* op, at::IntArrayRef in_shape, const at::Tensor& weight, const at::Tensor& mask,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
void check_float_dtype(const char* op, const char* what, const at::Tensor& t);
// bfloat16 and float16 run the float kernels on fp32 copies.
inline bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

}  // namespace detail
}  // namespace stripeconv_cpu
