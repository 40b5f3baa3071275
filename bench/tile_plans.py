"""Host-side view of the Triton forward's tile plans for the GPU benchmark's layers (no GPU needed).

For each layer's filter count and the benchmark's masks (bench_gpu.make_mask, same seeds per
layer), prints and records:

- tile efficiency (kept / computed stripes, best width) of the clustering by pattern or greedy
  growth alone, and of the clustering the backend uses (which adds wider tiles split in turn);
- input tiles the forward loads per pixel block with the tiles of the fewest stripes, one per tile
  and union position, and with those tiles in the subtile forward's groups;
- whether the first forward candidate stores 16-byte vectors into channels_last outputs
  (``aligned``) and whether the tile backward reads dy in place (``runs``), before and after
  the filters are put in ``filter_order`` (what ``stripeconv.reorder_filters`` does to a model);
- the tile backward's entries: (tile, union position) pairs, one x tile loaded per pair by the tile
  grad weight, and the entries by position where offered (one x tile for all the tiles keeping a
  position), with the columns they compute over the pairs' columns (their padding).

    python bench/tile_plans.py --suites vgg16,resnet50,resnet56 --json bench/results/tile_plans.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402  (beside this script: the suites and the masks)

from stripeconv.backends import _tile_clustering, triton_plans as tp  # noqa: E402


def _direct_efficiency(mask: torch.Tensor) -> float:
    """Best tile efficiency over the offered widths with only the sort and the greedy clustering."""
    n = mask.shape[0]
    pat = mask.reshape(n, -1).numpy()
    computed = min(min(_tile_clustering.computed_stripes(pat, tiles, w)
                       for tiles in (_tile_clustering.tiles_sorted(pat, w), _tile_clustering.tiles_greedy(pat, w)))
                   for w in tp.tile_widths(mask))
    return int(mask.sum()) / computed


def _backward_plan(mask: torch.Tensor):
    """The tile backward's plan (a 16-bit layer, 64 input channels), or None where it is not offered."""
    from stripeconv.backends._triton_backward_tiles import backward_tiles

    weight = torch.empty(int(mask.sum()), 64, dtype=torch.bfloat16)
    return backward_tiles(mask, weight, 64, 1, (1, 1), (1, 1, 1, 1), (1, 1), "cpu")


def _backward_runs(mask: torch.Tensor) -> bool:
    """The tile backward reads dy in place: its plan has runs."""
    plan = _backward_plan(mask)
    return plan is not None and plan.fwd.runs


def _backward_entries(mask: torch.Tensor) -> dict:
    """The tile backward's (tile, union position) pairs and its entries by position (0 where not offered),
    with the columns those compute over the pairs' columns."""
    plan = _backward_plan(mask)
    if plan is None:
        return {"tile_entries": 0, "bypos_entries": 0, "bypos_width": 0, "bypos_columns_ratio": None}
    pairs = plan.num_all * plan.fwd.block_n
    return {"tile_entries": plan.num_all, "bypos_entries": plan.num_bypos, "bypos_width": plan.bypos_width,
            "bypos_columns_ratio": plan.num_bypos * plan.bypos_width / pairs if plan.bypos_width else None}


def _input_reads(mask: torch.Tensor) -> tuple[int, int]:
    """Input tiles the forward loads per pixel block and channel block with the plan that computes the
    fewest stripes: one per (tile, union position); and with that plan's tiles grouped by the subtile
    forward, one per (group, union position) (the same where it groups nothing)."""
    plan = min(tp.forward_plans(mask, 1, "cpu"), key=lambda p: p.computed)
    narrow = int(plan.tile_npos.sum())
    if tp.subtile_count(plan, 1) == 1:
        return narrow, narrow
    return narrow, tp.subtile_plan(plan, mask, 1, "cpu").x_reads


def _narrow_efficiency(mask: torch.Tensor, aligned_only: bool = False) -> float:
    """Tile efficiency with the subtile forward's 8-wide tiles where those are offered (aligned ones only:
    stores of 16-byte vectors), else that of the offered widths."""
    plans = [p for p in tp.narrow_plans(mask, 1, "cpu") if p.aligned or not aligned_only]
    computed = min([p.computed for p in plans + list(tp.forward_plans(mask, 1, "cpu"))])
    return int(mask.sum()) / computed


def layer_rows(name: str, n: int, k: int, densities, kinds, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for density in densities:
        for kind in kinds:
            mask = bench_gpu.make_mask(n, k, density, kind, gen)
            if not mask.any():
                continue
            ordered = mask[tp.filter_order(mask)].contiguous()
            reads, reads_grouped = _input_reads(mask)
            rows.append({
                "layer": name, "N": n, "k": k, "mask": kind, "target_density": density,
                "density": mask.float().mean().item(),
                "efficiency_direct": _direct_efficiency(mask),
                "efficiency": tp.best_tile_efficiency(mask),
                "efficiency_reordered": tp.best_tile_efficiency(ordered),
                "efficiency_narrow": _narrow_efficiency(mask),
                "efficiency_narrow_reordered_aligned": _narrow_efficiency(ordered, aligned_only=True),
                "aligned": tp.forward_plans(mask, 1, "cpu")[0].aligned,
                "aligned_reordered": tp.forward_plans(ordered, 1, "cpu")[0].aligned,
                "dy_in_place": _backward_runs(mask),
                "dy_in_place_reordered": _backward_runs(ordered),
                "input_reads": reads, "input_reads_subtiles": reads_grouped,
                **_backward_entries(mask),
            })
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="vgg16,resnet50,resnet56", help=f"comma list of {', '.join(bench_gpu.SUITES)}")
    ap.add_argument("--densities", default="0.7,0.5,0.3,0.2,0.1")
    ap.add_argument("--masks", default="random,realistic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    densities = [float(d) for d in args.densities.split(",")]
    kinds = args.masks.split(",")
    unknown = [s for s in args.suites.split(",") if s not in bench_gpu.SUITES]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(bench_gpu.SUITES)}")
    layers = {}  # one entry per (filters, kernel size): the plans depend on nothing else
    for suite in args.suites.split(","):
        for name, _, _, n, _, k, _, _ in bench_gpu.SUITES[suite]:
            layers.setdefault((n, k), name)
    rows = [row for (n, k), name in layers.items() for row in layer_rows(name, n, k, densities, kinds, args.seed)]
    print(f"{'layer':<16} {'N':>4} {'mask':>9} {'dens':>5} | {'eff direct':>10} {'eff':>6} | "
          f"{'aligned':>7} {'dy in place':>11} | after filter_order: {'aligned':>7} {'dy in place':>11}")
    for r in rows:
        print(f"{r['layer']:<16} {r['N']:>4} {r['mask']:>9} {r['density']:5.2f} | {r['efficiency_direct']:10.3f} "
              f"{r['efficiency']:6.3f} | {str(r['aligned']):>7} {str(r['dy_in_place']):>11} | "
              f"{'':>19} {str(r['aligned_reordered']):>7} {str(r['dy_in_place_reordered']):>11}")
    summary = {}
    for d in densities:
        sel = [r for r in rows if r["target_density"] == d]
        if sel:
            summary[d] = {
                "efficiency_direct": statistics.fmean(r["efficiency_direct"] for r in sel),
                "efficiency": statistics.fmean(r["efficiency"] for r in sel),
                "efficiency_narrow": statistics.fmean(r["efficiency_narrow"] for r in sel),
                "efficiency_narrow_reordered_aligned": statistics.fmean(r["efficiency_narrow_reordered_aligned"]
                                                                         for r in sel),
                "aligned": sum(r["aligned"] for r in sel) / len(sel),
                "aligned_reordered": sum(r["aligned_reordered"] for r in sel) / len(sel),
                "dy_in_place": sum(r["dy_in_place"] for r in sel) / len(sel),
                "dy_in_place_reordered": sum(r["dy_in_place_reordered"] for r in sel) / len(sel),
                "input_reads_ratio": statistics.fmean(r["input_reads"] / r["input_reads_subtiles"] for r in sel),
            }
            bypos = [r for r in sel if r["bypos_width"]]
            summary[d].update(bypos_offered=len(bypos) / len(sel), bypos_entries_ratio=statistics.fmean(
                r["tile_entries"] / r["bypos_entries"] for r in bypos) if bypos else None,
                bypos_columns_ratio=statistics.fmean(r["bypos_columns_ratio"] for r in bypos) if bypos else None)
            s = summary[d]
            print(f"density {d:4.2f}: mean tile efficiency {s['efficiency_direct']:.3f} -> {s['efficiency']:.3f} "
                  f"(with 8-wide subtiles {s['efficiency_narrow']:.3f}; after filter_order, aligned ones "
                  f"{s['efficiency_narrow_reordered_aligned']:.3f}); "
                  f"aligned {s['aligned']:.0%} -> {s['aligned_reordered']:.0%}; dy in place {s['dy_in_place']:.0%} -> "
                  f"{s['dy_in_place_reordered']:.0%}; input tile loads {s['input_reads_ratio']:.1f}x fewer in subtile "
                  f"groups (of {len(sel)} masks)")
            if bypos:
                print(f"              backward by position offered for {s['bypos_offered']:.0%}: "
                      f"{s['bypos_entries_ratio']:.1f}x fewer entries (x tile loads of grad weight), "
                      f"{s['bypos_columns_ratio']:.2f}x the columns")
    results = {"rows": rows, "summary": {str(k): v for k, v in summary.items()},
               "command": "python bench/tile_plans.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
