// The acc engine that forward and grad input share: sums of shifted 1x1 convolutions over chunks
// of the output plane, with the border lane masks and the split of output channels into tasks.
// (Overview of the whole CPU backend: ops.cpp.)
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common.h"
#include "layout.h"
#include "microkernels.h"

namespace stripeconv_cpu {
namespace detail {

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
  // Elements readable from the start of every input channel plane the items read (flat path):
  // lets chunks whose reads stay inside it load whole vectors (see FlatSchedule). 0: always mask.
  int64_t in_plane = 0;
  int64_t B = 0;
  // Staged runs only (run_acc_engine_staged): images side by side in one flat plane of each
  // channel; B counts these stacks, and hout, pos, the masks are those of one image.
  int64_t stack = 1;
  // Staged runs of fewer images than threads: each image cut into this many bands of chunks,
  // one band of one split (of split_items) per task (run_bands; 1: whole images).
  int64_t bands = 1;
  const T* bias = nullptr;  // [out channels] or null (zero init)
  std::vector<EnginePos> pos;
  std::vector<std::pair<int64_t, int64_t>> split_range;  // output channels each split initialises
  std::vector<std::vector<Item<T>>> split_items;          // items of each split, by position
  std::vector<std::vector<ListItem<T>>> split_list_items;  // flat path only: multi-position items
};

constexpr int64_t kGroupBytes = 192 * 1024;  // weights of one item group (fits in L2 with the data)

inline bool position_touches_output(const EnginePos& q, int64_t hout, int64_t wout) {
  const int64_t h0 = std::max<int64_t>(0, -q.rq), h1 = std::min(hout, q.hin - q.rq);
  const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(wout, q.win - q.cq);
  return h0 < h1 && w0 < w1;
}

// Sets lanes [a, b) of the lane-mask vectors m (a word at a time: the masks are rebuilt every
// call, and bit by bit they cost more than a small layer's arithmetic).
inline void set_lanes(mask_t* m, int64_t a, int64_t b) {
  while (a < b) {
    const int64_t lo = a % kLanes, hi = std::min<int64_t>(kLanes, lo + (b - a));
    m[a / kLanes] |= mask_t(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    a += hi - lo;
  }
}

// Lane masks of the flat path over `images` planes side by side: st[v] = lanes inside an output
// image, ld[p][v] = lanes whose input at position p lies inside the same input image (so a
// shift never reads a neighbouring image).
inline void build_flat_masks(int64_t hout, int64_t wout, int64_t po, const std::vector<EnginePos>& pos,
                             int64_t images, std::vector<mask_t>& st, std::vector<mask_t>& ld) {
  const int64_t plane = hout * po, npix = images * plane, nvec = ceil_div(npix, kLanes);
  st.assign(nvec, 0);
  ld.assign(pos.size() * nvec, 0);
  for (int64_t row = 0; row < images * hout; ++row) set_lanes(st.data(), row * po, row * po + wout);
  for (size_t p = 0; p < pos.size(); ++p) {
    const EnginePos& q = pos[p];
    mask_t* m = ld.data() + p * nvec;
    const int64_t w0 = std::max<int64_t>(0, -q.cq), w1 = std::min(wout, q.win - q.cq);
    if (w0 >= w1) continue;
    for (int64_t j = 0; j < images; ++j)
      for (int64_t ho = 0; ho < hout; ++ho) {
        const int64_t hi = ho + q.rq;
        if (hi < 0 || hi >= q.hin) continue;
        const int64_t f = j * plane + ho * po;
        set_lanes(m, f + w0, f + w1);
      }
  }
}

inline void tail_masks(int64_t len, mask_t* m) {  // len in (0, kChunk]
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

// The flat path's per-call tables: lane masks and the items of every split cut into groups whose
// weights fit in L2 (~192 KB). A thread runs one group over all of its chunks before the next, so
// large weights stream from L3 once per thread and group rather than once per chunk; the order of
// the sum of each output element (positions in order) does not change.
//
// Unmasked loads: a zero-masked vector load takes a slot of the FMA ports on AVX-512 cores (an
// L1-resident 6x4 tile ran at 84 % of peak with masked loads, 97 % without). A lane masked for
// one call is masked for all of its reduction, so where a chunk's reads at a position stay inside
// the channel planes (every chunk but those at the plane's ends), the call loads whole vectors
// and drops those lanes' sums at the store instead: ld all ones, st = st & ld (`plain`, `st_ld`).
struct FlatSchedule {
  std::vector<mask_t> st, ld;
  std::vector<mask_t> st_ld;    // [position][vector]: st & ld
  std::vector<uint8_t> plain;   // [position][chunk]: reads inside the channel planes
  mask_t ones[kMaxV];
  std::vector<std::vector<size_t>> groups;
  int64_t ngroups = 1, npix = 0, nvec = 0, nchunk = 0;
};

template <typename T>
FlatSchedule flat_schedule(const AccEngine<T>& e) {
  FlatSchedule f;
  build_flat_masks(e.hout, e.wout, e.po, e.pos, e.stack, f.st, f.ld);
  f.npix = e.stack * e.hout * e.po;
  f.nvec = ceil_div(f.npix, kLanes);
  f.nchunk = ceil_div(f.nvec, kMaxV);
  std::fill(f.ones, f.ones + kMaxV, mask_t(0xFFFF));
  f.st_ld.resize(f.ld.size());
  f.plain.assign(e.pos.size() * f.nchunk, 0);
  for (size_t p = 0; p < e.pos.size(); ++p) {
    for (int64_t v = 0; v < f.nvec; ++v) f.st_ld[p * f.nvec + v] = f.st[v] & f.ld[p * f.nvec + v];
    for (int64_t ch = 0; ch < f.nchunk; ++ch) {
      const int64_t lo = ch * kChunk + e.pos[p].rq * e.pi + e.pos[p].cq;
      const int64_t hi = lo + std::min<int64_t>(kMaxV, f.nvec - ch * kMaxV) * kLanes;
      f.plain[p * f.nchunk + ch] = lo >= 0 && hi <= e.in_plane;
    }
  }
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  f.groups.resize(nsplit);
  for (int64_t s = 0; s < nsplit; ++s) {
    f.groups[s].push_back(0);
    int64_t bytes = 0;
    for (size_t i = 0; i < e.split_items[s].size(); ++i) {
      const int64_t wb = e.split_items[s][i].r * e.split_items[s][i].K * static_cast<int64_t>(sizeof(T));
      if (bytes > 0 && bytes + wb > kGroupBytes) {
        f.groups[s].push_back(i);
        bytes = 0;
      }
      bytes += wb;
    }
    f.groups[s].push_back(e.split_items[s].size());
    f.ngroups = std::max<int64_t>(f.ngroups, static_cast<int64_t>(f.groups[s].size()) - 1);
  }
  return f;
}

// Flat-path tasks [t0, t1) (task t: image t / (nsplit * nchunk), then chunk, then split) on the
// images at `in` and `out` (strides e.in_bs, e.out_bs).
template <typename T>
void run_flat_tasks(const AccEngine<T>& e, const Kernels<T>& ker, const FlatSchedule& f, const T* in, T* out,
                    int64_t t0, int64_t t1) {
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  for (int64_t gi = 0; gi < f.ngroups; ++gi) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t % nsplit, ch = (t / nsplit) % f.nchunk, b = t / (nsplit * f.nchunk);
      const int64_t f0 = ch * kChunk, len = std::min<int64_t>(kChunk, f.npix - f0);
      const int64_t nv = std::min<int64_t>(kMaxV, f.nvec - ch * kMaxV);
      T* ob = out + b * e.out_bs + f0;
      if (gi == 0)
        for (int64_t c = e.split_range[s].first; c < e.split_range[s].second; ++c)
          init_out(ob + c * e.out_cs, len, e.bias, c);
      const mask_t* stm = f.st.data() + ch * kMaxV;
      const T* ib = in + b * e.in_bs + f0;
      if (gi + 1 >= static_cast<int64_t>(f.groups[s].size())) continue;
      for (size_t i = f.groups[s][gi]; i < f.groups[s][gi + 1]; ++i) {
        const Item<T>& it = e.split_items[s][i];
        const EnginePos& q = e.pos[it.pos];
        const mask_t* ldm = f.ld.data() + it.pos * f.nvec + ch * kMaxV;
        bool any = false;
        for (int64_t v = 0; v < nv; ++v) any = any || ldm[v] != 0;
        if (!any) continue;
        T* op[kMaxR];
        for (int r = 0; r < it.r; ++r) op[r] = ob + it.outc[r] * e.out_cs;
        const T* src = ib + q.in_off + q.rq * e.pi + q.cq;
        if (f.plain[it.pos * f.nchunk + ch])
          call_acc(ker, it, nv, src, op, f.ones, f.st_ld.data() + it.pos * f.nvec + ch * kMaxV);
        else
          call_acc(ker, it, nv, src, op, ldm, stm);
      }
      if (gi == 0 && static_cast<int64_t>(e.split_list_items.size()) > s) {
        for (const ListItem<T>& it : e.split_list_items[s]) {
          T* op[kMaxR];
          for (int r = 0; r < it.r; ++r) op[r] = ob + it.outc[r] * e.out_cs;
          call_acc_list(ker, it, nv, ib, op, f.ld.data() + ch * kMaxV, stm);
        }
      }
    }
  }
}

template <typename T>
void run_acc_engine(const AccEngine<T>& e, const Kernels<T>& ker) {
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  TORCH_INTERNAL_ASSERT(e.stack == 1, "stacked planes need run_acc_engine_staged");
  if (e.B == 0 || e.hout == 0 || e.wout == 0 || nsplit == 0) return;
  if (e.po == e.pi) {
    // Flat path.
    const FlatSchedule f = flat_schedule(e);
    at::parallel_for(0, e.B * f.nchunk * nsplit, 1,
                     [&](int64_t t0, int64_t t1) { run_flat_tasks(e, ker, f, e.in, e.out, t0, t1); });
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

// Channel pitch (in elements) of the NCHW buffers of run_acc_engine_staged: at least `plane`, a
// whole number of cache lines, and an odd number of them. The micro-kernels read one line of
// every input channel in turn (and write one of every output channel); planes a multiple of
// 4 KB apart (32x32 fp32) would all map to one L1 set and evict each other.
template <typename T>
int64_t cache_pitch(int64_t plane) {
  constexpr int64_t per_line = 64 / static_cast<int64_t>(sizeof(T));
  int64_t lines = ceil_div(plane, per_line);
  if (lines % 2 == 0) ++lines;
  return lines * per_line;
}

// Whether whole images (or stacks of them) per thread balance the threads: at least one each and
// <= 20% idle.
inline bool images_fill_threads(int64_t images) {
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  return images >= threads && 5 * images >= 4 * threads * ceil_div(images, threads);
}

// Images per stack of a staged run: small planes side by side fill the micro-kernel's 128-pixel
// chunks (a 2x2 plane alone uses 4 of 16 lanes, a 4x4 one a single vector per call), in a number
// that divides the batch and leaves every thread whole stacks. 1: no stacking, also where one
// plane already gives calls of >= 4 vectors with >= 80 % of their lanes used (stacking 8x8
// planes only added the copies: 256->256 b64 ran ~15 % slower).
inline int64_t choose_stack(int64_t images, int64_t plane) {
  const int64_t vectors = ceil_div(plane, kLanes);
  if (vectors >= 4 && 5 * plane >= 4 * vectors * kLanes) return 1;
  const int64_t most = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, plane));
  for (int64_t k = std::min(most, images); k > 1; --k)
    if (images % k == 0 && images_fill_threads(images / k)) return k;
  return 1;
}

// How a call runs: staged (run_acc_engine_staged, `stack` images per stack) or on the whole
// tensors (stack 0). Only stride-1 flat planes stage: channels_last tensors whenever whole images
// fill the threads, NCHW ones when small planes stack (input and output planes of one size) or
// when their planes alias in L1 (nchw_planes_alias).
struct Staging {
  bool channels_last = false;
  int64_t stack = 0;
  int64_t bands = 1;   // bands per image (channels_last, fewer images than threads) ...
  int64_t splits = 1;  // ... and output-channel splits where the bands alone leave threads idle
  bool staged() const { return stack > 0; }
  // The result's memory format: the input's, which a staged run writes directly.
  at::MemoryFormat output_format() const {
    return channels_last && staged() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// Whether NCHW planes are better copied into the staged route's padded buffers, image by image.
// A chunk reads the same few lines of every channel plane; planes a multiple of 1 KB apart put
// them into a quarter of the L1 sets or fewer, and from 4 KB up (32x32, 48x48, 64x64 fp32) they
// evict each other (channel pitch 4 KB: an L1-resident 6x4 tile at 71 % of peak, odd lines 97 %).
// Copying then pays (64->64 32x32 b16, 48x48 b8, 64x64 b4, d0.5: 3-14 % faster; 16->16 32x32
// b64: d1 11 %, d0.5 3 %) as long as the image's buffers stay in L2, the weights fit one group
// and there are >= 32 kept multiply-adds per pixel for each channel copied (16->16 at d0.3, 22 of
// them, ran 10 % slower copied). 16x16 planes and 112x112 ones (6 MB of buffers) ran as fast or
// faster in place. Measured on the 2 MB-L2 Xeon. `macs`: kept multiply-adds per output pixel.
inline bool nchw_planes_alias(int64_t plane_bytes, int64_t channels, int64_t macs, int64_t weight_bytes) {
  constexpr int64_t kImageBytes = 2 * 1024 * 1024;
  return plane_bytes >= 4096 && plane_bytes % 1024 == 0 && plane_bytes * channels <= kImageBytes &&
         weight_bytes <= kGroupBytes && macs >= 32 * channels;
}

// `channels`: input plus output channels of one image; `weight_bytes`: the packed weight.
inline Staging plan_staging(const at::Tensor& in, bool flat_stride1, bool same_planes, int64_t images,
                            int64_t plane, int64_t channels, int64_t out_channels, int64_t weight_bytes) {
  Staging s;
  s.channels_last = is_channels_last(in);
  if (!flat_stride1) return s;
  s.stack = same_planes ? choose_stack(images, plane) : 1;
  const int64_t bytes = plane * static_cast<int64_t>(in.element_size());
  const int64_t macs = weight_bytes / static_cast<int64_t>(in.element_size());  // kept stripes x Cg
  const bool restage = s.channels_last || nchw_planes_alias(bytes, channels, macs, weight_bytes);
  if (s.stack == 1 && restage && !images_fill_threads(images) && s.channels_last) {
    // Too few images for whole ones per thread: bands of chunks instead (batch 1 on two threads).
    // Transposing whole tensors around an NCHW run took three parallel regions where this takes one
    // (16->16 32x32, batch 1, 2 threads: ~1.5x the NCHW time).
    const int64_t chunks = ceil_div(plane, kChunk);
    for (int64_t b = 2; b <= chunks && s.bands == 1; ++b)
      if (images_fill_threads(images * b)) s.bands = b;
    s.bands = s.bands > 1 ? s.bands : chunks;
    // Planes of too few chunks (8x8 at batch 1) also split the output channels, as long as each
    // split keeps two register tiles of them; every split's task stages the band's input again.
    for (int64_t k = 2; !images_fill_threads(images * s.bands * s.splits) && out_channels / k >= 2 * kMaxR; ++k)
      s.splits = k;
    if (!images_fill_threads(images * s.bands * s.splits)) s.bands = s.splits = 1;
  }
  if (s.stack == 1 && s.bands * s.splits == 1 && !(restage && images_fill_threads(images))) s.stack = 0;
  return s;
}

// Staged run of channels_last images cut into e.bands bands of whole chunks each, one band of one
// output-channel split per task: the band's input pixels (with the reach of the positions' shifts
// on either side) are transposed into the thread's NCHW buffers, its chunks run, and its output
// pixels (the split's channels) are transposed into the NHWC result. Lanes outside the band may
// read stale buffer contents; their sums are dropped at the store, as for pixels outside the image.
template <typename T>
void run_bands(const AccEngine<T>& e, const Kernels<T>& ker, const FlatSchedule& f, const T* src, int64_t src_bs,
               int64_t in_channels, int64_t in_plane, T* dst, int64_t dst_bs, int64_t out_channels,
               const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(e.stack == 1 && e.po == e.pi);
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  const int64_t in_pitch = e.in_bs / in_channels, bands = std::min(e.bands, f.nchunk);
  int64_t lo = 0, hi = 0;  // reach of the reads: output pixel p reads input pixels p + lo .. p + hi
  for (const EnginePos& q : e.pos) {
    lo = std::min(lo, q.rq * e.pi + q.cq);
    hi = std::max(hi, q.rq * e.pi + q.cq);
  }
  const int64_t threads = at::get_num_threads(), per_thread = e.in_bs + e.out_bs;
  at::Tensor buf = scratch({threads * per_thread}, options);
  const bool simd = simd_transpose<T>();
  at::parallel_for(0, e.B * bands * nsplit, 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads, "thread ", tid, " of ", threads);
    T* in_buf = buf.data_ptr<T>() + tid * per_thread;
    T* out_buf = in_buf + e.in_bs;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t % nsplit, band = (t / nsplit) % bands, b = t / (nsplit * bands);
      const int64_t c0 = f.nchunk * band / bands, c1 = f.nchunk * (band + 1) / bands;
      const int64_t p0 = c0 * kChunk, p1 = std::min(c1 * kChunk, f.npix);
      const int64_t a0 = std::max<int64_t>(0, p0 + lo), a1 = std::min(in_plane, p1 + hi);
      if (a0 < a1)
        transpose_matrix<T>(src + b * src_bs + a0 * in_channels, in_channels, in_buf + a0, in_pitch, a1 - a0,
                            in_channels, simd);
      if (nsplit == 1) {
        run_flat_tasks(e, ker, f, in_buf, out_buf, c0, c1);  // weight groups outermost over the band
      } else {
        for (int64_t ch = c0; ch < c1; ++ch)  // the image's task (ch, s) of the flat path
          run_flat_tasks(e, ker, f, in_buf, out_buf, ch * nsplit + s, ch * nsplit + s + 1);
      }
      const int64_t n0 = e.split_range[s].first, n1 = e.split_range[s].second;
      transpose_matrix<T>(out_buf + n0 * e.out_cs + p0, e.out_cs, dst + b * dst_bs + p0 * out_channels + n0,
                          out_channels, n1 - n0, p1 - p0, simd);
    }
  });
}

// The flat path run stack by stack (e.B stacks of e.stack images) on NCHW buffers: images are
// copied into the buffers side by side (channels_last ones transposed), the engine runs on them
// and the result is copied into place. When the weights fit one L2 group, a task stages one stack
// in its thread's buffers, so for channels_last tensors the layout change stays in cache instead
// of two passes over both whole tensors in memory. Larger weights would then stream from L3 once
// per stack: every stack is staged first, and each thread streams each weight group once over all
// of its stacks, as run_acc_engine does. Stacking small planes fills the vector lanes. The
// engine's strides (e.in_bs, e.out_bs, e.out_cs and the channel offsets of its items) describe
// the buffers: channel planes cache_pitch apart. Needs the flat path (e.po == e.pi), and input
// and output planes of one size when stacking. `in` / `out`: [images, in_channels, ...] /
// [images, out_channels, ...], both channels_last or both contiguous NCHW.
template <typename T>
void run_acc_engine_staged(const AccEngine<T>& e, const Kernels<T>& ker, const at::Tensor& in, int64_t in_channels,
                           const at::Tensor& out, int64_t out_channels) {
  const int64_t nsplit = static_cast<int64_t>(e.split_items.size());
  const int64_t in_plane = in.size(2) * in.size(3), out_plane = e.hout * e.po, k = e.stack;
  const int64_t in_pitch = e.in_bs / in_channels;
  const bool cl = is_channels_last(in);
  TORCH_INTERNAL_ASSERT(e.po == e.pi && nsplit > 0 && in.size(0) == e.B * k && out.size(0) == e.B * k);
  TORCH_INTERNAL_ASSERT(e.out_cs >= k * out_plane && in_pitch >= k * in_plane && (k == 1 || in_plane == out_plane));
  TORCH_INTERNAL_ASSERT(out.size(2) * out.size(3) == out_plane && out.size(1) == out_channels);
  // (is_channels_last is false for tensors whose two layouts coincide, e.g. one output channel)
  const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_INTERNAL_ASSERT(in.is_contiguous(format) && out.is_contiguous(format));
  const T* src = in.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t src_bs = in.stride(0), dst_bs = out.stride(0);
  const bool simd = simd_transpose<T>();
  auto stage_in = [&](int64_t s, T* in_buf) {
    for (int64_t j = 0; j < k; ++j) {
      const T* img = src + (s * k + j) * src_bs;
      if (cl) {
        transpose_matrix<T>(img, in_channels, in_buf + j * in_plane, in_pitch, in_plane, in_channels, simd);
      } else {
        for (int64_t c = 0; c < in_channels; ++c)
          std::copy(img + c * in_plane, img + (c + 1) * in_plane, in_buf + c * in_pitch + j * in_plane);
      }
    }
  };
  auto stage_out = [&](int64_t s, const T* out_buf) {
    for (int64_t j = 0; j < k; ++j) {
      T* img = dst + (s * k + j) * dst_bs;
      if (cl) {
        transpose_matrix<T>(out_buf + j * out_plane, e.out_cs, img, out_channels, out_channels, out_plane, simd);
      } else {
        for (int64_t c = 0; c < out_channels; ++c) {
          const T* o = out_buf + c * e.out_cs + j * out_plane;
          std::copy(o, o + out_plane, img + c * out_plane);
        }
      }
    }
  };
  const FlatSchedule f = flat_schedule(e);
  const int64_t tasks_per_stack = f.nchunk * nsplit;
  if (e.bands * nsplit > 1) {
    run_bands(e, ker, f, src, src_bs, in_channels, in_plane, dst, dst_bs, out_channels, in.options());
    return;
  }
  if (f.ngroups > 1) {
    at::Tensor buf = scratch({e.B * (e.in_bs + e.out_bs)}, in.options());
    T* in_all = buf.data_ptr<T>();
    T* out_all = in_all + e.B * e.in_bs;
    at::parallel_for(0, e.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) stage_in(s, in_all + s * e.in_bs);
    });
    at::parallel_for(0, e.B * tasks_per_stack, 1,
                     [&](int64_t t0, int64_t t1) { run_flat_tasks(e, ker, f, in_all, out_all, t0, t1); });
    at::parallel_for(0, e.B, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) stage_out(s, out_all + s * e.out_bs);
    });
    return;
  }
  const int64_t threads = at::get_num_threads(), per_thread = e.in_bs + e.out_bs;
  at::Tensor buf = scratch({threads * per_thread}, in.options());
  at::parallel_for(0, e.B, 1, [&](int64_t s0, int64_t s1) {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads, "thread ", tid, " of ", threads);
    T* in_buf = buf.data_ptr<T>() + tid * per_thread;
    T* out_buf = in_buf + e.in_bs;
    for (int64_t s = s0; s < s1; ++s) {
      stage_in(s, in_buf);
      run_flat_tasks(e, ker, f, in_buf, out_buf, 0, tasks_per_stack);
      stage_out(s, out_buf);
    }
  });
}

// Number of output-channel splits: enough tasks to keep every thread busy when the batch and
// the plane give few chunks (batch 1), but blocks large enough for the register tiles.
// `rows_per_item` is the mean number of output channels a position (and group) feeds: a split
// must leave about two full register tiles of them, or the micro-kernel runs half-empty tiles
// (at density 0.1, 128 filters give ~13 per position: splitting them 4 ways was slower than
// leaving one thread with less to do).
inline int64_t choose_splits(int64_t base_tasks, int64_t nout, double rows_per_item) {
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

}  // namespace detail
}  // namespace stripeconv_cpu
