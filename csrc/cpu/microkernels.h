// Register-blocked micro-kernels of the stripe conv CPU backend.
//
// Two kernel families, each in a portable version (plain C++ loops the compiler may
// auto-vectorise) and, on x86-64, an AVX-512 fp32 version compiled with a target attribute and
// chosen at run time (__builtin_cpu_supports), so the extension runs on any CPU.
//
// acc<R, V>: "shifted 1x1 convolution" of one pixel chunk of V*16 pixels for R output channels:
//     out[r][l] += sum_k w[k * wsk + r * wsr] * in[roff[k] + l]   (l < 16*V, lanes gated by masks)
//   Input lanes whose bit in ld[v] is clear are read as zero (never touched in memory), output
//   lanes whose bit in st[v] is clear are left alone. The accumulators live in registers for the
//   whole reduction over k, so the read-modify-write of `out` is amortised over K.
//   Forward: out = filters of one position, k = input channels. Grad input: out = input
//   channels, k = the filters that keep the position.
//
// gw<R, V>: grad weight as an outer-product GEMM over pixels, input in NHWC (channels last):
//     part[r][l] += sum_{images b, segments s, pixels f}
//                     gy[r][b*gy_bs + (s.gy + f)*gy_ps] * x[b*x_bs + (s.x + f)*ldx + l]
//   for R filters and V*16 channels (channel lanes gated by cm[v]); the accumulators stay in
//   registers over the pixel loop and `part` is read and written once per call. gy_ps: the
//   pixel stride of gy (1 for NCHW, the channel count for channels_last).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define STRIPECONV_X86 1
#endif

namespace stripeconv_cpu {

using mask_t = uint16_t;
constexpr int kLanes = 16;            // lanes per vector (one 16-bit mask word)
constexpr int kMaxV = 8;              // vectors per chunk
constexpr int kChunk = kLanes * kMaxV;  // pixels per chunk
constexpr int kMaxR = 6;              // output channels per acc call
constexpr int kMaxTile = 24;          // R * V accumulators (of 32 vector registers)
constexpr int kGwR = 6;               // filters per gw call
constexpr int kGwV = 4;               // channel vectors per gw call

struct Seg {       // a run of pixels that are contiguous in gy and in x (grad weight)
  int64_t gy, x;   // pixel offsets of its start in the gy plane and in the input plane
  int64_t len;
};

template <typename T>
using AccFn = void (*)(const T* in, const int64_t* roff, int64_t K, const T* w, int64_t wsk, int64_t wsr,
                       T* const* out, const mask_t* ld, const mask_t* st);
// acc_list<R, V>: like acc, with a per-k input offset, mask row and weight row, so that one call
// can reduce over several kernel positions (grad input: all (position, filter) pairs at once):
//     out[r][l] += sum_k w[woff[k] + r * wsr] * (lane l of ld[moff[k] + l/16] ? in[roff[k] + l] : 0)
template <typename T>
using AccListFn = void (*)(const T* in, const int64_t* roff, const mask_t* ld, const int64_t* moff, const T* w,
                           const int64_t* woff, int64_t wsr, int64_t K, T* const* out, const mask_t* st);

template <typename T>
using GwFn = void (*)(const T* const* gy, int64_t gy_bs, int64_t gy_ps, const T* x, int64_t x_bs, int64_t ldx,
                     const Seg* seg, int64_t nseg, int64_t nb, const mask_t* cm, T* part);

// ------------------------------------------------------------------------------------------
// Portable versions.
template <typename T, int R, int V>
void acc_generic(const T* in, const int64_t* roff, int64_t K, const T* w, int64_t wsk, int64_t wsr, T* const* out,
                 const mask_t* ld, const mask_t* st) {
  constexpr int L = V * kLanes;
  T acc[R][L];
  T xv[L];
  bool ld_mask[L];
  bool full = true;
  for (int l = 0; l < L; ++l) {
    ld_mask[l] = (ld[l / kLanes] >> (l % kLanes)) & 1;
    full = full && ld_mask[l];
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) acc[r][l] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* xp = in + roff[k];
    if (full) {
      for (int l = 0; l < L; ++l) xv[l] = xp[l];
    } else {
      for (int l = 0; l < L; ++l) xv[l] = ld_mask[l] ? xp[l] : T(0);
    }
    const T* wk = w + k * wsk;
    for (int r = 0; r < R; ++r) {
      const T wr = wk[r * wsr];
      for (int l = 0; l < L; ++l) acc[r][l] += wr * xv[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* o = out[r];
    for (int l = 0; l < L; ++l)
      if ((st[l / kLanes] >> (l % kLanes)) & 1) o[l] += acc[r][l];
  }
}

template <typename T, int R, int V>
void acc_list_generic(const T* in, const int64_t* roff, const mask_t* ld, const int64_t* moff, const T* w,
                      const int64_t* woff, int64_t wsr, int64_t K, T* const* out, const mask_t* st) {
  constexpr int L = V * kLanes;
  T acc[R][L];
  T xv[L];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) acc[r][l] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* xp = in + roff[k];
    const mask_t* m = ld + moff[k];
    for (int l = 0; l < L; ++l) xv[l] = ((m[l / kLanes] >> (l % kLanes)) & 1) ? xp[l] : T(0);
    const T* wk = w + woff[k];
    for (int r = 0; r < R; ++r) {
      const T wr = wk[r * wsr];
      for (int l = 0; l < L; ++l) acc[r][l] += wr * xv[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* o = out[r];
    for (int l = 0; l < L; ++l)
      if ((st[l / kLanes] >> (l % kLanes)) & 1) o[l] += acc[r][l];
  }
}

template <typename T, int R, int V>
void gw_generic(const T* const* gy, int64_t gy_bs, int64_t gy_ps, const T* x, int64_t x_bs, int64_t ldx,
                const Seg* seg, int64_t nseg, int64_t nb, const mask_t* cm, T* part) {
  constexpr int L = V * kLanes;
  T acc[R][L];
  bool lane[L];
  for (int l = 0; l < L; ++l) lane[l] = (cm[l / kLanes] >> (l % kLanes)) & 1;
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) acc[r][l] = part[r * L + l];
  T xv[L];
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t s = 0; s < nseg; ++s) {
      for (int64_t f = 0; f < seg[s].len; ++f) {
        const T* xp = x + b * x_bs + (seg[s].x + f) * ldx;
        for (int l = 0; l < L; ++l) xv[l] = lane[l] ? xp[l] : T(0);
        for (int r = 0; r < R; ++r) {
          const T gv = gy[r][b * gy_bs + (seg[s].gy + f) * gy_ps];
          for (int l = 0; l < L; ++l) acc[r][l] += gv * xv[l];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) part[r * L + l] = acc[r][l];
}

// ------------------------------------------------------------------------------------------
// AVX-512 fp32 versions.
#ifdef STRIPECONV_X86
#define STRIPECONV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

template <int R, int V>
STRIPECONV_AVX512 void acc_avx512(const float* in, const int64_t* roff, int64_t K, const float* w, int64_t wsk,
                                  int64_t wsr, float* const* out, const mask_t* ld, const mask_t* st) {
  const float* wr[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = w + r * wsr;
  __m512 acc[R][V];
  __mmask16 m[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) m[v] = ld[v];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  bool full = true;
  for (int v = 0; v < V; ++v) full = full && (ld[v] == 0xFFFF);
  if (full) {
    for (int64_t k = 0; k < K; ++k) {
      const float* xp = in + roff[k];
      __m512 x[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_ps(xp + v * kLanes);
      const int64_t wo = k * wsk;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 wb = _mm512_set1_ps(wr[r][wo]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, x[v], acc[r][v]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const float* xp = in + roff[k];
      __m512 x[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) x[v] = _mm512_maskz_loadu_ps(m[v], xp + v * kLanes);
      const int64_t wo = k * wsk;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 wb = _mm512_set1_ps(wr[r][wo]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, x[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* o = out[r];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 s = st[v];
      const __m512 cur = _mm512_maskz_loadu_ps(s, o + v * kLanes);
      _mm512_mask_storeu_ps(o + v * kLanes, s, _mm512_add_ps(cur, acc[r][v]));
    }
  }
}

template <int R, int V>
STRIPECONV_AVX512 void acc_list_avx512(const float* in, const int64_t* roff, const mask_t* ld, const int64_t* moff,
                                       const float* w, const int64_t* woff, int64_t wsr, int64_t K,
                                       float* const* out, const mask_t* st) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* xp = in + roff[k];
    const mask_t* m = ld + moff[k];
    __m512 x[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) x[v] = _mm512_maskz_loadu_ps(m[v], xp + v * kLanes);
    const float* wk = w + woff[k];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wb = _mm512_set1_ps(wk[r * wsr]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, x[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* o = out[r];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 s = st[v];
      const __m512 cur = _mm512_maskz_loadu_ps(s, o + v * kLanes);
      _mm512_mask_storeu_ps(o + v * kLanes, s, _mm512_add_ps(cur, acc[r][v]));
    }
  }
}

template <int R, int V>
STRIPECONV_AVX512 void gw_avx512(const float* const* gy, int64_t gy_bs, int64_t gy_ps, const float* x, int64_t x_bs,
                                 int64_t ldx, const Seg* seg, int64_t nseg, int64_t nb, const mask_t* cm,
                                 float* part) {
  __m512 acc[R][V];
  __mmask16 m[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) m[v] = cm[v];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(part + (r * V + v) * kLanes);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t s = 0; s < nseg; ++s) {
      const float* g[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) g[r] = gy[r] + b * gy_bs + seg[s].gy * gy_ps;
      const float* xp = x + b * x_bs + seg[s].x * ldx;
      const int64_t len = seg[s].len;
      for (int64_t f = 0, gf = 0; f < len; ++f, gf += gy_ps, xp += ldx) {
        __m512 xv[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) xv[v] = _mm512_maskz_loadu_ps(m[v], xp + v * kLanes);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 gb = _mm512_set1_ps(g[r][gf]);
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(gb, xv[v], acc[r][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(part + (r * V + v) * kLanes, acc[r][v]);
}
// 16x16 fp32 transpose: dst[j * ldd + i] = src[i * lds + j].
STRIPECONV_AVX512 inline void transpose16x16_avx512(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // [a0 b0 a1 b1 | ...], [a2 b2 a3 b3 | ...]
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // [a0 b0 c0 d0 | a4 .. | a8 .. | a12 ..] and the next columns
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);       // columns j, j+8 of rows 0-7
    t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);   // columns j+4, j+12 of rows 0-7
    t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xdd);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
  }
}
#endif  // STRIPECONV_X86

// ------------------------------------------------------------------------------------------
// Dispatch tables indexed by block sizes (index 0 unused).
template <typename T>
struct Kernels {
  AccFn<T> acc[kMaxR + 1][kMaxV + 1] = {};
  AccListFn<T> acc_list[kMaxR + 1][kMaxV + 1] = {};
  GwFn<T> gw[kGwR + 1][kGwV + 1] = {};
  const char* isa = "generic";
};

namespace detail {
template <typename T, int R, int V>
struct FillAcc {
  static void run(Kernels<T>& k, bool simd) {
#ifdef STRIPECONV_X86
    if constexpr (R * V <= kMaxTile) {  // larger tiles are split into two calls by the engine
      if constexpr (std::is_same<T, float>::value) {
        k.acc[R][V] = simd ? &acc_avx512<R, V> : &acc_generic<T, R, V>;
        k.acc_list[R][V] = simd ? &acc_list_avx512<R, V> : &acc_list_generic<T, R, V>;
      } else {
        k.acc[R][V] = &acc_generic<T, R, V>;
        k.acc_list[R][V] = &acc_list_generic<T, R, V>;
      }
    }
#else
    (void)simd;
    if constexpr (R * V <= kMaxTile) {
      k.acc[R][V] = &acc_generic<T, R, V>;
      k.acc_list[R][V] = &acc_list_generic<T, R, V>;
    }
#endif
    if constexpr (V > 1) FillAcc<T, R, V - 1>::run(k, simd);
    else if constexpr (R > 1) FillAcc<T, R - 1, kMaxV>::run(k, simd);
  }
};
template <typename T, int R, int Q>  // Q: channel vectors
struct FillGw {
  static void run(Kernels<T>& k, bool simd) {
#ifdef STRIPECONV_X86
    if constexpr (std::is_same<T, float>::value) {
      k.gw[R][Q] = simd ? &gw_avx512<R, Q> : &gw_generic<T, R, Q>;
    } else {
      k.gw[R][Q] = &gw_generic<T, R, Q>;
    }
#else
    (void)simd;
    k.gw[R][Q] = &gw_generic<T, R, Q>;
#endif
    if constexpr (Q > 1) FillGw<T, R, Q - 1>::run(k, simd);
    else if constexpr (R > 1) FillGw<T, R - 1, kGwV>::run(k, simd);
  }
};
}  // namespace detail

inline bool cpu_has_avx512() {
#ifdef STRIPECONV_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// Set STRIPECONV_CPU_ISA=generic to force the portable kernels (used by the tests).
template <typename T>
const Kernels<T>& kernels(bool force_generic) {
  static const Kernels<T> simd_tables = [] {
    Kernels<T> k;
    const bool simd = cpu_has_avx512() && std::is_same<T, float>::value;
    detail::FillAcc<T, kMaxR, kMaxV>::run(k, simd);
    detail::FillGw<T, kGwR, kGwV>::run(k, simd);
    k.isa = simd ? "avx512" : "generic";
    return k;
  }();
  static const Kernels<T> generic_tables = [] {
    Kernels<T> k;
    detail::FillAcc<T, kMaxR, kMaxV>::run(k, false);
    detail::FillGw<T, kGwR, kGwV>::run(k, false);
    return k;
  }();
  return force_generic ? generic_tables : simd_tables;
}

}  // namespace stripeconv_cpu
