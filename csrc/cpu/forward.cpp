// Forward of the stripe conv: one acc-engine item per position, group and block of output
// channels (the filters that keep the position), weights read in place from the packed rows.
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
// Forward.

template <typename T>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& mask, const Geometry& g) {
  // The output is in the input's memory format, as the op contract says. Stride-1 flat planes
  // may run staged (run_acc_engine_staged): channels_last images transposed one by one in cache
  // (fewer images than threads: band by band), small planes side by side. A strided
  // channels_last input is split into NCHW phase planes directly, any other is transposed as a
  // whole; the NCHW result is then transposed to channels_last.
  const Staging st = plan_staging(input, !g.strided() && g.Wo == g.W, g.Ho == g.H, g.B, g.H * g.W, g.C + g.N,
                                  g.N, weight.numel() * static_cast<int64_t>(weight.element_size()));
  const bool staged = st.staged();
  const int64_t stack = st.stack;
  at::Tensor y = at::empty({g.B, g.N, g.Ho, g.Wo}, input.options().memory_format(st.output_format()));
  if (y.numel() == 0) return y;
  const bool cl_phases = st.channels_last && !staged && g.strided();
  if (st.channels_last && !staged && !cl_phases)
    return to_channels_last<T>(forward_impl<T>(to_nchw<T>(input), weight, bias, mask, g));
  at::Tensor x = st.channels_last ? input : input.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->contiguous();
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());

  at::Tensor phases;
  AccEngine<T> e;
  e.out = y.data_ptr<T>();
  // staged: channel planes of the thread's buffers (a stack of images each), cache_pitch apart
  e.out_cs = staged ? cache_pitch<T>(stack * g.Ho * g.Wo) : g.Ho * g.Wo;
  e.out_bs = g.N * e.out_cs;
  e.hout = g.Ho;
  e.wout = g.Wo;
  e.po = g.Wo;
  e.B = staged ? g.B / stack : g.B;
  e.stack = staged ? stack : 1;
  e.bands = staged ? st.bands : 1;
  e.bias = bias_c.defined() ? bias_c.data_ptr<T>() : nullptr;
  int64_t in_cs;
  if (g.strided()) {
    phases = cl_phases ? split_phases_nhwc<T>(x, g) : split_phases<T>(x, g);
    e.in = phases.data_ptr<T>();
    in_cs = g.Hpm * g.Wpm;
    e.pi = g.Wpm;
  } else {
    e.in = x.data_ptr<T>();
    in_cs = staged ? cache_pitch<T>(stack * g.H * g.W) : g.H * g.W;
    e.pi = g.W;
  }
  e.in_bs = g.C * in_cs;
  e.in_plane = g.strided() ? in_cs : e.stack * g.H * g.W;  // staged: the stack's images, not the padding
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
  const int64_t nsplit = staged ? st.splits : choose_splits(base_tasks, g.N, rows_per_item);
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
  if (staged)
    run_acc_engine_staged(e, ker, x, g.C, y, g.N);
  else
    run_acc_engine(e, ker);
  return cl_phases ? to_channels_last<T>(y) : y;
}

template at::Tensor forward_impl<float>(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, const Geometry&);
template at::Tensor forward_impl<double>(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const Geometry&);

}  // namespace detail
}  // namespace stripeconv_cpu
