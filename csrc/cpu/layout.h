// Layout copies around the kernels: stride phase planes (NCHW for the engine, NHWC for grad
// weight) and fast blocked transposes between NCHW and channels_last.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "microkernels.h"

namespace stripeconv_cpu {
namespace detail {

// ------------------------------------------------------------------------------------------
// Phase planes for stride > 1: buf[phase][b][c][Hpm][Wpm] = x[b, c, pa + sh*r, pb + sw*q].

template <typename T>
at::Tensor split_phases(const at::Tensor& x, const Geometry& g) {
  at::Tensor buf = scratch({g.sh * g.sw, g.B, g.C, g.Hpm, g.Wpm}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = buf.data_ptr<T>();
  const int64_t nplanes = g.B * g.C, plane_in = g.H * g.W, plane_ph = g.Hpm * g.Wpm;
  if (g.sw == 2) {
    // Each input row split into its two phase rows at once: a loop the compiler vectorises (the
    // strided copy below took as long as a stride-2 conv's arithmetic: 16->32 32x32 b64 d0.5).
    at::parallel_for(0, g.sh * nplanes, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t pa = t / nplanes, bc = t % nplanes, hp = g.phase_rows(pa);
        const int64_t even = g.phase_cols(0), odd = g.phase_cols(1);
        const T* s = src + bc * plane_in + pa * g.W;
        T* d0 = dst + (2 * pa * nplanes + bc) * plane_ph;
        T* d1 = d0 + nplanes * plane_ph;
        for (int64_t r = 0; r < hp; ++r, s += g.sh * g.W, d0 += g.Wpm, d1 += g.Wpm) {
          for (int64_t q = 0; q < odd; ++q) {
            d0[q] = s[2 * q];
            d1[q] = s[2 * q + 1];
          }
          if (even > odd) d0[odd] = s[2 * odd];
        }
      }
    });
    return buf;
  }
  at::parallel_for(0, g.sh * g.sw * nplanes, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ph = t / nplanes, bc = t % nplanes, pa = ph / g.sw, pb = ph % g.sw;
      const int64_t hp = g.phase_rows(pa), wp = g.phase_cols(pb);
      const T* s = src + bc * plane_in;
      T* d = dst + t * plane_ph;
      for (int64_t r = 0; r < hp; ++r)
        for (int64_t q = 0; q < wp; ++q) d[r * g.Wpm + q] = s[(pa + r * g.sh) * g.W + pb + q * g.sw];
    }
  });
  return buf;
}

// ------------------------------------------------------------------------------------------
// Layout changes. ATen's generic permute copy is slow for these shapes (NCHW -> channels_last
// of a 16x64x32x32 fp32 tensor: 2.8 ms on one Zen 4 core, 28x a plain copy), so the ops
// transpose with a blocked 16x16 kernel.

// Whether the transposes may use the AVX-512 16x16 kernel (read once per matrix or batch: the
// ISA override is an environment lookup).
template <typename T>
bool simd_transpose() {
  return std::is_same<T, float>::value && cpu_has_avx512() && !force_generic();
}

// Rows r0 .. r0 + rn (rn <= 16) of an R x S matrix into columns of its transpose:
// dst[s * ldd + r] = src[r * lds + s].
template <typename T>
void transpose_rows(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t r0, int64_t rn, int64_t S,
                    bool simd) {
  constexpr int64_t kT = 16;
#ifndef STRIPECONV_X86
  (void)simd;
#endif
  for (int64_t s0 = 0; s0 < S; s0 += kT) {
    const int64_t sn = std::min(kT, S - s0);
#ifdef STRIPECONV_X86
    if constexpr (std::is_same<T, float>::value) {
      if (simd && rn == kT && sn == kT) {
        transpose16x16_avx512(src + r0 * lds + s0, lds, dst + s0 * ldd + r0, ldd);
        continue;
      }
    }
#endif
    for (int64_t s = 0; s < sn; ++s)
      for (int64_t r = 0; r < rn; ++r) dst[(s0 + s) * ldd + r0 + r] = src[(r0 + r) * lds + s0 + s];
  }
}

// One R x S matrix, in this thread: dst[s * ldd + r] = src[r * lds + s]. `simd`: simd_transpose<T>(),
// read by the caller once per op call (an environment lookup per matrix cost 5 % of a strided
// channels_last grad input, which transposes one row at a time).
template <typename T>
void transpose_matrix(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t R, int64_t S, bool simd) {
  for (int64_t r0 = 0; r0 < R; r0 += 16)
    transpose_rows(src, lds, dst, ldd, r0, std::min<int64_t>(16, R - r0), S, simd);
}

// B dense R x S matrices, in parallel: dst[b][s][r] = src[b][r][s].
template <typename T>
void transpose_batched(const T* src, T* dst, int64_t B, int64_t R, int64_t S) {
  const int64_t rb = ceil_div(R, 16);
  const bool simd = simd_transpose<T>();
  at::parallel_for(0, B * rb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / rb, r0 = (t % rb) * 16;
      transpose_rows(src + b * R * S, S, dst + b * R * S, R, r0, std::min<int64_t>(16, R - r0), S, simd);
    }
  });
}

// A channels_last tensor as a contiguous NCHW copy.
template <typename T>
at::Tensor to_nchw(const at::Tensor& cl) {
  at::Tensor out = scratch(cl.sizes(), cl.options());  // only used as a temporary
  const int64_t B = cl.size(0), C = cl.size(1), HW = cl.size(2) * cl.size(3);
  if (out.numel() > 0) transpose_batched<T>(cl.data_ptr<T>(), out.data_ptr<T>(), B, HW, C);
  return out;
}

// A contiguous NCHW tensor as a channels_last copy.
template <typename T>
at::Tensor to_channels_last(const at::Tensor& nchw) {
  at::Tensor out = at::empty(nchw.sizes(), nchw.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t B = nchw.size(0), C = nchw.size(1), HW = nchw.size(2) * nchw.size(3);
  if (out.numel() > 0) transpose_batched<T>(nchw.data_ptr<T>(), out.data_ptr<T>(), B, C, HW);
  return out;
}

// split_phases' planes from a channels_last x, in one pass: each (phase, image, row) is a
// transpose of the row's pixels of that phase (sw * C apart) into the planes' channel rows.
template <typename T>
at::Tensor split_phases_nhwc(const at::Tensor& x, const Geometry& g) {
  at::Tensor buf = scratch({g.sh * g.sw, g.B, g.C, g.Hpm, g.Wpm}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = buf.data_ptr<T>();
  const int64_t plane_ph = g.Hpm * g.Wpm, rows = g.B * g.Hpm;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Wpm * g.C));
  const bool simd = simd_transpose<T>();
  at::parallel_for(0, g.sh * g.sw * rows, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ph = t / rows, b = (t % rows) / g.Hpm, r = t % g.Hpm, pa = ph / g.sw, pb = ph % g.sw;
      if (r >= g.phase_rows(pa)) continue;
      const T* s = src + ((b * g.H + pa + r * g.sh) * g.W + pb) * g.C;
      T* d = dst + (ph * g.B + b) * g.C * plane_ph + r * g.Wpm;
      transpose_matrix<T>(s, g.sw * g.C, d, plane_ph, g.phase_cols(pb), g.C, simd);
    }
  });
  return buf;
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ------------------------------------------------------------------------------------------
// x in NHWC phase planes: buf[phase][b][r][q][c] = x[b, c, pa + sh*r, pb + sw*q] (for stride 1
// this is just x in channels_last order; an input already in channels_last is used as is).
// Never through ATen's generic permute copy, which is several times slower here: a channels_last
// input is copied pixel by pixel, an NCHW one goes through blocked 16x16 transposes.
template <typename T>
at::Tensor nhwc_phases(const at::Tensor& input, const Geometry& g) {
  const bool cl = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!g.strided() && cl) return input;
  if (!g.strided()) {
    at::Tensor x = input.contiguous();
    at::Tensor buf = scratch({g.B, g.H, g.W, g.C}, input.options());
    transpose_batched<T>(x.data_ptr<T>(), buf.data_ptr<T>(), g.B, g.C, g.H * g.W);
    return buf;
  }
  const int64_t hp_max = g.Hpm, wp_max = g.Wpm;
  at::Tensor buf = scratch({g.sh * g.sw, g.B, hp_max, wp_max, g.C}, input.options());
  T* dst = buf.data_ptr<T>();
  const int64_t rows = g.B * hp_max;
  if (cl) {
    // Each phase pixel is one input pixel's C channels, already contiguous: a copy per pixel.
    // (Through input.contiguous() and back: 1.0-1.8 ms of fixed cost on a 16->32 32x32 b64 grad weight.)
    const T* src = input.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, wp_max * g.C));
    at::parallel_for(0, g.sh * g.sw * rows, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t ph = t / rows, b = (t % rows) / hp_max, r = t % hp_max, pa = ph / g.sw, pb = ph % g.sw;
        if (r >= g.phase_rows(pa)) continue;
        const T* s = src + ((b * g.H + pa + r * g.sh) * g.W + pb) * g.C;
        T* d = dst + t * wp_max * g.C;
        for (int64_t q = 0, wp = g.phase_cols(pb); q < wp; ++q)
          std::copy(s + q * g.sw * g.C, s + q * g.sw * g.C + g.C, d + q * g.C);
      }
    });
    return buf;
  }
  at::Tensor x = input.contiguous();
  if (g.sw == 2) {
    // split_phases' vectorised row split, then the blocked transpose of each (phase, image) plane
    // set: two passes, each faster than the strided gather below.
    at::Tensor planes = split_phases<T>(x, g);
    transpose_batched<T>(planes.data_ptr<T>(), dst, g.sh * g.sw * g.B, g.C, hp_max * wp_max);
    return buf;
  }
  const T* src = x.data_ptr<T>();
  constexpr int64_t kT = 16;
  at::parallel_for(0, g.sh * g.sw * rows, 4, [&](int64_t t0, int64_t t1) {
    T tile[kT][kT];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ph = t / rows, b = (t % rows) / hp_max, r = t % hp_max, pa = ph / g.sw, pb = ph % g.sw;
      if (r >= g.phase_rows(pa)) continue;
      const int64_t wp = g.phase_cols(pb);
      const T* s = src + b * g.C * g.H * g.W + (pa + r * g.sh) * g.W + pb;  // + c * H * W + q * sw
      T* d = dst + t * wp_max * g.C;                                        // + q * C + c
      for (int64_t c0 = 0; c0 < g.C; c0 += kT) {
        const int64_t cn = std::min(kT, g.C - c0);
        for (int64_t q0 = 0; q0 < wp; q0 += kT) {
          const int64_t qn = std::min(kT, wp - q0);
          for (int64_t c = 0; c < cn; ++c) {
            const T* sc = s + (c0 + c) * g.H * g.W + q0 * g.sw;
            for (int64_t q = 0; q < qn; ++q) tile[c][q] = sc[q * g.sw];
          }
          for (int64_t q = 0; q < qn; ++q) {
            T* dq = d + (q0 + q) * g.C + c0;
            for (int64_t c = 0; c < cn; ++c) dq[c] = tile[c][q];
          }
        }
      }
    }
  });
  return buf;
}

}  // namespace detail
}  // namespace stripeconv_cpu
