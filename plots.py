"""Regenerate every figure (TRELM Figs. 3-8, and the subnetwork check) from the results JSON.

    python plots.py [--results results] [--out figures]

Each figure is written as PNG and PDF, drawn to stay readable in greyscale (markers, line styles and
hatches, not colour alone). A figure whose results file is missing is skipped with a message naming
the file and the command that makes it.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import PRIMARY  # noqa: E402  the score the experiments compare (MRR on seen facts)

STYLES = [dict(color="0.0", ls="-", marker="o"), dict(color="0.35", ls="--", marker="s"),
          dict(color="0.55", ls=":", marker="^"), dict(color="0.2", ls="-.", marker="D"),
          dict(color="0.7", ls="-", marker="v")]
HATCHES = ["", "//", "..", "xx", "\\\\"]
LABELS = {"mlm": "MLM (no knowledge)", "dkplm": "DKPLM", "trelm": "TRELM",
          "trelm_no-memory-bank": "TRELM w/o memory bank", "trelm_no-routing": "TRELM w/o routing",
          "trelm_inj-long-tail": "long-tail", "trelm_inj-frequent": "frequent", "trelm_inj-all": "all"}
MAKES = {"injection": "python evaluate.py --task injection", "efficiency": "python evaluate.py --task efficiency",
         "hparams": "python evaluate.py --task hparams", "subnetworks": "python subnetworks.py"}


def load(results, task):
    path = os.path.join(results, f"{task}.json")
    if not os.path.exists(path):
        print(f"skip: {path} not found (made by `{MAKES.get(task, 'evaluate.py --task ' + task)}`)")
        return None
    return json.load(open(path))["metrics"]


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


def fig3(results, out):
    m = load(results, "injection")
    if m is None:
        return
    names = ["trelm_inj-long-tail", "trelm_inj-frequent", "trelm_inj-all", "trelm"]
    labels = ["long-tail", "frequent", "all", "important\n(TRELM)"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, n in enumerate(names):
        ax.bar(i, pct(m[n]["mean"][PRIMARY]), yerr=err(m[n]["std"][PRIMARY]), color="0.85", edgecolor="0",
               hatch=HATCHES[i % len(HATCHES)], capsize=3)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("MRR on seen facts (x 100)")
    ax.set_title("Fig. 3: knowledge injection strategies")
    save(fig, out, "fig3_injection")


def fig4_5_6(results, out):
    m = load(results, "efficiency")
    if m is None:
        return
    curves = m["curves"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (name, seeds) in enumerate(curves.items()):
        c = next(iter(seeds.values()))["loss"]
        st = STYLES[i % len(STYLES)]
        ax.plot([p["elapsed"] for p in c], [p["loss"] for p in c], color=st["color"], ls=st["ls"],
                label=LABELS.get(name, name))
    ax.set_xlabel("pre-training wall time (s)")
    ax.set_ylabel("training loss (Eq. 3)")
    ax.set_title("Fig. 4: loss against pre-training time (first seed)")
    ax.legend(fontsize=8)
    save(fig, out, "fig4_loss_vs_time")

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, (name, seeds) in enumerate(curves.items()):
        s = next(iter(seeds.values()))["snapshots"]
        ax.plot([p["elapsed"] for p in s], [pct(p[PRIMARY]) for p in s], **STYLES[i % len(STYLES)],
                label=LABELS.get(name, name))
    ax.set_xlabel("pre-training wall time (s)")
    ax.set_ylabel("MRR on seen facts (x 100)")
    ax.set_title("Fig. 5: probing score of checkpoints against time")
    ax.legend(fontsize=8)
    save(fig, out, "fig5_score_vs_time")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.4, 1]})
    names = list(m["step_time_over_mlm"])
    a1.barh(range(len(names)), [m["step_time_over_mlm"][n] for n in names], color="0.85", edgecolor="0", hatch="//")
    a1.axvline(1.0, color="0", lw=0.8)
    a1.set_yticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("seconds per step / MLM's")
    a1.set_title("step time (incl. attribution)", fontsize=10)
    r = [x for x in m["time_to_dkplm_final"] if x["ratio"] is not None]
    if r:
        a2.bar(range(len(r)), [x["ratio"] for x in r], color="0.6", edgecolor="0")
        a2.set_xticks(range(len(r)), [f"seed {x['seed']}" for x in r])
        a2.set_ylim(0, max(1.0, max(x["ratio"] for x in r) * 1.1))
    else:
        a2.text(0.5, 0.6, "TRELM did not reach\nDKPLM's final score\nwithin its run", ha="center", va="center",
                transform=a2.transAxes, fontsize=9)
        a2.set_xticks([])
        a2.set_ylim(0, 1.0)
    a2.axhline(0.5, color="0", ls="--", lw=0.8, label="paper's claim (0.5)")
    a2.set_ylabel("time to DKPLM's final score\n/ DKPLM's time", fontsize=8)
    a2.set_title("time to quality", fontsize=10)
    a2.legend(fontsize=7, loc="lower right")
    fig.suptitle("Fig. 6: efficiency", y=1.02)
    fig.tight_layout()
    save(fig, out, "fig6_efficiency")


def sweep(ax, pts, xlabel, paper_best):
    xs = [p["value"] for p in pts]
    ax.errorbar(xs, [pct(p["seen_MRR_mean"]) for p in pts], yerr=[err(p["seen_MRR_std"]) for p in pts],
                color="0", marker="o", capsize=3, label="seen facts")
    ax.errorbar(xs, [pct(p["heldout_MRR_mean"]) for p in pts], yerr=[err(p["heldout_MRR_std"]) for p in pts],
                color="0.5", ls="--", marker="s", capsize=3, label="held-out facts")
    ax.axvline(paper_best, color="0.3", ls=":", lw=1, label="paper's best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MRR (x 100)")
    ax.legend(fontsize=7)


def fig7_8(results, out):
    m = load(results, "hparams")
    if m is None:
        return
    s = m["sweeps"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sweep(ax, s["theta"], r"$\theta$ (Eq. 3 weight of $L_{MLM}$)", 0.5)
    ax.set_title(r"Fig. 7: $\theta$")
    save(fig, out, "fig7_theta")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    sweep(a1, s["k"], "window k (Eq. 4)", 16)
    a1.set_xscale("log", base=2)
    a1.set_xticks([p["value"] for p in s["k"]], [str(p["value"]) for p in s["k"]])
    sweep(a2, s["beta"], r"$\beta$ ($\lambda$ decay, Eq. 8)", 2)
    fig.suptitle(r"Fig. 8: memory window k and $\lambda$ decay $\beta$")
    save(fig, out, "fig8_k_beta")


def fig_subnetworks(results, out):
    """Per layer, Jaccard of the subnetwork's FFN neurons with (a) TRELM's saved paths and (b) IG paths of
    the TargetKG queries (means over seeds), each next to its exact random expectation."""
    m = load(results, "subnetworks")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="figures")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results):
        raise SystemExit(f"--results {args.results}: not a directory (run `python evaluate.py --task reproduce` first)")
    for f in (fig3, fig4_5_6, fig7_8, fig_subnetworks):
        f(args.results, args.out)


if __name__ == "__main__":
    main()
