// Grad input of the stripe conv: the acc engine run backwards (per stride phase), with the
// multi-position list items of the flat path, then the phase planes interleaved.
#include "impl.h"

#include <algorithm>
#include <vector>

#include "common.h"
#include "engine.h"
#include "layout.h"
#include "microkernels.h"

namespace stripeconv_cpu {
namespace detail {

// ------------------------------------------------------------------------------------------
// Grad input.

template <typename T>
at::Tensor grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mask,
                           const Geometry& g) {
  // grad_input is in grad_output's memory format; stride-1 flat planes may run staged, like the
  // forward (see forward_impl). A strided channels_last grad_output's phase planes are
  // interleaved into the channels_last grad_input directly.
  const Staging st = plan_staging(grad_output, !g.strided() && g.W == g.Wo, g.H == g.Ho, g.B, g.H * g.W,
                                  g.C + g.N, g.C, weight.numel() * static_cast<int64_t>(weight.element_size()));
  const bool staged = st.staged();
  const int64_t stack = st.stack;
  const bool cl_phases = st.channels_last && !staged && g.strided();
  const auto gx_format = cl_phases ? at::MemoryFormat::ChannelsLast : st.output_format();
  at::Tensor gx = at::empty({g.B, g.C, g.H, g.W}, grad_output.options().memory_format(gx_format));
  if (gx.numel() == 0) return gx;
  if (g.Ho == 0 || g.Wo == 0 || g.S == 0) return gx.zero_();
  if (st.channels_last && !staged && !cl_phases)
    return to_channels_last<T>(grad_input_impl<T>(to_nchw<T>(grad_output), weight, mask, g));
  at::Tensor gy = cl_phases ? to_nchw<T>(grad_output) : st.channels_last ? grad_output : grad_output.contiguous();
  at::Tensor w = weight.contiguous();
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());
  const T* wp = w.data_ptr<T>();
  const int64_t P = g.P();
  // staged: channel planes of the thread's buffers (a stack of images each), cache_pitch apart
  const int64_t gy_cs = staged ? cache_pitch<T>(stack * g.Ho * g.Wo) : g.Ho * g.Wo;

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
    out_cs = staged ? cache_pitch<T>(stack * g.H * g.W) : g.H * g.W;
    po = g.W;
  }
  phase_size = g.B * g.C * out_cs;

  auto run = [&](const AccEngine<T>& e) {
    if (staged)
      run_acc_engine_staged(e, ker, gy, g.N, gx, g.C);
    else
      run_acc_engine(e, ker);
  };
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
    e.B = staged ? g.B / stack : g.B;
    e.stack = staged ? stack : 1;
    e.bands = staged ? st.bands : 1;
    e.in_plane = e.stack * g.Ho * g.Wo;  // staged: the stack's images, not the padding
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
    const int64_t nsplit = staged ? st.splits : choose_splits(base_tasks, g.C, static_cast<double>(g.Cg));
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
      const int64_t nvec = ceil_div(e.stack * e.hout * e.po, kLanes);  // as in flat_schedule
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
      run(e);
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
    run(e);
  }

  if (cl_phases) {
    // Interleave the phase planes into the channels_last grad_input: per row, a transpose of
    // each phase's pixels into every sw-th pixel.
    T* dst = gx.data_ptr<T>();
    const T* src = phases.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.W * g.C));
    const bool simd = simd_transpose<T>();
    at::parallel_for(0, g.B * g.H, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / g.H, h = t % g.H, pa = h % g.sh, r = h / g.sh;
        for (int64_t pb = 0; pb < g.sw; ++pb)
          transpose_matrix<T>(src + (pa * g.sw + pb) * phase_size + b * g.C * out_cs + r * g.Wpm, out_cs,
                              dst + (t * g.W + pb) * g.C, g.sw * g.C, g.C, g.phase_cols(pb), simd);
      }
    });
  } else if (g.sw == 2) {
    // Interleave the phase planes into grad_input, two phase rows into each row at once (a loop
    // the compiler vectorises, unlike the general one below).
    T* dst = gx.data_ptr<T>();
    const T* src = phases.data_ptr<T>();
    const int64_t nplanes = g.B * g.C, even = g.phase_cols(0), odd = g.phase_cols(1);
    at::parallel_for(0, nplanes, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t bc = t0; bc < t1; ++bc) {
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t pa = h % g.sh, r = h / g.sh;
          const T* p0 = src + 2 * pa * phase_size + bc * out_cs + r * g.Wpm;
          const T* p1 = p0 + phase_size;
          T* d = dst + (bc * g.H + h) * g.W;
          for (int64_t q = 0; q < odd; ++q) {
            d[2 * q] = p0[q];
            d[2 * q + 1] = p1[q];
          }
          if (even > odd) d[2 * odd] = p0[odd];
        }
      }
    });
  } else if (g.strided()) {
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

template at::Tensor grad_input_impl<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Geometry&);
template at::Tensor grad_input_impl<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Geometry&);

}  // namespace detail
}  // namespace stripeconv_cpu
