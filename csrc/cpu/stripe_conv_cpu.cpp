// Compiled CPU kernels of stripe_conv2d: torch.ops.stripeconv_cpu.{forward, grad_input, grad_weight}.
//
// The op contract is in stripeconv/ops.py, the packed format in stripeconv/packing.py: packed
// weight rows are the kept stripes ordered by kernel position p = i * kw + j first, filter
// second. The per-position row lists (and their split by group) are rebuilt from the mask here
// on every call (an O(N * kh * kw) scan).
//
// Every op is a sum over kept positions of shifted 1x1 convolutions, with zero wasted work at
// any density:
//   forward      y[n, o]  += sum_c  W[row(n,p), c] * x[c, o + shift_p]   for n in S_p
//   grad input   gx[c, i] += sum_n  W[row(n,p), c] * gy[n, i - shift_p]  for n in S_p
//   grad weight  gW[row(n,p), c] = sum_o gy[n, o] * x[c, o + shift_p]
// (S_p: the filters that keep position p, restricted to one group.)
//
// Layout: NCHW (channels_last tensors are transposed in and out). Forward and grad input run on
// one engine ("acc", see run_acc_engine): the output plane is cut into chunks of up to 128
// pixels, and for each chunk, each position and each block of up to 6 output channels a
// micro-kernel keeps an accumulator tile of up to 24 vector registers (6 x 64 or 3 x 128 pixels)
// through the whole reduction (vectorised over pixels, weights broadcast, read in place from the
// packed rows) and adds it to the output once. Grad input's flat path reduces over all
// (position, filter) pairs in one call, so few filters per position still make long reductions.
// Grad weight (see grad_weight_impl) is an outer-product GEMM over pixels on channels_last x.
// Near density 1 the forward may hand over to the dense oneDNN conv (see kDenseDensity).
//
// Borders are handled by lane masks, never by a padded copy:
//  * flat path (output row pitch == input row pitch, e.g. stride 1 with "same" padding): the
//    plane is treated as one flat array; the input of output pixel f at position p is
//    f + rq * pitch + cq (a constant shift), so a chunk reads contiguous inputs;
//    lanes whose column wraps or whose row falls outside the image are masked on the load
//    (masked loads never touch memory for masked lanes). Also fast for small widths (8x8).
//  * row path (any other geometry): each output row is processed as the exact valid segment
//    of every position.
// Stride > 1: the input is split once per call into stride_h * stride_w phase planes (a plain,
// unpadded copy); every position then reads one phase plane with unit stride. Grad input with
// stride > 1 writes gradient phase planes (one engine run per phase, only the positions of that
// phase) and interleaves them into grad_input at the end.
//
// Determinism: every output element is written by exactly one task, and its sum is taken in a
// fixed order (positions in order, then the reduction index in order) whatever the number of
// threads; grad weight tasks own blocks of rows x channels and reduce over pixels in order.
// Threads: at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <cstdlib>
#include <string>
#include <vector>

#include "microkernels.h"

namespace stripeconv_cpu {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == value;
}
// STRIPECONV_CPU_ISA=generic forces the portable micro-kernels (the tests use it).
bool force_generic() { return env_is("STRIPECONV_CPU_ISA", "generic"); }

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

StripeLists build_lists(const at::Tensor& mask, const Geometry& g) {
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

PosGeo position_geo(const Geometry& g, int64_t p) {
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
// The acc engine: out[b, o, plane] (+)= sum over items of shifted 1x1 convolutions.

struct EnginePos {
  int64_t in_off;    // offset of the input plane set (excluding batch and channel)
  int64_t hin, win;  // valid input extent
  int64_t rq, cq;    // out (h, w) reads in (h + rq, w + cq)
};

template <typename T>
struct Item {
  int pos = 0;  // index into EnginePos
  int r = 0;    // output channels in this block (1..kMaxR)
  int64_t K = 0;
  const int64_t* roff = nullptr;  // [K] input channel offsets
  const T* w = nullptr;            // weight of (k, r) at w[k * wsk + r * wsr] (read in place)
  int64_t wsk = 0, wsr = 0;
  int64_t outc[kMaxR] = {};
};

// A block of output channels reducing over a list of (position, reduction index) pairs at once
// (flat path of grad input): per pair an input offset (shift folded in), a mask row and a
// weight row.
template <typename T>
struct ListItem {
  int r = 0;
  int64_t K = 0;
  const int64_t* roff = nullptr;
  const int64_t* moff = nullptr;
  const int64_t* woff = nullptr;
  const T* w = nullptr;
  int64_t wsr = 0;
  int64_t outc[kMaxR] = {};
};

template <typename T>
struct AccEngine {
  T* out = nullptr;
  int64_t out_bs = 0, out_cs = 0, hout = 0, wout = 0, po = 0;
  const T* in = nullptr;
  int64_t in_bs = 0, pi = 0;
  int64_t B = 0;
  const T* bias = nullptr;  // [out channels] or null (zero init)
  std::vector<EnginePos> pos;
  std::vector<std::pair<int64_t, int64_t>> split_range;  // output channels each split initialises
  std::vector<std::vector<Item<T>>> split_items;          // items of each split, by position
  std::vector<std::vector<ListItem<T>>> split_list_items;  // flat path only: multi-position items
};

constexpr int64_t kGroupBytes = 192 * 1024;  // weights of one item group (fits in L2 with the data)

bool position_touches_output(const EnginePos& q, int64_t hout, int64_t wout) {
  const int64_t h0 = std::max<int64_t>(0, -q.rq), h1 = std::min(hout, q.hin - q.rq);
  const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(wout, q.win - q.cq);
  return h0 < h1 && w0 < w1;
}

// Lane masks of the flat path: st[v] = lanes inside the output image, ld[p][v] = lanes whose
// input at position p lies inside the input image.
void build_flat_masks(int64_t hout, int64_t wout, int64_t po, const std::vector<EnginePos>& pos,
                      std::vector<mask_t>& st, std::vector<mask_t>& ld) {
  const int64_t npix = hout * po, nvec = ceil_div(npix, kLanes);
  st.assign(nvec, 0);
  ld.assign(pos.size() * nvec, 0);
  for (int64_t f = 0; f < npix; ++f)
    if (f % po < wout) st[f / kLanes] |= mask_t(1u << (f % kLanes));
  for (size_t p = 0; p < pos.size(); ++p) {
    const EnginePos& q = pos[p];
    mask_t* m = ld.data() + p * nvec;
    for (int64_t ho = 0; ho < hout; ++ho) {
      const int64_t hi = ho + q.rq;
      if (hi < 0 || hi >= q.hin) continue;
      const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(wout, q.win - q.cq);
      for (int64_t wo = w0; wo < w1; ++wo) {
        const int64_t f = ho * po + wo;
        m[f / kLanes] |= mask_t(1u << (f % kLanes));
      }
    }
  }
}

void tail_masks(int64_t len, mask_t* m) {  // len in (0, kChunk]
  for (int v = 0; v < kMaxV; ++v) {
    const int64_t rem = len - v * kLanes;
    m[v] = rem >= kLanes ? mask_t(0xFFFF) : (rem <= 0 ? mask_t(0) : mask_t((1u << rem) - 1));
  }
}

template <typename T>
void init_out(T* o, int64_t len, const T* bias, int64_t c) {
  const T v = bias ? bias[c] : T(0);
  std::fill(o, o + len, v);
}

// One chunk of nv vectors for r output channels: one micro-kernel call when the r x nv tile fits
// the registers, else two calls of at most 4 vectors each.
template <typename T>
inline void call_acc(const Kernels<T>& ker, const Item<T>& it, int64_t nv, const T* in, T* const* op,
                     const mask_t* ldm, const mask_t* stm) {
  if (it.r * nv <= kMaxTile) {
    ker.acc[it.r][nv](in, it.roff, it.K, it.w, it.wsk, it.wsr, op, ldm, stm);
    return;
  }
  constexpr int64_t h = kMaxTile / kMaxR;
  ker.acc[it.r][h](in, it.roff, it.K, it.w, it.wsk, it.wsr, op, ldm, stm);
  T* op2[kMaxR];
  for (int r = 0; r < it.r; ++r) op2[r] = op[r] + h * kLanes;
  ker.acc[it.r][nv - h](in + h * kLanes, it.roff, it.K, it.w, it.wsk, it.wsr, op2, ldm + h, stm + h);
}

template <typename T>
inline void call_acc_list(const Kernels<T>& ker, const ListItem<T>& it, int64_t nv, const T* in, T* const* op,
                          const mask_t* ldm, const mask_t* stm) {
  if (it.r * nv <= kMaxTile) {
    ker.acc_list[it.r][nv](in, it.roff, ldm, it.moff, it.w, it.woff, it.wsr, it.K, op, stm);
    return;
  }
  constexpr int64_t h = kMaxTile / kMaxR;
  ker.acc_list[it.r][h](in, it.roff, ldm, it.moff, it.w, it.woff, it.wsr, it.K, op, stm);
  T* op2[kMaxR];
  for (int r = 0; r < it.r; ++r) op2[r] = op[r] + h * kLanes;
  ker.acc_list[it.r][nv - h](in + h * kLanes, it.roff, ldm + h, it.moff, it.w, it.woff, it.wsr, it.K, op2, stm + h);
}

template <typename T>
void run_acc_engine(const AccEngine<T>& e, const Kernels<T>& ker) {
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  if (e.B == 0 || e.hout == 0 || e.wout == 0 || nsplit == 0) return;
  if (e.po == e.pi) {
    // Flat path.
    std::vector<mask_t> st, ld;
    build_flat_masks(e.hout, e.wout, e.po, e.pos, st, ld);
    const int64_t npix = e.hout * e.po, nvec = ceil_div(npix, kLanes), nchunk = ceil_div(nvec, kMaxV);
    const int64_t ntask = e.B * nchunk * nsplit;
    // Items are cut into groups whose weights fit in L2 (~192 KB); a thread runs one group over
    // all of its chunks before the next, so large weights stream from L3 once per thread and
    // group rather than once per chunk. The order of the sum of each output element (positions
    // in order) does not change.
    std::vector<std::vector<size_t>> groups(nsplit);
    int64_t ngroups = 1;
    for (int64_t s = 0; s < nsplit; ++s) {
      groups[s].push_back(0);
      int64_t bytes = 0;
      for (size_t i = 0; i < e.split_items[s].size(); ++i) {
        const int64_t wb = e.split_items[s][i].r * e.split_items[s][i].K * static_cast<int64_t>(sizeof(T));
        if (bytes > 0 && bytes + wb > kGroupBytes) {
          groups[s].push_back(i);
          bytes = 0;
        }
        bytes += wb;
      }
      groups[s].push_back(e.split_items[s].size());
      ngroups = std::max<int64_t>(ngroups, static_cast<int64_t>(groups[s].size()) - 1);
    }
    at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
     for (int64_t gi = 0; gi < ngroups; ++gi) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t s = t % nsplit, ch = (t / nsplit) % nchunk, b = t / (nsplit * nchunk);
        const int64_t f0 = ch * kChunk, len = std::min<int64_t>(kChunk, npix - f0);
        const int64_t nv = std::min<int64_t>(kMaxV, nvec - ch * kMaxV);
        T* ob = e.out + b * e.out_bs + f0;
        if (gi == 0)
          for (int64_t c = e.split_range[s].first; c < e.split_range[s].second; ++c)
            init_out(ob + c * e.out_cs, len, e.bias, c);
        const mask_t* stm = st.data() + ch * kMaxV;
        const T* ib = e.in + b * e.in_bs + f0;
        if (gi + 1 >= static_cast<int64_t>(groups[s].size())) continue;
        for (size_t i = groups[s][gi]; i < groups[s][gi + 1]; ++i) {
          const Item<T>& it = e.split_items[s][i];
          const EnginePos& q = e.pos[it.pos];
          const mask_t* ldm = ld.data() + it.pos * nvec + ch * kMaxV;
          bool any = false;
          for (int64_t v = 0; v < nv; ++v) any = any || ldm[v] != 0;
          if (!any) continue;
          T* op[kMaxR];
          for (int r = 0; r < it.r; ++r) op[r] = ob + it.outc[r] * e.out_cs;
          call_acc(ker, it, nv, ib + q.in_off + q.rq * e.pi + q.cq, op, ldm, stm);
        }
        if (gi == 0 && static_cast<int64_t>(e.split_list_items.size()) > s) {
          for (const ListItem<T>& it : e.split_list_items[s]) {
            T* op[kMaxR];
            for (int r = 0; r < it.r; ++r) op[r] = ob + it.outc[r] * e.out_cs;
            call_acc_list(ker, it, nv, ib, op, ld.data() + ch * kMaxV, stm);
          }
        }
      }
     }
    });
  } else {
    // Row path: exact valid segment of every output row and position.
    const int64_t ntask = e.B * e.hout * nsplit;
    at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
      mask_t m[kMaxV];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t s = t % nsplit, ho = (t / nsplit) % e.hout, b = t / (nsplit * e.hout);
        T* ob = e.out + b * e.out_bs + ho * e.po;
        for (int64_t c = e.split_range[s].first; c < e.split_range[s].second; ++c)
          init_out(ob + c * e.out_cs, e.wout, e.bias, c);
        for (const Item<T>& it : e.split_items[s]) {
          const EnginePos& q = e.pos[it.pos];
          const int64_t hi = ho + q.rq;
          if (hi < 0 || hi >= q.hin) continue;
          const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(e.wout, q.win - q.cq);
          const T* ib = e.in + b * e.in_bs + q.in_off + hi * e.pi + q.cq;
          for (int64_t x0 = w0; x0 < w1; x0 += kChunk) {
            const int64_t len = std::min<int64_t>(kChunk, w1 - x0);
            tail_masks(len, m);
            T* op[kMaxR];
            for (int r = 0; r < it.r; ++r) op[r] = ob + it.outc[r] * e.out_cs + x0;
            call_acc(ker, it, ceil_div(len, kLanes), ib + x0, op, m, m);
          }
        }
      }
    });
  }
}

// Number of output-channel splits: enough tasks to keep every thread busy when the batch and
// the plane give few chunks (batch 1), but blocks large enough for the register tiles.
// `rows_per_item` is the mean number of output channels a position (and group) feeds: a split
// must leave about two full register tiles of them, or the micro-kernel runs half-empty tiles
// (at density 0.1, 128 filters give ~13 per position: splitting them 4 ways was slower than
// leaving one thread with less to do).
int64_t choose_splits(int64_t base_tasks, int64_t nout, double rows_per_item) {
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  const int64_t want = 4 * threads;
  if (base_tasks >= want || base_tasks == 0) return 1;
  const int64_t by_tasks = ceil_div(want, base_tasks);
  const int64_t by_width = std::max<int64_t>(1, nout / (4 * kMaxR));
  const int64_t by_density = std::max<int64_t>(1, static_cast<int64_t>(rows_per_item / (2 * kMaxR)));
  int64_t n = std::max<int64_t>(1, std::min({by_tasks, by_width, by_density}));
  if (base_tasks < threads && n * base_tasks < threads)  // at least one task per thread
    n = std::min<int64_t>(ceil_div(threads, base_tasks), std::max<int64_t>(1, nout / kMaxR));
  return n;
}

// ------------------------------------------------------------------------------------------
// Phase planes for stride > 1: buf[phase][b][c][Hpm][Wpm] = x[b, c, pa + sh*r, pb + sw*q].

template <typename T>
at::Tensor split_phases(const at::Tensor& x, const Geometry& g) {
  at::Tensor buf = scratch({g.sh * g.sw, g.B, g.C, g.Hpm, g.Wpm}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = buf.data_ptr<T>();
  const int64_t nplanes = g.B * g.C, plane_in = g.H * g.W, plane_ph = g.Hpm * g.Wpm;
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
// transpose with a blocked 16x16 kernel: dst[b][s][r] = src[b][r][s].
template <typename T>
void transpose_batched(const T* src, T* dst, int64_t B, int64_t R, int64_t S) {
  constexpr int64_t kT = 16;
  const int64_t rb = ceil_div(R, kT);
#ifdef STRIPECONV_X86
  const bool simd = std::is_same<T, float>::value && cpu_has_avx512() && !force_generic();
#endif
  at::parallel_for(0, B * rb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / rb, r0 = (t % rb) * kT, rn = std::min(kT, R - r0);
      const T* sb = src + b * R * S;
      T* db = dst + b * R * S;
      for (int64_t s0 = 0; s0 < S; s0 += kT) {
        const int64_t sn = std::min(kT, S - s0);
#ifdef STRIPECONV_X86
        if constexpr (std::is_same<T, float>::value) {
          if (simd && rn == kT && sn == kT) {
            transpose16x16_avx512(sb + r0 * S + s0, S, db + s0 * R + r0, R);
            continue;
          }
        }
#endif
        for (int64_t s = 0; s < sn; ++s)
          for (int64_t r = 0; r < rn; ++r) db[(s0 + s) * R + r0 + r] = sb[(r0 + r) * S + s0 + s];
      }
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

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
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
  TORCH_CHECK(in_shape.size() == 4, op, ": expected a 4-D input [B, C, H, W], got ", in_shape.size(), "-D shape ",
              shape_str(in_shape));
  TORCH_CHECK(mask.dim() == 3, op, ": stripe_mask must be [out_channels, kh, kw], got shape ", shape_str(mask.sizes()));
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": stripe_mask must have dtype bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.device().is_cpu(), op, ": stripe_mask must be a CPU tensor, got device ", mask.device());
  TORCH_CHECK(stride.size() == 2, op, ": stride takes 2 values (sh, sw), got ", stride.size());
  TORCH_CHECK(dilation.size() == 2, op, ": dilation takes 2 values (dh, dw), got ", dilation.size());
  TORCH_CHECK(padding.size() == 4, op, ": padding takes 4 values (top, bottom, left, right), got ", padding.size());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", shape_str(stride));
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", shape_str(dilation));
  for (auto v : padding) TORCH_CHECK(v >= 0, op, ": padding must be >= 0, got ", shape_str(padding));
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  for (auto v : in_shape) TORCH_CHECK(v >= 0, op, ": input shape must be non-negative, got ", shape_str(in_shape));
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
  TORCH_CHECK(g.C % groups == 0, op, ": in_channels (", g.C, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(g.N % groups == 0, op, ": out_channels (", g.N, ") must be divisible by groups (", groups, ")");
  g.Cg = g.C / groups;
  g.Ng = g.N / groups;
  TORCH_CHECK(weight.dim() == 2, op, ": packed weight must be 2-D [num_stripes, in_channels/groups], got shape ",
              shape_str(weight.sizes()));
  TORCH_CHECK(weight.size(1) == g.Cg, op, ": packed weight must be [num_stripes, ", g.Cg, "], got ",
              shape_str(weight.sizes()));
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got device ", weight.device());
  {
    const at::Tensor mc = mask.contiguous();
    const bool* mp = mc.data_ptr<bool>();
    g.S = 0;
    for (int64_t i = 0; i < mc.numel(); ++i) g.S += mp[i] ? 1 : 0;
  }
  TORCH_CHECK(weight.size(0) == g.S, op, ": packed weight has ", weight.size(0),
              " rows but stripe_mask keeps ", g.S, " stripes");
  const int64_t hnum = g.H + g.pt + g.pb - g.dh * (g.kh - 1) - 1, wnum = g.W + g.pl + g.pr - g.dw * (g.kw - 1) - 1;
  g.Ho = hnum < 0 ? 0 : hnum / g.sh + 1;
  g.Wo = wnum < 0 ? 0 : wnum / g.sw + 1;
  g.Hpm = ceil_div(g.H, g.sh);
  g.Wpm = ceil_div(g.W, g.sw);
  return g;
}

void check_float_dtype(const char* op, const char* what, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, op, ": ", what,
              " must be float32, float64 or bfloat16, got ", s);
}

// ------------------------------------------------------------------------------------------
// Forward.

template <typename T>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& mask, const Geometry& g) {
  at::Tensor y = at::empty({g.B, g.N, g.Ho, g.Wo}, input.options());
  if (y.numel() == 0) return y;
  if (is_channels_last(input)) {  // output in the input's memory format, as the op contract says
    at::Tensor out = forward_impl<T>(to_nchw<T>(input), weight, bias, mask, g);
    return to_channels_last<T>(out);
  }
  at::Tensor x = input.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());

  at::Tensor phases;
  AccEngine<T> e;
  e.out = y.data_ptr<T>();
  e.out_bs = g.N * g.Ho * g.Wo;
  e.out_cs = g.Ho * g.Wo;
  e.hout = g.Ho;
  e.wout = g.Wo;
  e.po = g.Wo;
  e.B = g.B;
  e.bias = bias_c.defined() ? bias_c.data_ptr<T>() : nullptr;
  int64_t in_cs;
  if (g.strided()) {
    phases = split_phases<T>(x, g);
    e.in = phases.data_ptr<T>();
    in_cs = g.Hpm * g.Wpm;
    e.pi = g.Wpm;
  } else {
    e.in = x.data_ptr<T>();
    in_cs = g.H * g.W;
    e.pi = g.W;
  }
  e.in_bs = g.C * in_cs;
  const int64_t phase_size = g.B * g.C * in_cs;

  std::vector<int64_t> roff(g.C);
  for (int64_t c = 0; c < g.C; ++c) roff[c] = c * in_cs;

  const int64_t P = g.P();
  std::vector<int> pos_index(P, -1);
  for (int64_t p = 0; p < P; ++p) {
    if (L.offsets[p] == L.offsets[p + 1]) continue;
    const PosGeo q = position_geo(g, p);
    EnginePos ep{q.phase * phase_size, q.hin, q.win, q.rq, q.cq};
    if (!position_touches_output(ep, g.Ho, g.Wo)) continue;
    pos_index[p] = static_cast<int>(e.pos.size());
    e.pos.push_back(ep);
  }

  const int64_t base_tasks =
      e.po == e.pi ? g.B * ceil_div(ceil_div(g.Ho * g.Wo, kLanes), kMaxV) : g.B * g.Ho;
  const double rows_per_item =
      e.pos.empty() ? 0.0 : static_cast<double>(g.S) / static_cast<double>(e.pos.size() * g.G);
  const int64_t nsplit = choose_splits(base_tasks, g.N, rows_per_item);
  const T* wp = w.data_ptr<T>();
  for (int64_t s = 0; s < nsplit; ++s) {
    const int64_t n0 = g.N * s / nsplit, n1 = g.N * (s + 1) / nsplit;
    e.split_range.emplace_back(n0, n1);
    std::vector<Item<T>> items;
    for (int64_t p = 0; p < P; ++p) {
      if (pos_index[p] < 0) continue;
      for (int64_t grp = 0; grp < g.G; ++grp) {
        std::vector<int64_t> rows;
        for (int64_t row = L.group_begin(g, p, grp); row < L.group_begin(g, p, grp + 1); ++row)
          if (L.filters[row] >= n0 && L.filters[row] < n1) rows.push_back(row);
        // Balanced blocks (7 filters -> 4 + 3, not 6 + 1): small blocks waste the register tile.
        const int64_t nrows = static_cast<int64_t>(rows.size()), nblk = ceil_div(nrows, kMaxR);
        for (int64_t blk = 0, r0 = 0; blk < nblk; ++blk) {
          Item<T> it;
          it.pos = pos_index[p];
          it.r = static_cast<int>(nrows * (blk + 1) / nblk - nrows * blk / nblk);
          it.K = g.Cg;
          it.roff = roff.data() + grp * g.Cg;
          // The rows of one block are consecutive packed rows (ascending filters of one group).
          it.w = wp + rows[r0] * g.Cg;
          it.wsk = 1;
          it.wsr = g.Cg;
          for (int r = 0; r < it.r; ++r) {
            TORCH_INTERNAL_ASSERT(rows[r0 + r] == rows[r0] + r);
            it.outc[r] = L.filters[rows[r0 + r]];
          }
          r0 += it.r;
          items.push_back(it);
        }
      }
    }
    e.split_items.push_back(std::move(items));
  }
  run_acc_engine(e, ker);
  return y;
}

// ------------------------------------------------------------------------------------------
// Grad input.

template <typename T>
at::Tensor grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                           const Geometry& g) {
  at::Tensor gx = at::empty({g.B, g.C, g.H, g.W}, grad_output.options());
  if (gx.numel() == 0) return gx;
  if (g.Ho == 0 || g.Wo == 0 || g.S == 0) return gx.zero_();
  if (is_channels_last(grad_output))
    return to_channels_last<T>(grad_input_impl<T>(to_nchw<T>(grad_output), weight, mask, g));
  at::Tensor gy = grad_output.contiguous();
  at::Tensor w = weight.contiguous();
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());
  const T* wp = w.data_ptr<T>();
  const int64_t P = g.P();
  const int64_t gy_cs = g.Ho * g.Wo;

  std::vector<int64_t> roff_rows(g.S);  // gy channel offset of every packed row
  for (int64_t row = 0; row < g.S; ++row) roff_rows[row] = L.filters[row] * gy_cs;

  at::Tensor phases;
  T* out_base;
  int64_t out_cs, po, phase_size;
  if (g.strided()) {
    phases = scratch({g.sh * g.sw, g.B, g.C, g.Hpm, g.Wpm}, grad_output.options());
    out_base = phases.data_ptr<T>();
    out_cs = g.Hpm * g.Wpm;
    po = g.Wpm;
  } else {
    out_base = gx.data_ptr<T>();
    out_cs = g.H * g.W;
    po = g.W;
  }
  phase_size = g.B * g.C * out_cs;

  for (int64_t ph = 0; ph < g.sh * g.sw; ++ph) {
    const int64_t pa = ph / g.sw, pb = ph % g.sw;
    AccEngine<T> e;
    e.out = out_base + ph * phase_size;
    e.out_bs = g.C * out_cs;
    e.out_cs = out_cs;
    e.hout = g.phase_rows(pa);
    e.wout = g.phase_cols(pb);
    e.po = po;
    e.in = gy.data_ptr<T>();
    e.in_bs = g.N * gy_cs;
    e.pi = g.Wo;
    e.B = g.B;
    if (e.hout == 0 || e.wout == 0) continue;
    std::vector<int> pos_index(P, -1);
    for (int64_t p = 0; p < P; ++p) {
      if (L.offsets[p] == L.offsets[p + 1]) continue;
      const PosGeo q = position_geo(g, p);
      if (q.phase != ph) continue;
      // grad-input pixel (h, w) of this phase receives gy(h - rq, w - cq).
      EnginePos ep{0, g.Ho, g.Wo, -q.rq, -q.cq};
      if (!position_touches_output(ep, e.hout, e.wout)) continue;
      pos_index[p] = static_cast<int>(e.pos.size());
      e.pos.push_back(ep);
    }
    const int64_t base_tasks =
        e.po == e.pi ? g.B * ceil_div(ceil_div(e.hout * e.po, kLanes), kMaxV) : g.B * e.hout;
    const int64_t nsplit = choose_splits(base_tasks, g.C, static_cast<double>(g.Cg));
    // Multi-position lists pay a mask and offset load per reduction step; they win when a
    // position keeps few filters per group (short reductions), per-position items otherwise.
    int64_t live_rows = 0;
    for (int64_t p = 0; p < P; ++p)
      if (pos_index[p] >= 0) live_rows += L.offsets[p + 1] - L.offsets[p];
    const bool short_lists = live_rows < 24 * g.G * static_cast<int64_t>(e.pos.size());
    if (e.po == e.pi && short_lists) {
      // Flat path: one reduction over all (position, filter) pairs of a group per channel
      // block, so the output read-modify-write is amortised over all positions even when
      // each position keeps few filters.
      const int64_t nvec = ceil_div(e.hout * e.po, kLanes);
      std::vector<std::vector<int64_t>> roff(g.G), moff(g.G), woff(g.G);
      for (int64_t p = 0; p < P; ++p) {
        if (pos_index[p] < 0) continue;
        const EnginePos& q = e.pos[pos_index[p]];
        for (int64_t grp = 0; grp < g.G; ++grp)
          for (int64_t row = L.group_begin(g, p, grp); row < L.group_begin(g, p, grp + 1); ++row) {
            roff[grp].push_back(q.in_off + L.filters[row] * gy_cs + q.rq * e.pi + q.cq);
            moff[grp].push_back(pos_index[p] * nvec);
            woff[grp].push_back(row * g.Cg);
          }
      }
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t c0 = g.C * s / nsplit, c1 = g.C * (s + 1) / nsplit;
        e.split_range.emplace_back(c0, c1);
        e.split_items.emplace_back();
        std::vector<ListItem<T>> items;
        for (int64_t grp = 0; grp < g.G; ++grp) {
          if (roff[grp].empty()) continue;
          const int64_t ca = std::max(c0, grp * g.Cg), cb = std::min(c1, (grp + 1) * g.Cg);
          if (ca >= cb) continue;
          const int64_t nch = cb - ca, nblk = ceil_div(nch, kMaxR);
          for (int64_t blk = 0; blk < nblk; ++blk) {
            const int64_t cc = ca + nch * blk / nblk;
            ListItem<T> it;
            it.r = static_cast<int>(ca + nch * (blk + 1) / nblk - cc);
            it.K = static_cast<int64_t>(roff[grp].size());
            it.roff = roff[grp].data();
            it.moff = moff[grp].data();
            it.woff = woff[grp].data();
            it.w = wp + (cc - grp * g.Cg);
            it.wsr = 1;
            for (int r = 0; r < it.r; ++r) it.outc[r] = cc + r;
            items.push_back(it);
          }
        }
        e.split_list_items.push_back(std::move(items));
      }
      run_acc_engine(e, ker);
      continue;
    }
    for (int64_t s = 0; s < nsplit; ++s) {
      const int64_t c0 = g.C * s / nsplit, c1 = g.C * (s + 1) / nsplit;
      e.split_range.emplace_back(c0, c1);
      std::vector<Item<T>> items;
      for (int64_t p = 0; p < P; ++p) {
        if (pos_index[p] < 0) continue;
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const int64_t rb = L.group_begin(g, p, grp), re = L.group_begin(g, p, grp + 1);
          if (rb == re) continue;
          const int64_t ca = std::max(c0, grp * g.Cg), cb = std::min(c1, (grp + 1) * g.Cg);
          for (int64_t cc = ca; cc < cb; cc += kMaxR) {
            Item<T> it;
            it.pos = pos_index[p];
            it.r = static_cast<int>(std::min<int64_t>(kMaxR, cb - cc));
            it.K = re - rb;
            it.roff = roff_rows.data() + rb;
            it.w = wp + rb * g.Cg + (cc - grp * g.Cg);
            it.wsk = g.Cg;
            it.wsr = 1;
            for (int r = 0; r < it.r; ++r) it.outc[r] = cc + r;
            items.push_back(it);
          }
        }
      }
      e.split_items.push_back(std::move(items));
    }
    run_acc_engine(e, ker);
  }

  if (g.strided()) {
    // Interleave the phase planes into grad_input.
    T* dst = gx.data_ptr<T>();
    const T* src = phases.data_ptr<T>();
    const int64_t nplanes = g.B * g.C;
    at::parallel_for(0, nplanes, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t bc = t0; bc < t1; ++bc) {
        T* d = dst + bc * g.H * g.W;
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t pa = h % g.sh, r = h / g.sh;
          for (int64_t wcol = 0; wcol < g.W; ++wcol) {
            const int64_t pb = wcol % g.sw, q = wcol / g.sw;
            d[h * g.W + wcol] = src[(pa * g.sw + pb) * phase_size + bc * out_cs + r * g.Wpm + q];
          }
        }
      }
    });
  }
  return gx;
}

// ------------------------------------------------------------------------------------------
// Grad weight: per position p and group, gW[rows of p] = gy[S_p] . x_shifted^T, an outer-product
// GEMM over pixels with the input in NHWC (channels last), so the micro-kernel broadcasts gy and
// loads x rows as vectors over channels (like the forward kernel, one contiguous 64-channel
// line per pixel). Pixels are walked as segments contiguous in both gy and x (one per valid
// output row, merged when rows join up), so borders cost nothing and need no masks.
// Tasks = (position, block of <= 6 rows, tile of <= 64 channels); each task owns its output
// block and sums in a fixed order (pixel tiles in order), so the result is deterministic.
// Pixel tiles (groups of images, or row bands of one image) keep the x tile in L2 while all
// tasks of a thread pass over it; a task's accumulators wait in `part` between tiles.

// x in NHWC phase planes: buf[phase][b][r][q][c] = x[b, c, pa + sh*r, pb + sw*q] (for stride 1
// this is just x in channels_last order; an input already in channels_last is used as is).
// A blocked 16x16 transpose: ATen's generic permute copy is several times slower here.
template <typename T>
at::Tensor nhwc_phases(const at::Tensor& input, const Geometry& g) {
  if (!g.strided() && input.is_contiguous(at::MemoryFormat::ChannelsLast)) return input;
  at::Tensor x = input.contiguous();
  if (!g.strided()) {
    at::Tensor buf = scratch({g.B, g.H, g.W, g.C}, input.options());
    transpose_batched<T>(x.data_ptr<T>(), buf.data_ptr<T>(), g.B, g.C, g.H * g.W);
    return buf;
  }
  const int64_t hp_max = g.strided() ? g.Hpm : g.H, wp_max = g.strided() ? g.Wpm : g.W;
  at::Tensor buf = scratch({g.sh * g.sw, g.B, hp_max, wp_max, g.C}, input.options());
  const T* src = x.data_ptr<T>();
  T* dst = buf.data_ptr<T>();
  const int64_t rows = g.B * hp_max;
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

template <typename T>
at::Tensor grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& mask, const Geometry& g) {
  at::Tensor gw = at::zeros({g.S, g.Cg}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0 || g.B == 0 || g.Ho == 0 || g.Wo == 0) return gw;
  at::Tensor gy = is_channels_last(grad_output) ? to_nchw<T>(grad_output) : grad_output.contiguous();
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());

  at::Tensor xt = nhwc_phases<T>(input, g);
  const T* in = xt.data_ptr<T>();
  const int64_t pitch = g.strided() ? g.Wpm : g.W;               // pixels per input row
  const int64_t plane = g.strided() ? g.Hpm * g.Wpm : g.H * g.W;  // pixels per input image
  const int64_t x_bs = plane * g.C, phase_size = g.B * x_bs;
  const int64_t gy_cs = g.Ho * g.Wo, gy_bs = g.N * gy_cs;
  const T* gyp = gy.data_ptr<T>();

  // Pixel tiles: whole images when they are small, else bands of rows of one image.
  // A task reads a slice of at most 64 channels of the tile.
  const int64_t slice = std::min<int64_t>(std::max<int64_t>(g.Cg, 16), kGwV * kLanes) * int64_t(sizeof(T));
  const int64_t tile_px = std::max<int64_t>(g.Wo, (192 * 1024) / slice);
  int64_t imgs_per_tile = 1, rows_per_tile = g.Ho;
  if (g.Ho * g.Wo <= tile_px) {
    imgs_per_tile = std::max<int64_t>(1, tile_px / (g.Ho * g.Wo));
  } else {
    rows_per_tile = std::max<int64_t>(1, tile_px / g.Wo);
  }
  const int64_t nbands = ceil_div(g.Ho, rows_per_tile);

  // Segments of every position and row band (pixel offsets within one image).
  const int64_t P = g.P();
  struct PosSegs {
    int64_t x_base;                      // phase offset
    std::vector<std::vector<Seg>> band;  // [nbands]
  };
  std::vector<PosSegs> pos(P);
  std::vector<int> live(P, 0);
  for (int64_t p = 0; p < P; ++p) {
    if (L.offsets[p] == L.offsets[p + 1]) continue;
    const PosGeo q = position_geo(g, p);
    const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(g.Wo, q.win - q.cq);
    if (w0 >= w1) continue;
    pos[p].x_base = q.phase * phase_size;
    pos[p].band.resize(nbands);
    for (int64_t bd = 0; bd < nbands; ++bd) {
      std::vector<Seg>& segs = pos[p].band[bd];
      for (int64_t ho = bd * rows_per_tile; ho < std::min(g.Ho, (bd + 1) * rows_per_tile); ++ho) {
        const int64_t hi = ho + q.rq;
        if (hi < 0 || hi >= q.hin) continue;
        Seg sg{ho * g.Wo + w0, hi * pitch + w0 + q.cq, w1 - w0};
        if (!segs.empty() && segs.back().gy + segs.back().len == sg.gy && segs.back().x + segs.back().len == sg.x)
          segs.back().len += sg.len;
        else
          segs.push_back(sg);
        live[p] = 1;
      }
    }
  }

  struct Task {
    int pos, r, v;
    int64_t row0, c0;  // first packed row; first input channel within the group
    int64_t cn;        // channels in this tile
    int64_t grp;
  };
  std::vector<Task> tasks;
  constexpr int64_t kTileC = kGwV * kLanes;
  for (int64_t p = 0; p < P; ++p) {
    if (!live[p]) continue;
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const int64_t rb = L.group_begin(g, p, grp), re = L.group_begin(g, p, grp + 1);
      const int64_t nrows = re - rb, nblk = ceil_div(nrows, kGwR);
      // Channel tile outside the row blocks: consecutive tasks share one x slice in cache.
      for (int64_t c0 = 0; c0 < g.Cg; c0 += kTileC) {
        const int64_t cn = std::min(kTileC, g.Cg - c0);
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t r0 = rb + nrows * blk / nblk, r1 = rb + nrows * (blk + 1) / nblk;
          tasks.push_back(Task{static_cast<int>(p), static_cast<int>(r1 - r0), static_cast<int>(ceil_div(cn, kLanes)),
                               r0, c0, cn, grp});
        }
      }
    }
  }
  if (tasks.empty()) return gw;

  constexpr int64_t kPart = kGwR * kTileC;
  T* gwp = gw.data_ptr<T>();
  // Tasks are taken in blocks of kTaskBlock: for each block, every pixel tile passes once and
  // the block's accumulators (kTaskBlock * 1.5 KB) stay in cache between tiles.
  constexpr int64_t kTaskBlock = 32;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> part(static_cast<size_t>(kTaskBlock * kPart));
    const T* gyr[kGwR];
    mask_t cm[kGwV];
    for (int64_t tb = t0; tb < t1; tb += kTaskBlock) {
      const int64_t te = std::min(t1, tb + kTaskBlock);
      std::fill(part.begin(), part.end(), T(0));
      for (int64_t b0 = 0; b0 < g.B; b0 += imgs_per_tile) {
        const int64_t nb = std::min(imgs_per_tile, g.B - b0);
        for (int64_t bd = 0; bd < nbands; ++bd) {
          for (int64_t t = tb; t < te; ++t) {
            const Task& tk = tasks[t];
            const std::vector<Seg>& segs = pos[tk.pos].band[bd];
            if (segs.empty()) continue;
            for (int r = 0; r < tk.r; ++r) gyr[r] = gyp + b0 * gy_bs + L.filters[tk.row0 + r] * gy_cs;
            for (int v = 0; v < kGwV; ++v) {
              const int64_t rem = tk.cn - v * kLanes;
              cm[v] = rem >= kLanes ? mask_t(0xFFFF) : (rem <= 0 ? mask_t(0) : mask_t((1u << rem) - 1));
            }
            const T* xb = in + pos[tk.pos].x_base + b0 * x_bs + tk.grp * g.Cg + tk.c0;
            ker.gw[tk.r][tk.v](gyr, gy_bs, xb, x_bs, g.C, segs.data(), static_cast<int64_t>(segs.size()), nb, cm,
                               part.data() + (t - tb) * kPart);
          }
        }
      }
      for (int64_t t = tb; t < te; ++t) {
        const Task& tk = tasks[t];
        const T* pt = part.data() + (t - tb) * kPart;
        const int64_t L_ = tk.v * kLanes;
        for (int r = 0; r < tk.r; ++r)
          for (int64_t c = 0; c < tk.cn; ++c) gwp[(tk.row0 + r) * g.Cg + tk.c0 + c] = pt[r * L_ + c];
      }
    }
  });
  return gw;
}

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
DensePolicy dense_policy() {
  if (env_is("STRIPECONV_CPU_DENSE", "never")) return DensePolicy::kNever;
  if (env_is("STRIPECONV_CPU_DENSE", "always")) return DensePolicy::kAlways;
  return DensePolicy::kAuto;
}

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
  if (weight.scalar_type() == at::kDouble) return dense_weight_impl<double>(weight, mask, g);
  return dense_weight_impl<float>(weight, mask, g);
}

at::Tensor dense_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& mask, const Geometry& g) {
  return at::conv2d(input, dense_weight(weight, mask, g), bias, {g.sh, g.sw}, {g.pt, g.pl}, {g.dh, g.dw}, g.G);
}

// ------------------------------------------------------------------------------------------
// Op entry points.

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& stripe_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.forward";
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input [B, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got device ", input.device());
  check_float_dtype(op, "input", input);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype (", weight.scalar_type(),
              ") must match input dtype (", input.scalar_type(), ")");
  Geometry g = check_common(op, input.sizes(), weight, stripe_mask, stride, padding, dilation, groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.N, op, ": bias must be [", g.N, "], got shape ",
                shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype (", bias->scalar_type(),
                ") must match input dtype (", input.scalar_type(), ")");
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got device ", bias->device());
  }
  if (input.scalar_type() == at::kBFloat16) {
    c10::optional<at::Tensor> bf;
    if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat);
    return forward_impl<float>(input.to(at::kFloat), weight.to(at::kFloat), bf, stripe_mask, g).to(at::kBFloat16);
  }
  auto stripe = [&]() {
    if (input.scalar_type() == at::kDouble) return forward_impl<double>(input, weight, bias, stripe_mask, g);
    return forward_impl<float>(input, weight, bias, stripe_mask, g);
  };
  const DensePolicy policy = dense_policy();
  const bool dense_ok = g.pt == g.pb && g.pl == g.pr && g.B > 0 && g.Ho > 0 && g.Wo > 0 && g.Cg > 0 &&
                        static_cast<double>(g.S) >= kDenseDensity * static_cast<double>(g.N * g.P());
  if (policy == DensePolicy::kNever || !dense_ok) return stripe();
  if (policy == DensePolicy::kAlways || is_channels_last(input))
    return dense_forward(input, weight, bias, stripe_mask, g);
  return stripe();
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& stripe_mask,
                      at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.grad_input";
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D grad_output [B, N, Ho, Wo], got ", grad_output.dim(),
              "-D");
  TORCH_CHECK(grad_output.device().is_cpu(), op, ": grad_output must be a CPU tensor, got device ",
              grad_output.device());
  check_float_dtype(op, "grad_output", grad_output);
  TORCH_CHECK(weight.scalar_type() == grad_output.scalar_type(), op, ": weight dtype (", weight.scalar_type(),
              ") must match grad_output dtype (", grad_output.scalar_type(), ")");
  Geometry g = check_common(op, input_shape, weight, stripe_mask, stride, padding, dilation, groups);
  const std::vector<int64_t> expect{g.B, g.N, g.Ho, g.Wo};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), op, ": grad_output must have shape ",
              shape_str(expect), " for input_shape ", shape_str(input_shape), ", got ",
              shape_str(grad_output.sizes()));
  if (grad_output.scalar_type() == at::kBFloat16)
    return grad_input_impl<float>(grad_output.to(at::kFloat), weight.to(at::kFloat), stripe_mask, g)
        .to(at::kBFloat16);
  if (grad_output.scalar_type() == at::kDouble) return grad_input_impl<double>(grad_output, weight, stripe_mask, g);
  return grad_input_impl<float>(grad_output, weight, stripe_mask, g);
}

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& stripe_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  const char* op = "stripeconv_cpu.grad_weight";
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input [B, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D grad_output [B, N, Ho, Wo], got ", grad_output.dim(),
              "-D");
  TORCH_CHECK(input.device().is_cpu() && grad_output.device().is_cpu(), op,
              ": input and grad_output must be CPU tensors, got ", input.device(), " and ", grad_output.device());
  check_float_dtype(op, "input", input);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && weight.scalar_type() == input.scalar_type(), op,
              ": input, grad_output and weight must share a dtype, got ", input.scalar_type(), ", ",
              grad_output.scalar_type(), " and ", weight.scalar_type());
  Geometry g = check_common(op, input.sizes(), weight, stripe_mask, stride, padding, dilation, groups);
  const std::vector<int64_t> expect{g.B, g.N, g.Ho, g.Wo};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), op, ": grad_output must have shape ",
              shape_str(expect), ", got ", shape_str(grad_output.sizes()));
  if (input.scalar_type() == at::kBFloat16)
    return grad_weight_impl<float>(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                                   stripe_mask, g)
        .to(at::kBFloat16);
  if (input.scalar_type() == at::kDouble) return grad_weight_impl<double>(grad_output, input, weight, stripe_mask, g);
  return grad_weight_impl<float>(grad_output, input, weight, stripe_mask, g);
}

}  // namespace
}  // namespace stripeconv_cpu

TORCH_LIBRARY(stripeconv_cpu, m) {
  m.def(
      "forward(Tensor input, Tensor weight, Tensor? bias, Tensor stripe_mask, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
  m.def(
      "grad_input(Tensor grad_output, Tensor weight, Tensor stripe_mask, int[] input_shape, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def(
      "grad_weight(Tensor grad_output, Tensor input, Tensor weight, Tensor stripe_mask, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(stripeconv_cpu, CPU, m) {
  m.impl("forward", &stripeconv_cpu::forward);
  m.impl("grad_input", &stripeconv_cpu::grad_input);
  m.impl("grad_weight", &stripeconv_cpu::grad_weight);
}
