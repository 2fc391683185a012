"""How many budgets conversion should fit the routers at: their own argmax against the export, on grids of
budgets fitted nowhere, straight after conversion (no training; seconds).

    python bench/router_fit_points.py runs/bench-quality/smollm2-T98k-fine/converted.pt \
        runs/bench-quality/toy-T983k/converted.pt --json bench/results/router_fit_points.json

For each converted model (a ``torch.save``d ``LlamaFlexForCausalLM``, as ``bench/quality.py`` keeps in
``<out>/converted.pt``) and each number of fit points: the routers are fitted from the model's one-shot
architectures at the trained budgets and ``search.router_fit_family`` between them; then, on the 10- and
20-budget grids of ``bench/quality.py`` (0.5 to 1), the budgets where the routers' own argmax is not what
``architecture(b)`` exports (off that budget's tolerance, so the search replaces it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.quality_methods import router_pick  # noqa: E402
from modeling_llamaflex.search import fit_routers, router_fit_family  # noqa: E402


def misses(flex0, points: int, grids: list[int]) -> dict:
    flex = copy.deepcopy(flex0)
    trained = {b: flex.architecture(b).indices for b in flex.config.budgets if b < 1}
    matched = fit_routers(flex, router_fit_family(flex.config, points=points, trained=trained))
    low = min(trained)
    grid = sorted({round(low + (1 - low) * i / (n - 1), 6) for n in grids for i in range(n)})
    off = [b for b in grid if router_pick(flex, b).indices != flex.architecture(b).indices]
    return {"fitted": len(matched), "fit_matched": sum(matched.values()), "grid_budgets": len(grid), "misses": off}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("converted", nargs="+", help="converted.pt files (bench/quality.py --out folders keep one)")
    p.add_argument("--points", type=int, nargs="+", default=[41, 161])
    p.add_argument("--grids", type=int, nargs="+", default=[10, 20])
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    out = {}
    for path in args.converted:
        flex0 = torch.load(path, weights_only=False)
        out[path] = {str(n): misses(flex0, n, args.grids) for n in args.points}
        for n, r in out[path].items():
            print(f"{path}: {n} fit points ({r['fit_matched']} of {r['fitted']} matched): routers' own pick off the "
                  f"export at {len(r['misses'])} of {r['grid_budgets']} grid budgets {r['misses']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": "python bench/router_fit_points.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "torch": torch.__version__, "results": out}, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
