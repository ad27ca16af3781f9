"""Regenerate every figure (TRELM Figs. 3-8, the frontier, the claims at two scales, and the subnetwork
check) from the results JSON.

    python plots.py [--results results] [--out figures]

Each figure is written as PNG and PDF, drawn to stay readable in greyscale (markers, line styles and
hatches, not colour alone). A figure whose results file is missing is skipped with a message naming
the file and the command that makes it.
"""
import argparse
import json
import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from paper_values import PAPER, PAPER_PEAKS, PRIMARY  # noqa: E402  PRIMARY: the prior-free score the study judges on

STYLES = [dict(color="0.0", ls="-", marker="o"), dict(color="0.35", ls="--", marker="s"),
          dict(color="0.55", ls=":", marker="^"), dict(color="0.2", ls="-.", marker="D"),
          dict(color="0.7", ls="-", marker="v")]
HATCHES = ["", "//", "..", "xx", "\\\\"]
LABELS = {"mlm": "MLM (no knowledge)", "dkplm": "DKPLM", "trelm": "TRELM", "no-memory-bank": "TRELM w/o memory bank",
          "no-routing": "TRELM w/o routing", "inj-long-tail": "long-tail", "inj-frequent": "frequent", "inj-all": "all"}
MAKES = {"ablation": "python evaluate.py --task ablation", "injection": "python evaluate.py --task injection", "efficiency": "python evaluate.py --task efficiency",
         "hparams": "python evaluate.py --task hparams", "subnetworks": "python subnetworks.py",
         "frontier": "python bench.py --costs results/costs.json; python evaluate.py --task frontier",
         "scale_trend": "python evaluate.py --task scale --output-dir results/scale2 (docs/study.md); "
                        "python evaluate.py --task report"}
SCORE_LABEL = "score: seen - held-out MRR (x 100)"


def role_name(doc, role):
    """The variant that plays `role` (trelm, no-routing, inj-all, ...) in a results doc: its "roles" map
    (study_variants.ROLES), or the first study's names (trelm, trelm_<role>) for a doc that has none."""
    if "roles" in doc:
        return doc["roles"][role]
    return role if role in ("mlm", "dkplm", "trelm") else f"trelm_{role}"


def label(doc, name):
    roles = {n: r for r, n in doc.get("roles", {}).items()}
    return LABELS.get(roles.get(name, name), name)


def load(results, task):
    """The results JSON of `task`, or None (with a message) when it is missing or predates the study's
    format (per-seed runs scored by the prior-free PRIMARY)."""
    path = os.path.join(results, f"{task}.json")
    if not os.path.exists(path):
        print(f"skip: {path} not found (made by `{MAKES.get(task, 'evaluate.py --task ' + task)}`)")
        return None
    doc = json.load(open(path))
    if task != "subnetworks" and not all(isinstance(v, dict) and PRIMARY in v.get("mean", {})
                                         for v in doc["metrics"].values()):
        print(f"skip: {path} predates the prior-free score {PRIMARY} (rerun `{MAKES[task]}`)")
        return None
    return doc


def save(fig, out, name):
    os.makedirs(out, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {os.path.join(out, name)}.png/.pdf")


def pct(x):
    return None if x is None else 100 * x


def err(x):
    """Error-bar length: the seed std x 100, or none when a single seed was run."""
    return 0.0 if x is None else 100 * x


def band(curves, x, y, n=60):
    """Mean and std over seeds of y(x) on a common grid: each seed's curve (list of dicts) is linearly
    interpolated on n points where every seed has data. -> (grid, mean, std); std 0 for one seed."""
    curves = [c for c in curves if c]
    grid = np.linspace(max(c[0][x] for c in curves), min(c[-1][x] for c in curves), n)
    ys = np.stack([np.interp(grid, [p[x] for p in c], [p[y] for p in c]) for c in curves])  # (seeds, n)
    return grid, ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(n)


def plot_band(ax, grid, mean, std, style, label):
    ax.plot(grid, mean, color=style["color"], ls=style["ls"], label=label)
    ax.fill_between(grid, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)


def fig3(results, out):
    doc = load(results, "injection")
    if doc is None:
        return
    m = doc["metrics"]
    names = [role_name(doc, r) for r in ("inj-long-tail", "inj-frequent", "inj-all", "trelm")]
    labels = ["long-tail", "frequent", "all", "important\n(TRELM)"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, n in enumerate(names):
        ax.bar(i, pct(m[n]["mean"][PRIMARY]), yerr=err(m[n]["std"][PRIMARY]), color="0.85", edgecolor="0",
               hatch=HATCHES[i % len(HATCHES)], capsize=3)
        seeds = [pct(s[PRIMARY]) for s in m[n]["seeds"].values()]
        ax.plot([i] * len(seeds), seeds, "k.", ms=4)
    ax.axhline(0, color="0", lw=0.6)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(SCORE_LABEL, fontsize=8)
    ax.set_title("Fig. 3: injection strategies (bars: mean ± std, dots: seeds)", fontsize=9)
    save(fig, out, "fig3_injection")


def fig4_5_6(results, out):
    """Figs. 4-6 on the axis the efficiency results were decided on: cost (steps x per-step cost over a
    plain MLM step) or, for the first study's results, in-process seconds."""
    doc = load(results, "efficiency")
    if doc is None:
        return
    eff = doc["efficiency"]
    curves, x, per_step = eff["curves"], eff.get("x", "elapsed"), eff["step_time_over_mlm"]
    xlabel = ("cost: steps x per-step cost over a plain MLM step (results/costs.json)" if x == "cost"
              else "in-process pre-training time (s)")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (name, seeds) in enumerate(curves.items()):
        rows = [[{**r, "cost": r["step"] * per_step[name]} for r in c["loss"]] for c in seeds.values()]
        plot_band(ax, *band(rows, x, "l_mlm"), STYLES[i % len(STYLES)], label(doc, name))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("$L_{MLM}$ (same loss for every method)")
    ax.set_title("Fig. 4: MLM loss against pre-training cost (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, out, "fig4_loss_vs_time")

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (name, seeds) in enumerate(curves.items()):
        snaps = [c["snapshots"] for c in seeds.values()]
        st = STYLES[i % len(STYLES)]
        grid, mean, std = band(snaps, x, PRIMARY, n=20)
        plot_band(ax, grid, 100 * mean, 100 * std, st, label(doc, name))
        for s in snaps:
            ax.plot([p[x] for p in s], [pct(p[PRIMARY]) for p in s], color=st["color"], ls="none",
                    marker=st["marker"], ms=3)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(SCORE_LABEL, fontsize=8)
    ax.set_title("Fig. 5: score of checkpoints against cost (mean ± std; markers: snapshots)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, out, "fig5_score_vs_time")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.4, 1]})
    names = list(per_step)
    a1.barh(range(len(names)), [per_step[n] for n in names], color="0.85", edgecolor="0", hatch="//")
    a1.axvline(1.0, color="0", lw=0.8)
    a1.set_yticks(range(len(names)), [label(doc, n) for n in names], fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("per-step cost / MLM's (bench.py, interleaved)" if x == "cost" else "seconds per step / MLM's (in-process)")
    a1.set_title("step cost (incl. attribution)", fontsize=10)
    modules = eff["time_to_ablation_final"]  # keyed by role, or by name in the first study's results
    groups = {"DKPLM": eff["time_to_dkplm_final"],
              **{f"w/o {w}": modules.get(r, modules.get(f"trelm_{r}", {}))
                 for r, w in (("no-memory-bank", "memory bank"), ("no-routing", "routing"))}}
    if eff.get("mlm_time_to_dkplm_final"):  # the control: a claim plain MLM passes too is no evidence for TRELM
        groups["MLM to DKPLM\n(control)"] = eff["mlm_time_to_dkplm_final"]
    for i, (glabel, ratios) in enumerate(groups.items()):
        r = list(ratios.values())
        if r:
            a2.bar(i, np.mean([x["ratio"] for x in r]), color="0.85", edgecolor="0", hatch=HATCHES[i % len(HATCHES)])
            for x_ in r:  # open markers: not reached, the ratio is only a lower bound
                a2.plot(i, x_["ratio"], "ko" if x_["reached"] else "k^", mfc="0" if x_["reached"] else "1", ms=4)
    a2.set_xticks(range(len(groups)), list(groups), fontsize=8)
    a2.axhline(PAPER["efficiency_ratio"], color="0", ls="--", lw=0.8, label=f"paper's claim vs DKPLM ({PAPER['efficiency_ratio']})")
    a2.axhline(1.0, color="0.5", ls=":", lw=0.8, label="no speed-up (1)")
    a2.set_ylabel(f"TRELM's {'cost' if x == 'cost' else 'time'} to the baseline's\nfinal score / baseline's", fontsize=8)
    a2.set_title("cost to quality (dots: seeds; open: not reached)", fontsize=9)
    top = max([1.0] + [x_["ratio"] for r in groups.values() for x_ in r.values()])
    a2.set_ylim(0, 1.35 * top)  # room for the legend above the bars and the not-reached markers
    a2.legend(fontsize=7, loc="upper left")
    fig.suptitle("Fig. 6: efficiency", y=1.02)
    fig.tight_layout()
    save(fig, out, "fig6_efficiency")


def sweep(ax, pts, xlabel, paper_best):
    xs = [p["value"] for p in pts]
    ax.errorbar(xs, [pct(p[PRIMARY + "_mean"]) for p in pts], yerr=[err(p[PRIMARY + "_std"]) for p in pts],
                color="0", marker="o", capsize=3, label="score (MRR)")
    ax.errorbar(xs, [pct(p["score_P@1_mean"]) for p in pts], yerr=[err(p["score_P@1_std"]) for p in pts],
                color="0.5", ls="--", marker="s", capsize=3, label="score (P@1)")
    ax.axvline(paper_best, color="0.3", ls=":", lw=1, label="paper's best")
    ax.axhline(0, color="0", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seen - held-out (x 100)")
    ax.legend(fontsize=7)


def fig7_8(results, out):
    doc = load(results, "hparams")
    if doc is None:
        return
    s = doc["sweeps"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sweep(ax, s["theta"], r"$\theta$ (Eq. 3 weight of $L_{MLM}$)", PAPER_PEAKS["theta"])
    ax.set_title(r"Fig. 7: $\theta$ (mean ± std over seeds)", fontsize=9)
    save(fig, out, "fig7_theta")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    sweep(a1, s["k"], "window k (Eq. 4)", PAPER_PEAKS["k"])
    a1.set_xscale("log", base=2)
    a1.set_xticks([p["value"] for p in s["k"]], [str(p["value"]) for p in s["k"]])
    sweep(a2, s["beta"], r"$\beta$ ($\lambda$ decay, Eq. 8)", PAPER_PEAKS["beta"])
    fig.suptitle(r"Fig. 8: memory window k and $\lambda$ decay $\beta$ (mean ± std over seeds)")
    save(fig, out, "fig8_k_beta")


def fig_subnetworks(results, out):
    """Per layer, Jaccard of the subnetwork's FFN neurons with (a) TRELM's saved paths and (b) IG paths of
    the TargetKG queries (means over seeds), each next to its exact random expectation."""
    doc = load(results, "subnetworks")
    m = None if doc is None else doc["metrics"]
    if m is None or "overlap" not in m:
        return
    names = {"trelm_paths": "(a) TRELM's saved paths", "ig_paths": "(b) IG paths of TargetKG"}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    top = 0.1
    for i, (key, ov) in enumerate(sorted(m["overlap"].items())):
        layers = ov["per_layer"]
        xs = [p["layer"] for p in layers]
        style = STYLES[i % len(STYLES)]
        ax.plot(xs, [p["jaccard"] for p in layers], **style, label=names.get(key, key))
        ax.plot(xs, [p["expected_jaccard"] for p in layers], color=style["color"], ls=":", marker="x",
                label=f"{names.get(key, key)}: random expectation")
        top = max(top, 1.2 * max(p["jaccard"] for p in layers))
        ax.set_xticks(xs)
    ax.set_ylim(0, top)
    ax.set_xlabel("Transformer layer")
    ax.set_ylabel("Jaccard of FFN neuron sets")
    ax.set_title("Knowledge-critical subnetwork vs knowledge paths")
    ax.legend(fontsize=7)
    save(fig, out, "fig_subnetwork_overlap")


def fig_frontier(results, out):
    """Probe score against cost for every reading of routing (one point per variant, seed std as error
    bars), and the region the paper's efficiency claim predicts for TRELM: DKPLM's final score or more at
    half DKPLM's cost or less."""
    doc = load(results, "frontier")
    if doc is None:
        return
    costs, m = doc["costs"], doc["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = doc["config"]["steps"]
    if "dkplm" in m:  # the region the claim predicts
        dk_cost, dk_score = steps * costs["dkplm"]["cost_over_mlm"], pct(m["dkplm"]["mean"][PRIMARY])
        ax.axvspan(0, PAPER["efficiency_ratio"] * dk_cost, ymin=0, ymax=1, color="0.9", lw=0)
        ax.axhline(dk_score, color="0.6", lw=0.8, ls=":")
        ax.text(0.02, 0.97, f"paper's claim: TRELM at >= DKPLM's score\nfor <= {PAPER['efficiency_ratio']:g} of its "
                "cost (shaded, above the dotted line)", transform=ax.transAxes, va="top", fontsize=7)
    markers = "osD^v<>ph*"
    for i, (name, v) in enumerate(m.items()):
        curves = [c["snapshots"] for c in doc["curves"][name].values()]
        if all(p.get("cost") is not None for c in curves for p in c):  # the snapshots the verdicts read
            grid, mean, _ = band(curves, "cost", PRIMARY, n=20)
            ax.plot(grid, 100 * mean, color="0.0" if name.startswith("trelm") else "0.5", lw=0.6, alpha=0.6)
        x = steps * costs[name]["cost_over_mlm"]
        ax.errorbar([x], [pct(v["mean"][PRIMARY])], yerr=[err(v["std"].get(PRIMARY))], fmt=markers[i % len(markers)],
                    color="0.0" if name.startswith("trelm") else "0.5", capsize=3, label=name)
    ax.set_xlabel(f"cost of the run: steps x per-step cost over a plain MLM step ({steps} steps)")
    ax.set_ylabel(SCORE_LABEL)
    ax.set_xlim(left=0)
    ax.set_title("Readings of routing: final score against the run's cost (mean ± std over seeds);\n"
                 "thin lines: the mean snapshot curves the efficiency verdicts read", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    save(fig, out, "frontier")


def fig_scale_trend(results, out):
    """Each claim at both scales (<results>/scale_trend.json, written by `evaluate.py --task report` from
    frontier.json, efficiency.json and scale2/scale.json: study_report.scale_trend): its effect (seed-paired
    score difference x 100, or mean cost ratio to DKPLM's final) with its 2-SE interval, the null dotted,
    and whether it grows, shrinks or holds in the panel's title; open markers: some seed's ratio is a
    lower bound. Skipped until both scales ran."""
    path = os.path.join(results, "scale_trend.json")
    doc = json.load(open(path)) if os.path.exists(path) else None
    if doc is None or doc["scale1"] is None or doc["scale2"] is None:
        print(f"skip: {path} {'not found' if doc is None else 'lacks a scale'} (made by `{MAKES['scale_trend']}`)")
        return
    rows = [[c for c in doc["claims"] if c["kind"] == kind] for kind in ("diff", "ratio")]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 6), squeeze=False)
    ticks = [f"scale {i}\n{doc[f'scale{i}']['steps']} steps" for i in (1, 2)]
    for row, claims in enumerate(rows):
        sc = 100 if row == 0 else 1
        for j in range(cols):
            ax = axes[row][j]
            if j >= len(claims):
                ax.axis("off")
                continue
            c = claims[j]
            for i, e in enumerate((c["scale1"], c["scale2"])):
                if e is not None:
                    ax.errorbar([i], [sc * e["effect"]], yerr=[0.0 if e["se"] is None else 2 * sc * e["se"]],
                                color="0", marker="o", mfc="1" if e["bounded"] else "0", capsize=4)
            ax.axhline(0.0 if row == 0 else 1.0, color="0.5", ls=":", lw=0.8)
            if row == 1:
                ax.axhline(PAPER["efficiency_ratio"], color="0.3", ls="--", lw=0.8)
            ax.set_xlim(-0.5, 1.5)
            ax.set_xticks([0, 1], ticks, fontsize=7)
            ax.set_title(textwrap.fill(c["claim"], 28) + f"\n[{c['trend']}]", fontsize=7)
            if j == 0:
                ax.set_ylabel("seed-paired difference (x 100)" if row == 0 else
                              "cost to DKPLM's final / DKPLM's\n(dashed: paper's 0.5)", fontsize=7)
    fig.suptitle("The claims at two scales: effect ± 2 SE (dotted: no effect; open: lower bounds in some seeds)",
                 fontsize=9)
    fig.tight_layout()
    save(fig, out, "scale_trend")


def draw_all(results, out):
    """Every figure from the results JSON in `results`, written to `out` (experiments.py's --task report)."""
    if not os.path.isdir(results):
        raise SystemExit(f"--results {results}: not a directory (run `python evaluate.py --task reproduce` first)")
    for f in (fig3, fig4_5_6, fig7_8, fig_frontier, fig_subnetworks, fig_scale_trend):
        f(results, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="figures")
    args = p.parse_args(argv)
    draw_all(args.results, args.out)


if __name__ == "__main__":
    main()
