// Grad weight of the stripe conv: per position and group, an outer-product GEMM over pixels on
// the input in channels_last phase planes.
#include "impl.h"

#include <algorithm>
#include <vector>

#include "common.h"
#include "layout.h"
#include "microkernels.h"

namespace stripeconv_cpu {
namespace detail {

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

template <typename T>
at::Tensor grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& mask, const Geometry& g) {
  at::Tensor gw = at::zeros({g.S, g.Cg}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0 || g.B == 0 || g.Ho == 0 || g.Wo == 0) return gw;
  // Pixel tiles: whole images when they are small, else bands of rows of one image.
  // A task reads a slice of at most 64 channels of the tile.
  const int64_t slice = std::min<int64_t>(std::max<int64_t>(g.Cg, 16), kGwV * kLanes) * int64_t(sizeof(T));
  const int64_t tile_px = std::max<int64_t>(g.Wo, (192 * 1024) / slice);
  // A channels_last gy is read in place (pixel stride N) when a pixel tile of it stays small:
  // each task then walks whole pixel lines of gy, not its rows' contiguous runs. Against the
  // transpose to NCHW (b64, 2 threads, noisy host): 16 channels 1.14-1.33x, 64 channels
  // 0.86-1.23x (1.14x, 1.23x in two of three runs), 128 (d0.3) 1.13x; 256 channels (786 KB per
  // tile) 0.83-0.90x, so those are still transposed.
  constexpr int64_t kGyTileBytes = 512 * 1024;
  const bool cl = is_channels_last(grad_output);
  const bool gy_cl = cl && tile_px * g.N * int64_t(sizeof(T)) <= kGyTileBytes;
  at::Tensor gy = gy_cl ? grad_output : (cl ? to_nchw<T>(grad_output) : grad_output.contiguous());
  const StripeLists L = build_lists(mask, g);
  const Kernels<T>& ker = kernels<T>(force_generic());

  at::Tensor xt = nhwc_phases<T>(input, g);
  const T* in = xt.data_ptr<T>();
  const int64_t pitch = g.strided() ? g.Wpm : g.W;               // pixels per input row
  const int64_t plane = g.strided() ? g.Hpm * g.Wpm : g.H * g.W;  // pixels per input image
  const int64_t x_bs = plane * g.C, phase_size = g.B * x_bs;
  const int64_t gy_cs = gy_cl ? 1 : g.Ho * g.Wo, gy_ps = gy_cl ? g.N : 1, gy_bs = g.N * g.Ho * g.Wo;
  const T* gyp = gy.data_ptr<T>();

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
            ker.gw[tk.r][tk.v](gyr, gy_bs, gy_ps, xb, x_bs, g.C, segs.data(), static_cast<int64_t>(segs.size()), nb,
                               cm, part.data() + (t - tb) * kPart);
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

template at::Tensor grad_weight_impl<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const Geometry&);
template at::Tensor grad_weight_impl<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const Geometry&);

}  // namespace detail
}  // namespace stripeconv_cpu
