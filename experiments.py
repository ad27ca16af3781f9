"""The paper's experiments at small scale (TRELM Sec. 4.5-4.8), run through evaluate.py:

    python evaluate.py --task ablation    # Table 6: trelm vs --no-injection / --no-memory-bank / --no-routing
    python evaluate.py --task injection   # Fig. 3: which entities get knowledge (long-tail, frequent, all, important)
    python evaluate.py --task hparams     # Figs. 7-8: theta, window k (4, 8, 16, 32), beta (1, 2, 3, 4)
    python evaluate.py --task efficiency  # Figs. 4-6: loss and probing score against pre-training wall time
    python evaluate.py --task reproduce   # all of the above + plots.py + REPORT.md

Each variant is pre-trained by pretrain.py into --runs-dir/<variant>-s<seed> (a finished run is reused,
an interrupted one resumes) and scored by probing: the embedded default's probes (--probe mini:
P@1 on facts stated in the corpus ("seen") and on held-out facts, and their gap; relation priors
lift both, so the gap is the evidence of fact learning) or LAMA (--probe lama with --data-dir).
Budget flags (--steps, --seeds, --seq-len, --batch-size) keep the full set within about an hour
on a 2-core CPU; the same commands take --model roberta-base --data DIR on a GPU cluster.
Results: <output-dir>/<task>.json and <output-dir>/<task>.md (a table in the paper's layout).
"""
import json
import os
import statistics

import common

# The score every comparison uses: MRR on seen facts. At minutes of CPU pre-training P@1 is often 0
# for every variant (no signal), while MRR still ranks them; P@1 is reported beside it.
PRIMARY = "seen_MRR"

# (name, pretrain flags); names are shared between tasks so a run is trained once
TRELM = ("trelm", ["--method", "trelm"])
VARIANTS = {
    "ablation": [TRELM,
                 ("trelm_no-injection", ["--method", "trelm", "--no-injection"]),
                 ("trelm_no-memory-bank", ["--method", "trelm", "--no-memory-bank"]),
                 ("trelm_no-routing", ["--method", "trelm", "--no-routing"])],
    "injection": [(f"trelm_inj-{s}", ["--method", "trelm", "--injection", s]) if s != "important" else TRELM
                  for s in ("long-tail", "frequent", "all", "important")],
    "hparams": ([(f"trelm_theta{v}", ["--method", "trelm", "--theta", str(v)]) if v != 0.5 else TRELM
                 for v in (0.25, 0.5, 0.75)]
                + [(f"trelm_k{v}", ["--method", "trelm", "--window-k", str(v)]) if v != 16 else TRELM
                   for v in (4, 8, 16, 32)]
                + [(f"trelm_beta{v}", ["--method", "trelm", "--beta", str(v)]) if v != 2 else TRELM
                   for v in (1, 2, 3, 4)]),
    "efficiency": [("mlm", ["--method", "mlm"]), ("dkplm", ["--method", "dkplm"]), TRELM,
                   ("trelm_no-memory-bank", ["--method", "trelm", "--no-memory-bank"]),
                   ("trelm_no-routing", ["--method", "trelm", "--no-routing"])],
}
# the paper's optimum for each swept hyper-parameter (Figs. 7-8) and the defaults we use
PAPER_PEAKS = {"theta": 0.5, "k": 16, "beta": 2}


def add_args(parser):
    g = parser.add_argument_group("experiments (ablation, injection, hparams, efficiency, reproduce)")
    g.add_argument("--steps", type=int, default=120, help="pre-training steps per variant")
    g.add_argument("--seeds", default="0", help="comma-separated seeds; mean and std are reported")
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--train-batch-size", type=int, default=16)
    g.add_argument("--snapshots", type=int, default=4, help="probed checkpoints per run (efficiency curves)")
    g.add_argument("--runs-dir", default="runs/experiments")
    g.add_argument("--model", default=common.DEFAULT_MODEL, help="initial model of every variant")
    g.add_argument("--data", default="mini", help="pre-training data: mini or DIR")
    g.add_argument("--probe", default="mini", choices=("mini", "lama"), help="the probing score of each run")
    g.add_argument("--figures", default="figures", help="reproduce: where plots.py writes")
    g.add_argument("--pretrain-args", default="--route-every 40",
                   help="extra pretrain.py flags for every variant (quoted); the default lets routing start at "
                        "step 40 (the MiniLM head's warm-up) and re-route once within --steps")
    g.add_argument("--probe-dir", default=None, help="--probe mini: a probes/ folder other than the embedded default's")


def seeds_of(args):
    try:
        return [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2")


def pretrain_variant(args, name, flags, seed):
    """Train (or reuse / resume) one variant; -> its run dir."""
    import pretrain
    run_dir = os.path.join(args.runs_dir, f"{name}-s{seed}")
    if os.path.exists(os.path.join(run_dir, "final", "config.json")):
        return run_dir
    every = max(1, args.steps // max(1, args.snapshots))
    argv = [*flags, "--model", args.model, "--data", args.data, "--output-dir", run_dir, "--seed", str(seed),
            "--max-steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.train_batch_size),
            "--snapshot-every", str(every), "--save-every", str(every), "--log-every", "1", *args.pretrain_args.split()]
    if os.path.exists(os.path.join(run_dir, "checkpoint", "training_state.pt")):
        argv.append("--resume")
    pretrain.main(argv)
    return run_dir


def probe(args, model_dir, out_dir):
    """Probing metrics of one model dir (cached in out_dir)."""
    import evaluate
    task = "mini" if args.probe == "mini" else "lama"
    path = os.path.join(out_dir, f"{task}.json")
    if not os.path.exists(path):
        argv = ["--task", task, "--model-dir", model_dir, "--output-dir", out_dir, "--seed", "0"]
        if args.data_dir:
            argv += ["--data-dir", args.data_dir]
        if args.probe_dir:
            argv += ["--probe-dir", args.probe_dir]
        evaluate.main(argv)
    m = json.load(open(path))["metrics"]
    if task == "mini":
        return {"seen_P@1": m["seen"]["P@1"], "heldout_P@1": m["heldout"]["P@1"], "gap_P@1": m.get("gap_P@1"),
                "seen_MRR": m["seen"]["MRR"], "heldout_MRR": m["heldout"]["MRR"]}
    # --probe lama: "seen" = the macro average over the LAMA corpora (Google-RE and T-REx)
    corpora = [c for c in m.values() if isinstance(c, dict) and "P@1" in c]
    return {"seen_P@1": statistics.fmean(c["P@1"] for c in corpora),
            "seen_MRR": statistics.fmean(c["MRR"] for c in corpora)}


def curve(run_dir, probe_fn):
    """Efficiency curves of one run: loss against wall time, probing score of each snapshot."""
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    at = {r["step"]: r["elapsed"] for r in rows}
    snaps = sorted(d for d in os.listdir(run_dir) if d.startswith("step_"))
    points = []
    for d in snaps:
        step = int(d.split("_")[1])
        points.append({"step": step, "elapsed": at[step], **probe_fn(os.path.join(run_dir, d), d)})
    return {"loss": [{"step": r["step"], "elapsed": r["elapsed"], "loss": r["loss"], "l_mlm": r["l_mlm"],
                      "l_cka": r.get("l_cka"), "l_dec": r.get("l_dec")} for r in rows], "snapshots": points}


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # None: one seed, no spread


def run_variants(args, task):
    """Train and probe every variant of `task` for every seed -> {name: {"seeds": {...}, "mean", "std"}}."""
    out = {}
    for name, flags in VARIANTS[task]:
        per_seed = {}
        for seed in seeds_of(args):
            run_dir = pretrain_variant(args, name, flags, seed)
            per_seed[seed] = probe(args, os.path.join(run_dir, "final"), os.path.join(run_dir, "probe_final"))
        keys = per_seed[next(iter(per_seed))].keys()
        out[name] = {"seeds": per_seed,
                     "mean": {k: mean_std([s[k] for s in per_seed.values()])[0] for k in keys},
                     "std": {k: mean_std([s[k] for s in per_seed.values()])[1] for k in keys},
                     "flags": flags}
    return out


def fmt(mean, std):
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(rows, cols):
    """Markdown table: rows = [(label, {col: (mean, std)})]."""
    head = "| variant | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {label} | " + " | ".join(fmt(*v[c]) for c in cols) + " |\n" for label, v in rows)


def write_task(args, task, metrics, md):
    cfg = {k: v for k, v in vars(args).items() if not callable(v)}
    path = common.write_result(args.output_dir, task, args.model, cfg, seeds_of(args), metrics)
    common.atomic_write(os.path.join(args.output_dir, f"{task}.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)
    return path


def score_rows(res, names_labels):
    cols = ("seen_MRR", "seen_P@1", "heldout_P@1", "gap_P@1")
    return [(label, {c: (res[n]["mean"].get(c), res[n]["std"].get(c)) for c in cols})
            for n, label in names_labels], list(cols)


def run_ablation(args):
    res = run_variants(args, "ablation")
    rows, cols = score_rows(res, [("trelm", "TRELM"), ("trelm_no-injection", "w/o knowledge injection"),
                                  ("trelm_no-memory-bank", "w/o memory bank"),
                                  ("trelm_no-routing", "w/o dynamic knowledge routing")])
    md = ("## Table 6 (ablation), embedded default, x 100 (mean ± std over seeds "
          f"{args.seeds}, {args.steps} steps)\nPaper's claim: every component helps (each row below TRELM).\n\n"
          + table(rows, cols))
    return write_task(args, "ablation", res, md)


def run_injection(args):
    res = run_variants(args, "injection")
    rows, cols = score_rows(res, [("trelm_inj-long-tail", "long-tail only"), ("trelm_inj-frequent", "frequent only"),
                                  ("trelm_inj-all", "all entities"), ("trelm", "important (TRELM)")])
    md = ("## Fig. 3 (injection strategies), x 100\nPaper's claim: long-tail beats frequent, and "
          "important (long-tail ranked by SI) is best.\n\n" + table(rows, cols))
    return write_task(args, "injection", res, md)


def run_hparams(args):
    res = run_variants(args, "hparams")
    sweeps = {"theta": [(0.25, "trelm_theta0.25"), (0.5, "trelm"), (0.75, "trelm_theta0.75")],
              "k": [(4, "trelm_k4"), (8, "trelm_k8"), (16, "trelm"), (32, "trelm_k32")],
              "beta": [(1, "trelm_beta1"), (2, "trelm"), (3, "trelm_beta3"), (4, "trelm_beta4")]}
    metrics = {p: [{"value": v, "run": n, **{f"{k}_mean": res[n]["mean"][k] for k in res[n]["mean"]},
                    **{f"{k}_std": res[n]["std"][k] for k in res[n]["std"]}} for v, n in pts]
               for p, pts in sweeps.items()}
    md = "## Figs. 7-8 (hyper-parameters), seen MRR x 100\n"
    for p, pts in metrics.items():
        md += (f"\n{p} (paper's best: {PAPER_PEAKS[p]}): " +
               ", ".join(f"{x['value']}: {fmt(x[PRIMARY + '_mean'], x[PRIMARY + '_std'])}" for x in pts) + "\n")
    return write_task(args, "hparams", {"sweeps": metrics, "runs": res}, md)


def time_to_reach(points, target):
    """Wall time at which a snapshot curve first reaches `target` (linear interpolation), or None."""
    prev = {"elapsed": 0.0, PRIMARY: None}
    for p in points:
        if p[PRIMARY] is not None and p[PRIMARY] >= target:
            if prev[PRIMARY] is None or p[PRIMARY] == prev[PRIMARY]:
                return p["elapsed"]
            f = (target - prev[PRIMARY]) / (p[PRIMARY] - prev[PRIMARY])
            return prev["elapsed"] + max(0.0, f) * (p["elapsed"] - prev["elapsed"])
        prev = p
    return None


def run_efficiency(args):
    curves = {}
    for name, flags in VARIANTS["efficiency"]:
        curves[name] = {}
        for seed in seeds_of(args):
            run_dir = pretrain_variant(args, name, flags, seed)
            curves[name][seed] = curve(run_dir, lambda d, tag: probe(args, d, os.path.join(run_dir, f"probe_{tag}")))
    ratios = []
    for seed in seeds_of(args):
        dk = curves["dkplm"][seed]["snapshots"]
        target, t_dk = dk[-1][PRIMARY], dk[-1]["elapsed"]
        t_tr = time_to_reach(curves["trelm"][seed]["snapshots"], target)
        ratios.append({"seed": seed, "dkplm_final": target, "dkplm_time": t_dk, "trelm_time": t_tr,
                       "ratio": None if t_tr is None else t_tr / t_dk})
    step_time = {n: statistics.fmean(c[s]["loss"][-1]["elapsed"] / c[s]["loss"][-1]["step"] for s in c)
                 for n, c in curves.items()}
    metrics = {"curves": curves, "time_to_dkplm_final": ratios, "mean_step_s": step_time,
               "step_time_over_mlm": {n: t / step_time["mlm"] for n, t in step_time.items()}}
    def row(x):
        t = "not reached" if x["trelm_time"] is None else f"{x['trelm_time']:.0f}"
        ratio = "n/a" if x["ratio"] is None else f"{x['ratio']:.2f}"
        return f"| {x['seed']} | {100 * x['dkplm_final']:.1f} | {x['dkplm_time']:.0f} | {t} | {ratio} |\n"
    md = ("## Figs. 4-6 (efficiency)\nPaper's claim: TRELM reaches the baseline's quality in at most 50% of its "
          "pre-training time.\n\n| seed | dkplm final seen MRR x 100 | dkplm time (s) | trelm time to reach it (s) "
          "| ratio |\n|---|---|---|---|---|\n" + "".join(row(x) for x in ratios) +
          "\nMean seconds per step: " + ", ".join(f"{n} {t:.2f}" for n, t in step_time.items()) + "\n")
    return write_task(args, "efficiency", metrics, md)


def compare(a, b, sa=0.0, sb=0.0):
    """Verdict on 'a > b' from means and seed spreads. With one seed there is no spread: a difference
    under 10% of the larger score is then called inconclusive rather than a result."""
    if a is None or b is None:
        return "not measured"
    margin = max(sa or 0.0, sb or 0.0)
    why = "within the seed spread"
    if margin == 0.0:
        margin, why = 0.1 * max(abs(a), abs(b)), "under 10% with a single seed"
    if a - b > margin:
        return "held"
    if b - a > margin:
        return "did not hold"
    return f"inconclusive (difference {why})"


def write_report(args):
    """REPORT.md: claim by claim, what was measured at this scale and whether the paper's claim held."""
    res = {t: json.load(open(os.path.join(args.output_dir, f"{t}.json")))["metrics"]
           for t in ("ablation", "injection", "hparams", "efficiency")
           if os.path.exists(os.path.join(args.output_dir, f"{t}.json"))}
    one_seed = len(seeds_of(args)) == 1
    lines = ["# Small-scale reproduction report", "",
             f"Model {args.model}, data {args.data}, {args.steps} steps per run, batch {args.train_batch_size} x "
             f"{args.seq_len} tokens, seeds {args.seeds}, probe {args.probe} (score: MRR x 100 on facts stated in "
             "the corpus; held-out facts are never stated; P@1 beside it in results/*.md). Commit " + common.git_commit() + ".",
             "Spread = std over seeds" + (" (one seed: no spread measured; differences under 10% of the larger "
                                         "score are called inconclusive)." if one_seed else "."),
             "", "| claim (paper) | measured here | verdict |", "|---|---|---|"]

    def m(task, name, key=PRIMARY):
        r = res.get(task, {}).get(name)
        return (None, None) if r is None else (r["mean"].get(key), r["std"].get(key))

    def cell(x):
        return fmt(*x)
    if "efficiency" in res:
        fin = {}
        for name, seeds in res["efficiency"]["curves"].items():
            xs = [s["snapshots"][-1][PRIMARY] for s in seeds.values() if s["snapshots"]]
            fin[name] = mean_std(xs)
        for other in ("dkplm", "mlm"):
            lines.append(f"| TRELM beats {other} on probing (Tables 1-2) | TRELM {cell(fin['trelm'])} vs "
                         f"{other} {cell(fin[other])} | {compare(fin['trelm'][0], fin[other][0], fin['trelm'][1], fin[other][1])} |")
        r = [x["ratio"] for x in res["efficiency"]["time_to_dkplm_final"]]
        got = [x for x in r if x is not None]
        verdict = ("not measured" if not r else "did not hold (TRELM never reached DKPLM's final score)" if not got
                   else "held" if max(got) <= 0.5 else "did not hold")
        lines.append(f"| TRELM needs at most 50% of the pre-training time to reach the baseline (Figs. 4-6) | "
                     f"time ratio per seed: {', '.join('not reached' if x is None else f'{x:.2f}' for x in r)}; "
                     f"step time vs MLM: " + ", ".join(f"{n} {v:.2f}" for n, v in
                                                        res["efficiency"]["step_time_over_mlm"].items()) +
                     f" | {verdict} |")
    if "ablation" in res:
        full = m("ablation", "trelm")
        for name, label in (("trelm_no-injection", "knowledge injection"), ("trelm_no-memory-bank", "memory bank"),
                            ("trelm_no-routing", "dynamic knowledge routing")):
            x = m("ablation", name)
            lines.append(f"| removing {label} hurts (Table 6) | TRELM {cell(full)} vs w/o {cell(x)} | "
                         f"{compare(full[0], x[0], full[1], x[1])} |")
    if "injection" in res:
        lt, fr, imp = m("injection", "trelm_inj-long-tail"), m("injection", "trelm_inj-frequent"), m("injection", "trelm")
        al = m("injection", "trelm_inj-all")
        lines.append(f"| long-tail injection beats frequent (Fig. 3) | {cell(lt)} vs {cell(fr)} | "
                     f"{compare(lt[0], fr[0], lt[1], fr[1])} |")
        best = max((v[0], k) for k, v in (("important", imp), ("long-tail", lt), ("frequent", fr), ("all", al))
                   if v[0] is not None)
        lines.append(f"| important entities are the best choice (Fig. 3) | important {cell(imp)}, all {cell(al)} | "
                     f"{'held' if best[1] == 'important' else 'did not hold (best: ' + best[1] + ')'} |")
    if "hparams" in res:
        for p, pts in res["hparams"]["sweeps"].items():
            at = {x["value"]: x for x in pts if x[PRIMARY + "_mean"] is not None}
            best = max(at.values(), key=lambda x: x[PRIMARY + "_mean"]) if at else None
            paper = at.get(PAPER_PEAKS[p])
            if best is None or paper is None:
                verdict = "not measured"
            elif best["value"] == paper["value"]:
                verdict = "held"
            else:  # the paper's value loses to `best`: by a real margin, or within the noise?
                v = compare(best[PRIMARY + "_mean"], paper[PRIMARY + "_mean"], best[PRIMARY + "_std"], paper[PRIMARY + "_std"])
                verdict = f"did not hold (best here: {best['value']})" if v == "held" else v
            lines.append(f"| {p} peaks at {PAPER_PEAKS[p]} (Figs. 7-8) | " +
                         ", ".join(f"{x['value']}: {cell((x[PRIMARY + '_mean'], x[PRIMARY + '_std']))}" for x in pts) +
                         f" | {verdict} |")
    lines += ["", "Scale caveat: a 6-layer model, a few hundred facts and minutes of CPU pre-training; the paper "
              "used BERT/RoBERTa-base on Wikipedia + Wikidata5M. A verdict here is about this scale only.",
              "Figures: " + args.figures + "/; tables: " + args.output_dir + "/*.md.", ""]
    path = "REPORT.md"
    common.atomic_write(path, lambda tmp: open(tmp, "w").write("\n".join(lines)))
    print("\n".join(lines))
    return path


def run_reproduce(args):
    """The whole small-scale study: every experiment, then the figures, then REPORT.md."""
    for task in ("ablation", "injection", "hparams", "efficiency"):
        TASKS[task](args)
    import plots
    plots.main(["--results", args.output_dir, "--out", args.figures])
    return write_report(args)


TASKS = {"ablation": run_ablation, "injection": run_injection, "hparams": run_hparams, "efficiency": run_efficiency,
         "reproduce": run_reproduce}
