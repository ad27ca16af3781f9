"""The small-scale study of TRELM's claims (Tables 1-6, Figs. 3-8 of arXiv 2403.11203): its tasks, run
through evaluate.py:

    python evaluate.py --task base        # the base PLM every variant continues from (built once, cached)
    python evaluate.py --task pilot       # seed spread of the score at two budgets -> the --steps to use
    python evaluate.py --task f1-floor    # F1's seed noise against the fine-tuning budget, on the base PLM
    python evaluate.py --task ablation    # Table 6: trelm vs --no-injection / --no-memory-bank / --no-routing
    python evaluate.py --task injection   # Fig. 3: long-tail, frequent, all, important
    python evaluate.py --task hparams     # Figs. 7-8: theta (0.25, 0.5, 0.75), k (4, 8, 16, 32), beta (1-4)
    python evaluate.py --task efficiency  # Figs. 4-6: L_MLM and score against the cost of pre-training
    python evaluate.py --task frontier    # every reading of routing: score against cost
    python evaluate.py --task same-code --against COMMIT   # do runs made at COMMIT still describe this code?
    python evaluate.py --task reproduce   # every task above but same-code, plots.py and REPORT.md (one command)
    python evaluate.py --task report      # plots.py + REPORT.md from the results present (no training)

The study in files: study_variants.py (what is run), study_stats.py (the score and the verdict rule),
study_runs.py (one run: the base PLM, pre-training, probing, fine-tuning, the per-run JSON that is the
unit of resume), study_report.py (REPORT.md), this file (the tasks that combine them). efficiency and
frontier need the cost axis, results/costs.json (`python bench.py --costs results/costs.json`).
Outputs: <output-dir>/<task>.json (metrics.<variant>.seeds.<seed>, mean, std; verdicts), <task>.md. Every
flag and each variant's pretrain.py flags are checked before anything runs (check); a task holds one lock
per results file it writes while it runs (lock_names).
Paths in them (flags, the base PLM's dir, run keys' --data / --model) are recorded as common.portable_path
writes them: relative to the repository (the data root as ../shared/data), so they read the same on every
machine. The paper's values compared against are in paper_values.py.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

import common
import config
import plots
from paper_values import PAPER, PAPER_PEAKS, PRIMARY
from study_report import (COLS, code_checks, code_commit, effect, fmt, header, load_results, table, write_report,
                          write_scale_trend)
from study_runs import (PLATEAU_TOL, base_checkpoint, base_key, finetune_f1, ft_tasks, int_list, plateaued,
                        read_metrics, run_record, run_variants, seeds_of, study_model, variants_of)
from study_stats import (SCALE_CLAIMS, against_mlm, beats_all, cost_note, cost_ratio_range, efficiency_ratios,
                         fmean, ratio_verdict, values, verdict, verdict_text)
from study_variants import (BATCH_SIZE, DKPLM_RELATION, FINETUNED, LAMBDA_EPOCHS, PRETRAIN_ARGS, RANDOM_CONTROLS,
                            READING, READINGS, ROLES, SEQ_LEN, SWEEPS, TRELM, VARIANTS, flag_values)

HERE = os.path.dirname(os.path.abspath(__file__))  # results' relative paths are relative to this repository
REPRODUCED = ("base", "pilot", "f1-floor", "ablation", "efficiency", "injection", "hparams", "frontier", "report")
BY_SEEDS = ("pilot", "ablation", "injection", "hparams", "efficiency", "frontier", "dkplm", "scale")  # one process a seed
PATH_FLAGS = ("data_dir", "base_root", "runs_dir", "output_dir", "probe_dir", "figures", "report",
              "model", "base_model", "data")  # the study's flags that name a file or folder (or a keyword)


def add_args(parser):
    """The study's flags (its shape's defaults come from study_variants.py)."""
    g = parser.add_argument_group("study (base, pilot, f1-floor, ablation, injection, hparams, efficiency, frontier, "
                                  "same-code, reproduce, report)")
    g.add_argument("--steps", type=int, default=300, help="pre-training steps per variant (choose with --task pilot)")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for a verdict)")
    g.add_argument("--variants", default=None, help="comma-separated: only these variants of the task (default: all)")
    g.add_argument("--seq-len", type=int, default=SEQ_LEN)
    g.add_argument("--train-batch-size", type=int, default=BATCH_SIZE)
    g.add_argument("--snapshots", type=int, default=4, help="probed checkpoints per efficiency run")
    g.add_argument("--plateau", type=int, default=4, help="--task dkplm: the plateau runs' --steps multiple (0: none)")
    g.add_argument("--runs-dir", default="runs/experiments")
    g.add_argument("--model", default="base", help="initial model of every variant: 'base' (the base PLM "
                                                    "below, built if missing) or any masked-LM dir / id")
    g.add_argument("--base-model", default=common.DEFAULT_MODEL, help="what the base PLM is trained from")
    g.add_argument("--base-steps", type=int, default=600, help="plain-MLM steps of the base PLM")
    g.add_argument("--base-root", default=None, help="where base-<hash>/ is cached (default: data_cache/)")
    g.add_argument("--data", default="mini", help="pre-training data: mini or DIR")
    g.add_argument("--probe", default="mini", choices=("mini", "lama"),
                   help="mini: the prior-free seen - held-out score; lama: LAMA macro scores (no held-out split)")
    g.add_argument("--probe-dir", default=None, help="--probe mini: a probes/ folder other than the embedded default's")
    g.add_argument("--pretrain-args", default=PRETRAIN_ARGS, help="extra pretrain.py flags for every variant (quoted)")
    g.add_argument("--finetune", default="fewrel,open-entity", help="F1 tasks (comma-separated) or 'none'")
    g.add_argument("--finetune-all", action="store_true", help="fine-tune every variant, not only FINETUNED")
    g.add_argument("--ft-train-limit", type=int, default=1000)
    g.add_argument("--ft-eval-limit", type=int, default=700)
    g.add_argument("--ft-epochs", type=int, default=2)
    g.add_argument("--ft-max-seq-len", type=int, default=64)
    g.add_argument("--floor-budgets", default="1000x2,2000x2",
                   help="f1-floor: fine-tuning budgets ROWSxEPOCHS whose F1 seed noise is measured on the base PLM")
    g.add_argument("--floor-effect", type=float, default=0.015, help="f1-floor: the F1 difference to resolve")
    g.add_argument("--pilot-steps", default="150,300",
                   help="pilot: the two budgets compared (runs at --steps are reused by the study)")
    g.add_argument("--target-effect", type=float, default=0.2, help="pilot: relative difference to resolve")
    g.add_argument("--figures", default="figures", help="reproduce: where plots.py writes")
    g.add_argument("--report", default="REPORT.md", help="reproduce: the report written")
    g.add_argument("--against", default=None, help="same-code: the commit whose runs are checked against this code")
    g.add_argument("--check-variants", default=None,
                   help="same-code: comma-separated variants (default: every variant of the tasks in --output-dir)")
    g.add_argument("--check-steps", type=int, default=4, help="same-code: steps of each deterministic run")


def check(args):
    """The study's flags (evaluate.main calls it before the base PLM is built or any run trains): one line
    naming the flag and the range it must lie in. Every variant the task pre-trains is checked as pretrain.py
    would check it (config.check), with the study's shape and --pretrain-args; the cost axis is present
    where the task needs it (load_costs)."""
    def bad(flag, expected, got):
        raise SystemExit(f"{flag}: expected {expected}, got {got}")
    if any(not 0 <= s < 2 ** 32 for s in seeds_of(args)):
        bad("--seeds", "comma-separated integers in [0, 2**32)", repr(args.seeds))
    for flag, lo, note in (("steps", 1, ""), ("train_batch_size", 1, ""), ("snapshots", 1, ""), ("base_steps", 1, ""),
                           ("ft_train_limit", 0, " (0: all rows)"), ("ft_eval_limit", 0, " (0: all rows)"),
                           ("ft_epochs", 1, ""), ("ft_max_seq_len", 8, " (room for the markers)"),
                           ("check_steps", 1, ""), ("plateau", 0, " (0: no plateau runs)")):
        if getattr(args, flag) < lo:
            bad("--" + flag.replace("_", "-"), f"an integer >= {lo}{note}", getattr(args, flag))
    for flag in ("floor_effect", "target_effect"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) > 0):
            bad("--" + flag.replace("_", "-"), "a finite difference > 0", getattr(args, flag))
    if any(rows < 0 or epochs < 1 for rows, epochs in budget_list(args.floor_budgets)):
        bad("--floor-budgets", "ROWSxEPOCHS with ROWS >= 0 (0: all rows) and EPOCHS >= 1", repr(args.floor_budgets))
    if min(int_list("--pilot-steps", args.pilot_steps)) < 1:
        bad("--pilot-steps", "comma-separated step counts >= 1", repr(args.pilot_steps))
    ft_tasks(args)
    if args.task == "same-code" and not args.against:
        raise SystemExit("--task same-code needs --against COMMIT (the commit the results were made at)")
    model = args.base_model if args.model == "base" else args.model
    shape = ["--model", model, "--seq-len", str(args.seq_len), "--batch-size", str(args.train_batch_size),
             "--max-steps", str(args.steps), *args.pretrain_args.split()]
    for task in REPRODUCED if args.task == "reproduce" else (args.task,):
        if task in ("efficiency", "frontier", "scale"):  # the cost axis (bench.py --costs): refused now, not hours in
            load_costs(args, task)
        for name, flags in variants_of(args, task) if task in VARIANTS else []:
            ns, unknown = config.get_parser().parse_known_args(shape + flags)
            if unknown:
                raise SystemExit(f"--pretrain-args {args.pretrain_args!r}: {unknown} are not pretrain.py flags")
            try:
                config.check(ns)
            except SystemExit as e:
                raise SystemExit(f"--task {task}, variant {name} (its flags with --seq-len, --train-batch-size, "
                                 f"--steps and --pretrain-args): {e}") from None


def lock_names(args):
    """The locks evaluate.main holds in --output-dir while --task runs, one per results file it writes: the
    task's name, with --seeds for the tasks the study runs as one process per seed at once (docs/study.md:
    `--task ablation --seeds 0`, `--seeds 1`, `--seeds 2`, then aggregated); reproduce holds every task's."""
    tasks = ("reproduce", *REPRODUCED) if args.task == "reproduce" else (args.task,)
    return [f"{t}.seeds-{args.seeds}" if t in BY_SEEDS else t for t in tasks]


def write_task(args, task, res, md, **extra):
    """<output-dir>/<task>.json (config, per-seed metrics, mean, std, `extra`) and <task>.md (`md`)."""
    cfg = common.recorded_config(args, PATH_FLAGS)
    metrics = {n: {k: v[k] for k in ("flags", "seeds", "mean", "std")} for n, v in res.items()}
    path = common.write_result(args.output_dir, task, cfg["model"], cfg, seeds_of(args), metrics, **extra)
    common.atomic_write(os.path.join(args.output_dir, f"{task}.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)
    return path


def run_base(args):
    """Build (or reuse) the base PLM; its record goes to <output-dir>/base.json (travels with the results)."""
    if args.model != "base":
        return args.model
    done = os.path.join(args.output_dir, "base.json")
    if os.path.exists(done) and json.load(open(done))["metrics"]["key"] == base_key(args)[0]:
        rec = json.load(open(done))["metrics"]  # recorded already (perhaps on another machine): not rebuilt
        path = os.path.join(HERE, rec["dir"], "run", "final")  # rec["dir"]: relative to the repository
    else:
        path, rec = base_checkpoint(args)
        config = common.recorded_config(args, PATH_FLAGS)
        common.write_result(args.output_dir, "base", config["base_model"], config, 0, rec)
    p = rec["probe"]
    if not plateaued(rec):
        print(f"warning: the base PLM's L_MLM fell {fmt(rec['relative_drop_last_tenth'])}% over its last tenth "
              f"(more than {100 * PLATEAU_TOL:.0f}%, or too few steps to tell): not plateaued; raise --base-steps")
    print(f"base PLM {path}\n  L_MLM {rec['l_mlm_first']:.3f} (step 1) -> {rec['l_mlm_last_tenth']:.3f} "
          f"(mean of the last tenth; the tenth before: {rec['l_mlm_previous_tenth']:.3f})\n  probes: seen P@1 "
          f"{fmt(p.get('seen_P@1'))}, "
          f"held-out P@1 {fmt(p.get('heldout_P@1'))}, score_MRR {fmt(p['score_MRR'])} ± {fmt(p.get('se_MRR'))} (SE)")
    return path


def ablation_claims(res):
    """Table 6's verdicts: TRELM above each ablation on the score and both F1s."""
    t = ROLES["trelm"]
    return {f"{ROLES[r]} < {t} [{k}]": verdict(values(res, t, k), values(res, ROLES[r], k))
            for r in ("no-injection", "no-memory-bank", "no-routing") for k in (PRIMARY, "f1_fewrel", "f1_open-entity")}


def run_ablation(args):
    """Table 6: TRELM against TRELM without injection, without the memory bank, without routing."""
    res = run_variants(args, "ablation")
    labels = [(ROLES["trelm"], "TRELM"), (ROLES["no-injection"], "- knowledge injection"),
              (ROLES["no-memory-bank"], "- memory bank"), (ROLES["no-routing"], "- knowledge routing")]
    md = (header(args, "Table 6 (ablation)") + "Paper's claim: removing any component lowers F1.\n\n" +
          table(res, labels, COLS))
    return write_task(args, "ablation", res, md, verdicts=ablation_claims(res), roles=ROLES)


def injection_claims(res):
    """Fig. 3's verdicts: long-tail beats frequent, important (TRELM) beats all and is the best."""
    t, lt, fr, al = (ROLES[r] for r in ("trelm", "inj-long-tail", "inj-frequent", "inj-all"))
    return {"long-tail > frequent": verdict(values(res, lt, PRIMARY), values(res, fr, PRIMARY)),
            "important > all": verdict(values(res, t, PRIMARY), values(res, al, PRIMARY)),
            "important best": beats_all(values(res, t, PRIMARY), {n: values(res, n, PRIMARY) for n in (lt, fr, al)})}


def run_injection(args):
    """Fig. 3: which entities are injected (long-tail, frequent, all, important)."""
    res = run_variants(args, "injection")
    labels = [(ROLES["inj-long-tail"], "long-tail only"), (ROLES["inj-frequent"], "frequent only"),
              (ROLES["inj-all"], "all entities"), (ROLES["trelm"], "important (TRELM)")]
    md = (header(args, "Fig. 3 (injection strategies)") + "Paper's claim: long-tail beats frequent; important "
          "(long-tail ranked by SI) is best.\n\n" + table(res, labels, COLS[:5]))
    return write_task(args, "injection", res, md, verdicts=injection_claims(res), roles=ROLES)


def run_hparams(args):
    """Figs. 7-8: the theta, k and beta sweeps; each peak claimed by the paper against its neighbours."""
    res = run_variants(args, "hparams")
    sweeps, verdicts = {}, {}
    for p, pts in SWEEPS.items():
        sweeps[p] = [{"value": v, "run": n, **{f"{k}_mean": res[n]["mean"].get(k) for k in ("score_MRR", "score_P@1")},
                      **{f"{k}_std": res[n]["std"].get(k) for k in ("score_MRR", "score_P@1")}} for v, n in pts]
        i = [v for v, _ in pts].index(PAPER_PEAKS[p])
        peak = pts[i][1]
        neighbours = {str(v): values(res, n, PRIMARY) for v, n in pts[max(0, i - 1):i + 2] if n != peak}
        verdicts[f"{p} peaks at {PAPER_PEAKS[p]}"] = beats_all(values(res, peak, PRIMARY), neighbours)
    md = header(args, "Figs. 7-8 (hyper-parameters)")
    for p, pts in sweeps.items():
        md += (f"\n{p} (paper's best: {PAPER_PEAKS[p]}): " +
               ", ".join(f"{x['value']}: {fmt(x[PRIMARY + '_mean'], x[PRIMARY + '_std'])}" for x in pts) + "\n")
    return write_task(args, "hparams", res, md, sweeps=sweeps, verdicts=verdicts, roles=ROLES)


def load_costs(args, task):
    """The cost axis (results/costs.json: bench.py --costs) for every variant of `task`, or one line saying
    what to run."""
    path = os.path.join(args.output_dir, "costs.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no cost axis yet; run `python bench.py --costs {path}` on a quiet machine first")
    costs = json.load(open(path))["costs"]
    missing = [n for n, _ in variants_of(args, task) if n not in costs]
    if missing:
        raise SystemExit(f"{path}: no cost for {missing}; run `python bench.py --costs {path}` again")
    return costs


def cost_claim(res, costs, variant, baseline, claim=PAPER["efficiency_ratio"], label="DKPLM", who="TRELM"):
    """A "cost to reach `baseline`'s final score <= claim x its cost" claim of `variant` on the cost axis:
    (per-seed ratios, verdict judged over the bench's range of the two variants' cost ratio)."""
    ratios = efficiency_ratios(res, baseline, variant=variant, x="cost")
    return ratios, ratio_verdict(ratios, claim=claim, baseline=label, variant=who,
                                 cost=cost_ratio_range(costs, variant, baseline))


def verdict_line(claim, v, scale=1):
    """'- claim: **verdict (and MLM's)** (effect [2 SE], the bench's cost range)', a task's markdown."""
    return f"- {claim}: **{verdict_text(v)}** ({effect(v, scale=scale)}{cost_note(v)})"


def per_seed(ratios):
    """'0.47, > 1.02, ...': a seed's ratio, '>' where it never reached the target (a lower bound)."""
    return ", ".join(f"{'> ' if not r['reached'] else ''}{r['ratio']:.2f}" for r in ratios.values())


def run_efficiency(args):
    """Figs. 4-6 on the cost axis: TRELM's cost to DKPLM's final score (Sec. 4.4), and to the final score
    of TRELM without the memory bank / without routing (Fig. 6: each module speeds convergence). Each claim
    is computed for plain MLM too (a claim MLM passes as well is no evidence for TRELM) and judged over the
    bench's spread of the cost ratio (study_stats.ratio_verdict)."""
    costs = load_costs(args, "efficiency")
    res = with_cost(run_variants(args, "efficiency"), costs)
    t = ROLES["trelm"]
    ratios, rv = cost_claim(res, costs, t, "dkplm")
    mlm_ratios, mlm_rv = cost_claim(res, costs, "mlm", "dkplm", who="plain MLM")
    modules, module_v, mlm_modules, mlm_module_v = {}, {}, {}, {}
    for r in ("no-memory-bank", "no-routing"):
        modules[r], module_v[r] = cost_claim(res, costs, t, ROLES[r], claim=1.0, label=ROLES[r])
        mlm_modules[r], mlm_module_v[r] = cost_claim(res, costs, "mlm", ROLES[r], claim=1.0, label=ROLES[r],
                                                     who="plain MLM")
    eff = {"time_to_dkplm_final": ratios, "ratio_verdict": against_mlm(rv, mlm_rv), "x": "cost",
           "time_to_ablation_final": modules,
           "module_verdicts": {r: against_mlm(v, mlm_module_v[r]) for r, v in module_v.items()},
           "mlm_time_to_dkplm_final": mlm_ratios, "mlm_ratio_verdict": mlm_rv,
           "mlm_time_to_ablation_final": mlm_modules, "mlm_module_verdicts": mlm_module_v,
           "step_time_over_mlm": {n: costs[n]["cost_over_mlm"] for n in res},
           "curves": {n: {s: r["curve"] for s, r in v["records"].items()} for n, v in res.items()}}
    verdicts = {"TRELM cost to DKPLM's final <= 0.5 of DKPLM's": eff["ratio_verdict"],
                "plain MLM cost to DKPLM's final <= 0.5 of DKPLM's (control)": mlm_rv,
                **{f"TRELM cost to {ROLES[r]}'s final < its cost": v for r, v in eff["module_verdicts"].items()},
                **{f"plain MLM cost to {ROLES[r]}'s final < its cost (control)": v for r, v in mlm_module_v.items()}}
    rows = "".join(f"| {s} | {fmt(r['dkplm_final'])} | {r['dkplm_time']:.0f} | "
                   f"{'not reached' if not r['reached'] else format(r['trelm_time'], '.0f')} | "
                   f"{'> ' if not r['reached'] else ''}{r['ratio']:.2f} | "
                   f"{per_seed({s: mlm_ratios[s]}) if s in mlm_ratios else 'n/a'} |\n" for s, r in ratios.items())
    md = (f"## Figs. 4-6 (efficiency)\nReading: {READING}.\nPaper's claim: TRELM reaches DKPLM's quality in at most "
          "50% of its cost. Cost: steps x per-step cost over a plain MLM step (results/costs.json), in MLM steps. "
          "Plain MLM's ratio is the control: a claim MLM passes as well is no evidence for TRELM."
          "\n\n| seed | dkplm final score_MRR x 100 | dkplm cost | trelm cost to reach it | ratio | "
          "plain MLM's ratio |\n"
          "|---|---|---|---|---|---|\n" + rows + "\n" + "\n".join(verdict_line(k, v) for k, v in verdicts.items()) +
          "\n\nPer-step cost over MLM: " + ", ".join(f"{n} {c:.3f}" for n, c in eff["step_time_over_mlm"].items()) +
          "\n\n" + table(res, [(n, n) for n in res], COLS))
    return write_task(args, "efficiency", res, md, efficiency=eff, roles=ROLES, verdicts=verdicts)


def with_cost(res, costs):
    """Every snapshot of every run gets x = "cost": its step x the variant's per-step cost over MLM."""
    for name, v in res.items():
        ratio = costs[name]["cost_over_mlm"]
        for rec in v["records"].values():
            for p in rec["curve"]["snapshots"]:
                p["cost"] = p["step"] * ratio
    return res


def run_frontier(args):
    """Probe score against cost (steps x bench-measured per-step cost over plain MLM) for every reading
    of routing, with the efficiency claims decided on that axis under each reading:
      "TRELM reaches DKPLM's final score in at most half of DKPLM's cost" (Sec. 4.4, Figs. 4-5)
      "routing speeds convergence": the reading reaches TRELM-without-routing's final score at less
      than its cost (Fig. 6).
    Both are computed for plain MLM too (its own verdicts, and beside each reading's: a claim MLM passes as
    well is no evidence for TRELM), and judged over the bench's spread of the cost ratio."""
    costs = load_costs(args, "frontier")
    res = with_cost(run_variants(args, "frontier"), costs)
    routed = [n for n in READINGS if n.startswith("trelm-") and n != "trelm-norouting" and n in res]
    to_dk = "cost to DKPLM's final <= 0.5 of DKPLM's"
    to_nr = "routing speeds convergence (cost to no-routing's final < its cost)"
    ratio, speed = {}, {}  # variant -> (per-seed ratios, verdict)
    for n in [v for v, _ in variants_of(args, "frontier")]:
        who = "plain MLM" if n == "mlm" else "TRELM"
        if (n.startswith("trelm") or n == "mlm") and "dkplm" in res:
            ratio[n] = cost_claim(res, costs, n, "dkplm", who=who)
        if (n in routed or n == "mlm") and "trelm-norouting" in res:
            speed[n] = cost_claim(res, costs, n, "trelm-norouting", claim=1.0, label="TRELM without routing", who=who)
    verdicts, rows = {}, []
    for n in [v for v, _ in variants_of(args, "frontier")]:
        c = costs[n]
        if n == "mlm":
            if n in ratio:
                verdicts[f"mlm (control): {to_dk}"] = ratio[n][1]
            if n in speed:
                verdicts["mlm (control): cost to no-routing's final < its cost"] = speed[n][1]
        else:
            if n in ratio:
                v = ratio[n][1]
                verdicts[f"{n} ({READINGS[n]}): {to_dk}"] = against_mlm(v, ratio["mlm"][1]) if "mlm" in ratio else v
            if n in speed:
                v = speed[n][1]
                verdicts[f"{n} ({READINGS[n]}): {to_nr}"] = against_mlm(v, speed["mlm"][1]) if "mlm" in speed else v
        m, sd = res[n]["mean"], res[n]["std"]
        per = ratio[n][0] if n in ratio else None
        mean_ratio = statistics.fmean(r["ratio"] for r in per.values()) if per else None
        rows.append(f"| {n} | {READINGS[n]} | {100 * c['trainable_share']:.1f}% | {c['cost_over_mlm']:.3f} "
                    f"[{c['spread'][0]:.2f}, {c['spread'][1]:.2f}] | {c['flops_over_mlm']:.3f} | "
                    f"{args.steps * c['cost_over_mlm']:.0f} | {fmt(m.get(PRIMARY), sd.get(PRIMARY))} | "
                    f"{fmt(m.get('final_l_mlm'), sd.get('final_l_mlm'), scale=1)} | "
                    f"{'' if mean_ratio is None else format(mean_ratio, '.2f')} |")
    lines = [f"- {k}: **{verdict_text(v)}**" + ("" if v.get("diff") is None else f" (mean margin {v['diff']:.2f}"
                                                 f"{cost_note(v)})") for k, v in verdicts.items()]
    for a, n in RANDOM_CONTROLS.items():  # does attribution matter: its paths against random ones
        if a in res and n in res:
            k = f"{a} ({READINGS[a]}): its paths probe better than random ones ({n})"
            verdicts[k] = verdict(values(res, a, PRIMARY), values(res, n, PRIMARY))
            lines.append(f"- {k}: **{verdicts[k]['verdict']}** ({effect(verdicts[k])} score points)")
    md = ("## Frontier: probe score against cost, every reading of routing\n"
          f"Cost = steps x the variant's per-step cost over a plain MLM step (results/costs.json: bench.py "
          f"interleaved in one process; per-batch variants include their attribution, every-100 variants its "
          f"amortised share), in MLM-step units; FLOPs: counted matmul FLOPs, the same ratio. {args.steps} steps, "
          f"seeds {args.seeds}, Eq. 8 over {LAMBDA_EPOCHS} counted epochs for every TRELM variant. Every cost "
          "verdict is judged at both ends of the bench's range of the two variants' cost ratio (a label that "
          "changes within it is inconclusive), and computed for plain MLM as well (mlm's row: the control).\n\n"
          "| variant | reading | trains | cost / MLM step | FLOPs / MLM step | run cost | score_MRR x 100 | "
          "final L_MLM | cost to DKPLM's final / DKPLM's |\n|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n\n" + "\n".join(lines) + "\n")
    return write_task(args, "frontier", res, md, verdicts=verdicts, costs=costs,
                      curves={n: {s: r["curve"] for s, r in v["records"].items()} for n, v in res.items()})


def run_dkplm(args):
    """Why our DKPLM learned facts slower than plain MLM (docs/departures.md, "DKPLM baseline"): each reading of
    DKPLM against the study's DKPLM before issue 33 (DKPLM_RELATION: one flag changed at a time), DKPLM as fixed
    (two of them together), and DKPLM and MLM trained 4x as long (DKPLM's own plateau): does DKPLM still learn
    from N to 4N steps, does MLM, and does the MLM - DKPLM gap narrow (seed-paired: the gap of each seed at N
    against the same seed's at 4N)."""
    res = run_variants(args, "dkplm")
    n4 = args.plateau * args.steps
    long = run_variants(args, "dkplm-plateau", steps=n4) if n4 else {}
    old, dk = DKPLM_RELATION[0], ROLES["dkplm"]
    score = lambda r, n: values(r, n, PRIMARY)
    verdicts = {f"{n} probes better than {old}": verdict(score(res, n), score(res, old)) for n in res if n != old}
    if {"mlm", dk} <= set(res):
        verdicts[f"mlm probes better than {dk}"] = verdict(score(res, "mlm"), score(res, dk))
    if {"mlm", dk} <= set(long):
        verdicts[f"mlm probes better than {dk} at {n4} steps"] = verdict(score(long, "mlm"), score(long, dk))
    for n in ("mlm", dk):
        if n in res and n in long:
            verdicts[f"{n} probes better at {n4} steps than at {args.steps}"] = verdict(score(long, n), score(res, n))
    if {"mlm", dk} <= set(res) & set(long):
        gap = lambda r: {s: x - score(r, dk)[s] for s, x in score(r, "mlm").items()
                         if x is not None and score(r, dk).get(s) is not None}
        verdicts[f"the mlm - {dk} gap narrows from {args.steps} to {n4} steps"] = verdict(gap(res), gap(long))
    base = flag_values(DKPLM_RELATION[1])

    def changes(n):  # the flags a reading sets otherwise than DKPLM_RELATION
        f = flag_values(res[n]["flags"])
        return "(the base)" if n == old else " ".join(k if v is None else f"{k} {v}" for k, v in f.items()
                                                      if base.get(k, "absent") != v)
    rows = []
    for n, v in res.items():
        vs = verdicts.get(f"{n} probes better than {old}")
        rows.append(f"| {n} | `{changes(n)}` | {fmt(v['mean'].get(PRIMARY), v['std'].get(PRIMARY))} | "
                    f"{fmt(v['mean'].get('seen_MRR'))} | {fmt(v['mean'].get('heldout_MRR'))} | "
                    + ("n/a | base |" if vs is None else f"{effect(vs)} | {vs['verdict']} |"))
    md = (header(args, "Our DKPLM, reading by reading") + f"Each reading changes flags of `{old}` (the study's DKPLM "
          f"before issue 33: `{' '.join(DKPLM_RELATION[1])}`); `{dk}` is DKPLM as fixed "
          "(study_variants.VARIANTS['dkplm']); effect = its score - the base's, seed-paired [± 2 SE], verdicts by "
          f"the study's rule.\n\n| variant | changes | score_MRR | seen MRR | held-out MRR | effect vs {old} | "
          "verdict |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
          + "\n".join(f"- {k}: **{v['verdict']}** ({effect(v)})" for k, v in verdicts.items()
                      if k.startswith("mlm probes better than") and "steps" not in k)
          + f"\n\n### The plateau: {n4} steps ({args.plateau}x)\n\n"
          + (table(long, [(n, n) for n in long], COLS[:5]) if long else "Not run (`--plateau 0`).") + "\n"
          + "\n".join(f"- {k}: **{v['verdict']}** ({effect(v)})" for k, v in verdicts.items()
                      if "steps" in k) + "\n")
    return write_task(args, "dkplm", res, md, verdicts=verdicts,
                      plateau={n: {k: v[k] for k in ("flags", "seeds", "mean", "std")} for n, v in long.items()},
                      plateau_steps=n4)


def run_scale(args):
    """The claims at a second scale (study_variants.SCALE2: --data the 4x folder, --steps and --base-steps 4x,
    the cost axis of that data in <output-dir>/costs.json; REPORT.md reads it from results/scale2/): the
    claims of study_stats.SCALE_CLAIMS, the same ones REPORT.md's trend compares with the first scale:
    injection + CKA + memory (TRELM without routing against MLM), routing (TRELM against TRELM without
    routing), attribution (against random neurons held as long), TRELM against DKPLM, each a seed-paired
    difference [± 2 SE]; and the cost to DKPLM's final score of TRELM, TRELM without routing and plain MLM
    (a claim MLM passes too is no evidence for TRELM), judged over the bench's spread."""
    costs = load_costs(args, "scale")
    res = with_cost(run_variants(args, "scale"), costs)
    verdicts, ratios = {}, {}
    for claim, kind, a, b in SCALE_CLAIMS:
        if kind == "diff":
            verdicts[claim] = verdict(values(res, a, PRIMARY), values(res, b, PRIMARY))
        elif a in res and b in res:
            ratios[a], verdicts[f"{a}: cost to DKPLM's final <= 0.5 of DKPLM's"] = cost_claim(
                res, costs, a, b, who="plain MLM" if a == "mlm" else "TRELM")
    if "mlm" in ratios:
        mlm_v = verdicts["mlm: cost to DKPLM's final <= 0.5 of DKPLM's"]
        verdicts.update({k: against_mlm(v, mlm_v) for k, v in verdicts.items()
                         if k.endswith("of DKPLM's") and not k.startswith("mlm:")})
    se = {n: v["mean"].get("se_MRR") for n, v in res.items()}
    md = (header(args, "The claims at a second scale") + f"Data: {args.data}; probe-set SE of one run's score "
          f"(x 100, the probes' resolution): " + ", ".join(f"{n} {fmt(x)}" for n, x in se.items()) + ".\n\n"
          + table(res, [(n, n) for n in res], COLS[:5]) + "\n"
          + "".join(f"- cost to DKPLM's final / DKPLM's, {n}: {per_seed(r)} per seed\n" for n, r in ratios.items())
          + "\n" + "\n".join(verdict_line(k, v, scale=1 if k.endswith("of DKPLM's") else 100)
                              for k, v in verdicts.items()) + "\n")
    return write_task(args, "scale", res, md, verdicts=verdicts, costs=costs, efficiency=ratios,
                      curves={n: {s: r["curve"] for s, r in v["records"].items()} for n, v in res.items()})


def run_pilot(args):
    """Seed spread of the score for trelm and mlm at two budgets; the --steps that resolves a
    --target-effect relative difference with the given seeds, and the full study's estimated time."""
    seeds = seeds_of(args)
    budgets, rows = int_list("--pilot-steps", args.pilot_steps), {}
    for steps in budgets:
        res = run_variants(args, "pilot", steps=steps)
        d = verdict(values(res, TRELM[0], PRIMARY), values(res, "mlm", PRIMARY))
        sd_diff = None if d.get("se") is None else d["se"] * math.sqrt(d["n"])
        ref = res["mlm"]["mean"][PRIMARY]
        # seeds needed so that 2 SE of the paired difference is below target * |baseline score|
        need = (None if sd_diff is None or ref is None or ref <= 0
                else max(2, math.ceil((2 * sd_diff / (args.target_effect * ref)) ** 2)))
        run_s = {n: fmean(r["train"]["seconds"] for r in v["records"].values()) for n, v in res.items()}
        rows[steps] = {"mean": {n: v["mean"][PRIMARY] for n, v in res.items()},
                       "std": {n: v["std"][PRIMARY] for n, v in res.items()},
                       "probe_se": {n: v["mean"].get("se_MRR") for n, v in res.items()},
                       "paired_diff": d, "sd_paired_diff": sd_diff, "seeds_needed": need,
                       "s_per_step": {n: v["mean"]["s_per_step"] for n, v in res.items()}, "train_seconds": run_s}
    ok = [b for b in budgets if rows[b]["seeds_needed"] is not None and rows[b]["seeds_needed"] <= len(seeds)]
    best = min(ok) if ok else min(budgets, key=lambda b: rows[b]["seeds_needed"] or math.inf)
    rec = {"steps": best, "resolves": bool(ok), "seeds": len(seeds), "seeds_needed": rows[best]["seeds_needed"]}
    # the full study's time: every distinct variant x seed at the recommended budget (dkplm timed as mlm),
    # one probe per run and per efficiency snapshot, F1 runs timed on one trelm run
    model, model_id = study_model(args)
    timed = run_record(args, *TRELM, seeds[0], max(budgets), model, model_id, want_ft=True)
    ft_s = sum(v["seconds"] for v in timed.get("finetune", {}).values())
    names = {n for t in ("ablation", "injection", "hparams", "efficiency") for n, _ in VARIANTS[t]}
    per_step = {n: rows[best]["s_per_step"]["mlm" if n in ("mlm", "dkplm") else TRELM[0]] for n in names}
    probes = len(names) + len(VARIANTS["efficiency"]) * args.snapshots
    finetuned = len(FINETUNED) if not args.finetune_all else len(names)
    rec["estimate_seconds"] = {"pretrain": sum(per_step.values()) * best * len(seeds),
                               "probe": probes * len(seeds) * timed["probe_seconds"],
                               "finetune": finetuned * len(seeds) * ft_s}
    rec["estimated_hours"] = sum(rec["estimate_seconds"].values()) / 3600
    md = (f"## Pilot: seed spread of {PRIMARY} (x 100), seeds {args.seeds}\n\n| steps | mlm | trelm | probe-set SE "
          "(trelm) | trelm - mlm (paired) | seeds for a {:.0%} difference | s/step mlm, trelm |\n"
          "|---|---|---|---|---|---|---|\n".format(args.target_effect) +
          "".join(f"| {b} | {fmt(r['mean']['mlm'], r['std']['mlm'])} | "
                  f"{fmt(r['mean'][TRELM[0]], r['std'][TRELM[0]])} | {fmt(r['probe_se'][TRELM[0]])} | "
                  f"{fmt(r['paired_diff'].get('diff'))} ± {fmt(r['paired_diff'].get('se'))} | "
                  f"{r['seeds_needed'] or 'n/a (mlm score <= 0 or one seed)'} | "
                  f"{r['s_per_step']['mlm']:.2f}, {r['s_per_step'][TRELM[0]]:.2f} |\n" for b, r in rows.items()) +
          f"\nRecommended: --steps {best} " + ("(resolves a {:.0%} difference with {} seeds)".format(
              args.target_effect, len(seeds)) if ok else f"(no budget resolves it with {len(seeds)} seeds: needs "
              f"{rows[best]['seeds_needed'] or 'a positive baseline score'}; raise --seeds or the budget)") +
          f". Estimated time of the full `--task reproduce` at that budget on this machine (in-process times "
          f"measured here): {rec['estimated_hours']:.1f} h for {len(names)} variants x {len(seeds)} seeds ("
          + ", ".join(f"{k} {v / 3600:.1f} h" for k, v in rec["estimate_seconds"].items()) + ").\n")
    config = common.recorded_config(args, PATH_FLAGS)
    path = common.write_result(args.output_dir, "pilot", config["model"], config, seeds,
                               {str(b): r for b, r in rows.items()}, recommendation=rec)
    common.atomic_write(os.path.join(args.output_dir, "pilot.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)
    return path


def budget_list(value):
    """--floor-budgets "1000x2,2000x2" -> [(1000, 2), (2000, 2)], or one line naming the bad entry."""
    out = []
    for b in value.split(","):
        try:
            rows, epochs = (int(x) for x in b.strip().split("x"))
        except ValueError:
            raise SystemExit(f"--floor-budgets: {b!r} is not ROWSxEPOCHS (e.g. 1000x2)")
        out.append((rows, epochs))
    return out


def run_f1_floor(args):
    """F1's noise floor against the fine-tuning budget, on the base PLM (no pre-training seed: the floor
    under any variant's F1 noise). Per budget (--floor-budgets ROWSxEPOCHS) and F1 task, --seeds fine-tuning
    runs; sigma = their F1 std. Two variants' seed-paired difference then has std sigma sqrt 2 (independent
    runs), so n seeds resolve, by the paired rule (mean > 2 SE), differences of 2 sigma sqrt(2 / n) or more,
    and --floor-effect needs n >= 8 (sigma / effect)^2 seeds. Recommended: the cheapest budget whose every
    task resolves --floor-effect with the study's seeds; its F1 time for the study (FINETUNED x seeds x
    tasks) beside it. Each fine-tuning run is recorded as it ends (results/f1_floor.json), so an
    interrupted run continues."""
    seeds, tasks, budgets = seeds_of(args), ft_tasks(args), budget_list(args.floor_budgets)
    if len(seeds) < 2 or not tasks:
        raise SystemExit("--task f1-floor needs >= 2 --seeds and an F1 task (--finetune)")
    model = study_model(args)[0]  # the base PLM is built only if a fine-tuning run is not recorded yet
    path = os.path.join(args.output_dir, "f1_floor.json")
    config = common.recorded_config(args, PATH_FLAGS)
    same = ("model", "base_model", "base_steps", "data_dir", "ft_eval_limit", "ft_max_seq_len")
    prior = json.load(open(path)) if os.path.exists(path) else None
    if prior is not None and any(prior["config"].get(k) != config.get(k) for k in same):
        print(f"{path}: made with other settings ({ {k: prior['config'].get(k) for k in same} }); "
              "measuring again")
        prior = None
    done = prior["runs"] if prior else {}
    rows = {}
    for rows_, epochs in budgets:
        b = f"{rows_}x{epochs}"
        ft = argparse.Namespace(**{**vars(args), "ft_train_limit": rows_, "ft_epochs": epochs})
        for t in tasks:
            for s in seeds:
                k = f"{b}/{t}/{s}"
                if k not in done:
                    out_dir = os.path.join(args.runs_dir, "f1_floor", b, f"{t}_s{s}")
                    done[k] = finetune_f1(ft, model(), out_dir, t, s)
                    common.write_result(args.output_dir, "f1_floor", config["model"], config, seeds, {}, runs=done)
            f1 = [done[f"{b}/{t}/{s}"]["f1"] for s in seeds]
            sigma = statistics.stdev(f1)
            rows[f"{b}/{t}"] = {"rows": rows_, "epochs": epochs, "task": t, "f1_mean": fmean(f1), "sigma": sigma,
                                "resolves_with_n": 2 * sigma * math.sqrt(2 / len(seeds)),
                                "seeds_needed": math.ceil(8 * (sigma / args.floor_effect) ** 2),
                                "seconds": fmean(done[f"{b}/{t}/{s}"]["seconds"] for s in seeds)}
    ok = [f"{r}x{e}" for r, e in budgets
          if all(rows[f"{r}x{e}/{t}"]["resolves_with_n"] <= args.floor_effect for t in tasks)]
    study_h = {f"{r}x{e}": len(FINETUNED) * len(seeds) * sum(rows[f"{r}x{e}/{t}"]["seconds"] for t in tasks) / 3600
               for r, e in budgets}
    rec = {"budget": ok[0] if ok else None, "resolving": ok, "effect": args.floor_effect, "seeds": len(seeds),
           "study_f1_hours": study_h}
    md = (f"## F1 noise floor against the fine-tuning budget (base PLM, fine-tuning seeds {args.seeds})\n"
          f"sigma: F1 std over seeds; a seed-paired difference of two variants has std sigma sqrt 2, so "
          f"{len(seeds)} seeds resolve differences >= 2 sigma sqrt(2/{len(seeds)}); a "
          f"{100 * args.floor_effect:.1f}-point difference needs 8 (sigma / effect)^2 seeds. The pre-training seed "
          "adds its own noise on top: this is "
          "a floor.\n\n| budget (rows x epochs) | task | F1 mean | sigma | resolves with these seeds | seeds for "
          f"{100 * args.floor_effect:.1f} points | s per run | study's F1 hours ({len(FINETUNED)} variants x "
          f"{len(seeds)} seeds) |\n|---|---|---|---|---|---|---|---|\n" +
          "".join(f"| {r['rows']} x {r['epochs']} | {r['task']} | {fmt(r['f1_mean'])} | {fmt(r['sigma'])} | "
                  f"{fmt(r['resolves_with_n'])} | {r['seeds_needed']} | {r['seconds']:.0f} | "
                  f"{study_h[k.split('/')[0]]:.1f} |\n" for k, r in rows.items()) +
          (f"\nRecommended: {rec['budget']} (every task resolves {100 * args.floor_effect:.1f} points with "
           f"{len(seeds)} seeds at the floor).\n" if ok else
           f"\nNo budget measured resolves {100 * args.floor_effect:.1f} points with {len(seeds)} seeds even at the "
           "floor: F1 is reported without verdicts.\n"))
    out = common.write_result(args.output_dir, "f1_floor", config["model"], config, seeds, rows, runs=done,
                              recommendation=rec)
    common.atomic_write(os.path.join(args.output_dir, "f1_floor.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)
    return out


def flags_at(out_dir, name, flags):
    """The flags a variant's recorded runs were made with: those of its current definition, or, for runs
    whose key was migrated when defaults changed (issue 33's DKPLM), the old key's, which an older checkout
    understands (it may not know the flags that now spell the old defaults out)."""
    runs = os.path.join(out_dir, "runs")
    for f in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if f.startswith(f"{name}-n") and f.endswith(".json"):
            rec = json.load(open(os.path.join(runs, f)))
            if rec["key"]["variant"] == name and "migrated" in rec:
                return rec["migrated"]["from"]["flags"]
    return flags


def run_same_code(args):
    """Do results made at --against still describe this code? Short deterministic runs of each variant
    (--check-steps steps, seed 0, the study's shape and initial model, re-routing every 2 steps) in a
    checkout of --against (with the flags its records were made with: flags_at) and in this one, final
    weights and every logged loss compared bitwise. The
    outcome is appended to <output-dir>/code_checks.json; REPORT.md's pending check accepts runs of a
    commit whose every variant passed against code equal to the current."""
    if args.check_variants:
        names = [n.strip() for n in args.check_variants.split(",") if n.strip()]
    else:
        present = load_results(args.output_dir)
        names = sorted({n for t in ("pilot", "ablation", "injection", "hparams", "efficiency") if t in present
                        for n, _ in VARIANTS[t]})
    flags = {n: f for t in VARIANTS.values() for n, f in t}
    unknown = [n for n in names if n not in flags]
    if unknown or not names:
        raise SystemExit(f"--check-variants: unknown {unknown} (known: {sorted(flags)})" if unknown else
                         f"--task same-code: no study results in {args.output_dir}; name --check-variants")
    model = os.path.abspath(study_model(args)[0]()) if args.model == "base" else args.model
    old_flags = {n: flags_at(args.output_dir, n, flags[n]) for n in names}
    tmp = tempfile.mkdtemp(prefix="same-code-")
    old = os.path.join(tmp, "old")
    r = subprocess.run(["git", "worktree", "add", "--detach", old, args.against], cwd=HERE, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"--against {args.against}: cannot check it out: {r.stderr.strip()}")
    data_arg = args.data if args.data == "mini" else os.path.abspath(args.data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    same = {}
    try:
        for n in names:
            outs = []
            for tree in (old, HERE):
                out = os.path.join(tmp, f"{n}-{'old' if tree == old else 'new'}")
                cmd = [sys.executable, "pretrain.py", *(old_flags[n] if tree == old else flags[n]), "--model", model,
                       "--data", data_arg,
                       "--output-dir", out, "--max-steps", str(args.check_steps), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.train_batch_size), "--seed", "0", "--deterministic",
                       "--route-every", "2", "--log-every", "1", *args.pretrain_args.split()]
                r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"same-code: {n} failed in {tree}: {r.stderr.strip().splitlines()[-1:]}")
                outs.append(out)
            a, b = (load_file(os.path.join(o, "final", "model.safetensors")) for o in outs)
            la, lb = ([r["loss"] for r in read_metrics(o)] for o in outs)
            same[n] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and la == lb
            print(f"same-code {args.against[:12]} vs this checkout, {n}: "
                  f"{'bitwise identical' if same[n] else 'DIFFERENT'}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old], cwd=HERE, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    full = subprocess.run(["git", "rev-parse", args.against], cwd=HERE, capture_output=True, text=True).stdout.strip()
    to = code_commit()
    rec = {"from": full or args.against, "to": to, "variants": same, "steps": args.check_steps,
           "old_flags": {n: f for n, f in old_flags.items() if f != flags[n]},
           "model": common.recorded_config(args, PATH_FLAGS)["model"],
           "command": f"python evaluate.py --task same-code --against {args.against}" +
                      (f" --check-variants {args.check_variants}" if args.check_variants else "")}
    common.atomic_write_json(os.path.join(args.output_dir, "code_checks.json"), code_checks(args.output_dir) + [rec])
    return rec


def run_reproduce(args):
    """The whole study, every section of REPORT.md: the base PLM, the pilot (its --steps runs are the
    study's own), F1's noise floor (when F1 is measured: >= 2 seeds and --finetune not 'none'), every
    experiment, the frontier, the figures and REPORT.md (pending while the pilot recommends a larger budget
    than --steps). Two sections it copies as they are: the first study's table (results/strict/, made by
    that study's code) and the conclusions (results/conclusions.md, written by hand). Every run and
    fine-tuning run recorded in --output-dir is reused, so on a machine with the results nothing retrains."""
    run_base(args)
    run_pilot(args)
    if len(seeds_of(args)) >= 2 and ft_tasks(args):
        run_f1_floor(args)
    else:
        print("reproduce: no F1 noise floor (it needs >= 2 --seeds and an F1 task in --finetune)")
    for task in ("ablation", "efficiency", "injection", "hparams", "frontier"):  # the claims first, sweeps last
        TASKS[task](args)
    return run_report(args)


def run_report(args):
    """plots.py and REPORT.md from the results in --output-dir (e.g. a study continued elsewhere); first the
    claims at two scales (<output-dir>/scale_trend.json), which plots.py draws."""
    write_scale_trend(args.output_dir)
    plots.draw_all(args.output_dir, args.figures)
    return write_report(args)


TASKS = {"base": run_base, "pilot": run_pilot, "ablation": run_ablation, "injection": run_injection,
         "hparams": run_hparams, "efficiency": run_efficiency, "reproduce": run_reproduce, "report": run_report,
         "same-code": run_same_code, "frontier": run_frontier, "f1-floor": run_f1_floor, "dkplm": run_dkplm,
         "scale": run_scale}
