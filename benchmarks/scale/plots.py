"""Plots of scale_projection.csv: speed-up against dense Horovod by ranks, one panel a network,
for each model and density (benchmarks/results/scale_<model>_<density>.png)."""
import csv
from collections import defaultdict

from benchmarks.scale.calibrate import RESULTS

STYLE = {"topk": ("tab:red", "x"), "gtopk": ("tab:green", "^"),
         "hierarchical": ("tab:blue", "s"), "auto": ("tab:gray", ".")}


def plot_all():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(RESULTS / "scale_projection.csv") as f:
        rows = list(csv.DictReader(f))
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["density"])].append(r)
    written = []
    for (name, density), grp in sorted(groups.items()):
        nets = sorted({float(r["network_gbit"]) for r in grp})
        fig, axes = plt.subplots(1, len(nets), figsize=(4 * len(nets), 3.4), sharey=True)
        for ax, net in zip(axes, nets):
            for method, (color, marker) in STYLE.items():
                for layout, ls in (("1", "-"), ("8", "--")):
                    pts = sorted((int(r["nodes"]) * int(r["ranks_per_node"]),
                                  float(r["speedup_vs_dense"])) for r in grp
                                 if r["method"] == method and float(r["network_gbit"]) == net
                                 and r["ranks_per_node"] == layout)
                    if pts:
                        ax.plot(*zip(*pts), ls, color=color, marker=marker,
                                label=f"{method} ({'flat' if layout == '1' else 'N x 8'})")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{net:g} Gbit/s")
            ax.set_xlabel("ranks")
        axes[0].set_ylabel("speed-up vs dense Horovod")
        axes[-1].legend(fontsize=6)
        fig.suptitle(f"{name}, density {density} (SimGrid model)")
        fig.tight_layout()
        out = RESULTS / f"scale_{name}_{density}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written
