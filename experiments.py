"""The small-scale study of TRELM's claims (Tables 1-6, Figs. 3-8 of arXiv 2403.11203), run through evaluate.py:

    python evaluate.py --task base        # the base PLM every variant continues from (built once, cached)
    python evaluate.py --task pilot       # seed spread of the score at two budgets -> the --steps to use
    python evaluate.py --task ablation    # Table 6: trelm vs --no-injection / --no-memory-bank / --no-routing
    python evaluate.py --task injection   # Fig. 3: long-tail, frequent, all, important
    python evaluate.py --task hparams     # Figs. 7-8: theta (0.25, 0.5, 0.75), k (4, 8, 16, 32), beta (1-4)
    python evaluate.py --task efficiency  # Figs. 4-6: L_MLM and score against in-process pre-training time
    python evaluate.py --task reproduce   # base + pilot + all four + plots.py + REPORT.md (one command)
    python evaluate.py --task report      # plots.py + REPORT.md from the results present (no training)

Base PLM. The paper continues pre-training BERT/RoBERTa, whose MLM head is trained.
The packaged MiniLM has none, so `base_checkpoint` trains the encoder and a fresh tied head by plain
MLM (`pretrain.py --method mlm`) on the generic text of --data only: corpus lines without entity
annotations (the embedded default's fact lines all carry them), minus any line that names both the
subject and the object of a probe fact. It is cached in <base-root>/base-<hash>/, the hash taken over
its inputs (base model, the generic corpus's bytes, steps, sequence length, batch size, seed, extra
flags), and reused. Its probe scores are recorded: it has seen no fact, so seen and held-out should match.

Scores. Primary, prior-free: for each probed relation r, seen minus held-out, then the macro
average over relations with both splits,

    score_MRR = 1/R sum_r (MRR_r(seen) - MRR_r(heldout)),   score_P@1 likewise;

relation priors (always answering "Europe") lift both splits and cancel. Probe-set sampling error of a
run's score: SE^2 = 1/R^2 sum_r (v_r,seen / n_r,seen + v_r,held / n_r,held), v = p (1 - p) (exact for
P@1, an upper bound for MRR, a mean of values in [0, 1]). Paper's metric: fine-tuned F1 on FewRel (the
TACRED stand-in; micro F1 = accuracy, no no_relation class) and Open Entity (loose micro F1) with one
fixed small budget (--ft-*: 1000 training rows, 2 epochs, 64 tokens, 700 test rows, fine-tuning seed =
pre-training seed) for the Table 6 variants and mlm / dkplm / trelm (FINETUNED; --finetune-all for every
variant). F1's test-set SE: sqrt(F1 (1 - F1) / n_test) (exact for FewRel's accuracy, approximate for OE).

Verdict rule, one for every claim: d_s = a_s - b_s over the seeds both variants ran (same seed =
same data order and masking), mean d and SE = std(d) / sqrt(n); "held" if mean d > 2 SE in the claimed
direction, "did not hold" if the opposite direction passes the same test, else "inconclusive" (always
with one seed). A peak (or "best of") holds when it beats every neighbour by the rule, does not hold when
any neighbour beats it, else inconclusive. Efficiency: per seed, the interpolated in-process
time (metrics.jsonl `elapsed`: train-step time only, never wall time of concurrent runs) at which TRELM's
snapshot curve first reaches DKPLM's final score, over DKPLM's time; the claim "ratio <= 0.5" is judged by
the same rule on 0.5 - ratio_s. A seed where TRELM never reaches it gives only a lower bound
(TRELM's total time / DKPLM's), which can refute the claim but not confirm it.

Resume: every (variant, steps, seed) leaves <output-dir>/runs/<variant>-n<steps>-s<seed>.json
(probe scores, F1, step times, curves, the code commit), reused when its key (flags, budget, model, data)
matches, so a study can be continued on another machine from committed results. Pre-training runs live
in --runs-dir/<variant>-n<steps>-s<seed> (a finished run is reused, an interrupted one resumes).
Outputs: <output-dir>/<task>.json (metrics.<variant>.seeds.<seed>, mean, std; verdicts), <task>.md.
Paths in them (flags, the base PLM's dir, run keys' --data / --model) are recorded as common.portable_path
writes them: relative to the repository (the data root as ../shared/data), so they read the same on every
machine. Probing and fine-tuning run lama.py's and finetune.py's tasks (task_args: the arguments the CLI
would parse), pre-training pretrain.train. The paper's values compared against are in paper_values.py.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file
from tqdm import tqdm

import common
import data
import data_mini
import finetune
import lama
import plots
import pretrain
from paper_values import PAPER, PAPER_PEAKS, PRIMARY

# The base PLM has plateaued when L_MLM's mean over the last tenth of its steps is within this fraction of
# the tenth before (a necessary check only: the linear learning-rate decay also flattens the end)
PLATEAU_TOL = 0.02
FT_TASKS = ("fewrel", "open-entity")

# (name, pretrain flags); names are shared between tasks so a run is trained once
MLM = ("mlm", ["--method", "mlm"])
DKPLM = ("dkplm", ["--method", "dkplm"])
# Every TRELM variant of the study spreads the memory bank over the run (Eq. 8 with q counted as
# LAMBDA_EPOCHS epochs of the run: the study's 300 steps are ~8 real epochs of the embedded corpus, which
# would leave lambda ~ 0 after the first quarter) and names its reading of routing (Sec. 3.3) explicitly
LAMBDA_EPOCHS = 4
_T = ["--method", "trelm", "--lambda-epochs", str(LAMBDA_EPOCHS)]
# The readings of routing side by side
VARIANTS = {"frontier": [
    MLM, DKPLM,
    ("trelm-norouting", [*_T, "--no-routing"]),
    ("trelm-strict-e100", [*_T, "--route-scope", "strict"]),  # the reading of the first study
    ("trelm-blocks-e100", [*_T, "--route-scope", "blocks"]),
    ("trelm-ffn-e100", [*_T, "--route-scope", "ffn"]),
    ("trelm-ffn-e1-fo", [*_T, "--route-scope", "ffn", "--route-every", "1", "--ig-form", "first-order"]),
    ("trelm-ffn-e1-random", [*_T, "--route-scope", "ffn", "--route-every", "1", "--route-select", "random"]),
    ("trelm-strict-e1-fo", [*_T, "--route-scope", "strict", "--route-every", "1", "--ig-form", "first-order"]),
]}
# TRELM under the study's reading, the default of `pretrain.py --method trelm` (ffn scope, Eq. 11 every 100
# steps); the ablations and sweeps are named after it with every flag explicit, so no record made under
# an older default (the strict reading, STRICT below) is ever reused for them
TRELM = ("trelm-ffn-e100", [*_T, "--route-scope", "ffn"])
NOROUTING = VARIANTS["frontier"][2]


def trelm(suffix, *flags):
    return f"{TRELM[0]}_{suffix}", [*TRELM[1], *flags]


# role -> variant name: what the tables, verdicts and figures call each run (ROLES: this study; STRICT:
# the first study's names, whose records in results/strict/ were made under the strict reading)
ROLES = {"trelm": TRELM[0], "no-routing": NOROUTING[0], "mlm": "mlm", "dkplm": "dkplm",
         **{r: trelm(r)[0] for r in ("no-injection", "no-memory-bank", "inj-long-tail", "inj-frequent", "inj-all",
                                     "theta0.25", "theta0.75", "k4", "k8", "k32", "beta1", "beta3", "beta4")}}
STRICT = {r: r if r in ("mlm", "dkplm", "trelm") else f"trelm_{r}" for r in ROLES}
VARIANTS.update({
    "ablation": [TRELM, trelm("no-injection", "--no-injection"), trelm("no-memory-bank", "--no-memory-bank"),
                 NOROUTING],
    "injection": [trelm(f"inj-{s}", "--injection", s) if s != "important" else TRELM
                  for s in ("long-tail", "frequent", "all", "important")],
    "hparams": ([trelm(f"theta{v}", "--theta", str(v)) if v != 0.5 else TRELM for v in (0.25, 0.5, 0.75)]
                + [trelm(f"k{v}", "--window-k", str(v)) if v != 16 else TRELM for v in (4, 8, 16, 32)]
                + [trelm(f"beta{v}", "--beta", str(v)) if v != 2 else TRELM for v in (1, 2, 3, 4)]),
    "efficiency": [MLM, DKPLM, TRELM, trelm("no-memory-bank", "--no-memory-bank"), NOROUTING],
    "pilot": [MLM, TRELM],
})
# the variants on the cost axis (bench.py --costs)
COSTED = list({n: (n, f) for t in ("frontier", "efficiency") for n, f in VARIANTS[t]}.values())
# the reading of the first study's tables (results/strict/: the ablation, injection, hparams and
# efficiency tasks as run with METHOD_TABLE's trelm defaults of that time)
FIRST_READING = ("routing scope strict (only the knowledge paths train), re-routed every 100 steps by Eq. 11, the memory "
                 "bank on Eq. 8's real epochs (lambda ~ 0 after the first quarter of a 300-step run); time axis: "
                 "in-process seconds")
# the reading of this study's tables
READING = (f"routing scope ffn (every FFN neuron's weights outside the knowledge paths frozen, everything else "
           f"trains), re-routed every 100 steps by Eq. 11, Eq. 8 over {LAMBDA_EPOCHS} counted epochs of the run "
           "(lambda 0.5, 0.25, 0.125, 0.0625 over the run's quarters at beta 2); cost axis: steps x bench-measured "
           "per-step cost over a plain MLM step")
# reading label of each frontier variant: (scope, route every, selection)
READINGS = {"trelm-strict-e100": "strict, every 100, Eq. 11", "trelm-blocks-e100": "blocks, every 100, Eq. 11",
            "trelm-ffn-e100": "ffn, every 100, Eq. 11", "trelm-ffn-e1-fo": "ffn, per batch, first-order",
            "trelm-ffn-e1-random": "ffn, per batch, random neurons",
            "trelm-strict-e1-fo": "strict, per batch, first-order", "trelm-norouting": "no routing",
            "mlm": "baseline", "dkplm": "baseline"}
FINETUNED = {ROLES[r] for r in ("trelm", "no-injection", "no-memory-bank", "no-routing", "mlm", "dkplm")}
SWEEPS = {"theta": [(0.25, ROLES["theta0.25"]), (0.5, TRELM[0]), (0.75, ROLES["theta0.75"])],
          "k": [(4, ROLES["k4"]), (8, ROLES["k8"]), (16, TRELM[0]), (32, ROLES["k32"])],
          "beta": [(1, ROLES["beta1"]), (2, TRELM[0]), (3, ROLES["beta3"]), (4, ROLES["beta4"])]}
HERE = os.path.dirname(os.path.abspath(__file__))  # results' relative paths are relative to this repository
PATH_FLAGS = ("data_dir", "base_root", "runs_dir", "output_dir", "probe_dir", "figures", "report",
              "model", "base_model", "data")  # the study's flags that name a file or folder (or a keyword)


def add_args(parser):
    g = parser.add_argument_group("study (base, pilot, ablation, injection, hparams, efficiency, reproduce)")
    g.add_argument("--steps", type=int, default=300, help="pre-training steps per variant (choose with --task pilot)")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for a verdict)")
    g.add_argument("--variants", default=None, help="comma-separated: only these variants of the task (default: all)")
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--train-batch-size", type=int, default=16)
    g.add_argument("--snapshots", type=int, default=4, help="probed checkpoints per efficiency run")
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
    g.add_argument("--pretrain-args", default="", help="extra pretrain.py flags for every variant (quoted)")
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


def recorded(value):
    """A flag value as results and run keys record it: a keyword (--data mini, --model base, minilm) or a
    hub id as given, a path as common.portable_path writes it."""
    return value if value in ("mini", "base", common.DEFAULT_MODEL) else common.portable_path(value)


def recorded_config(args):
    """The study's flags as its results files record them (PATH_FLAGS through recorded)."""
    return {k: recorded(v) if k in PATH_FLAGS else v for k, v in vars(args).items()}


def int_list(flag, value):
    try:
        out = [int(s) for s in str(value).split(",") if s.strip()]
    except ValueError:
        out = []
    if not out:
        raise SystemExit(f"{flag} {value}: expected comma-separated integers, e.g. 0,1,2")
    return out


def seeds_of(args):
    return int_list("--seeds", args.seeds)


def ft_tasks(args):
    tasks = [] if args.finetune == "none" else [t.strip() for t in args.finetune.split(",") if t.strip()]
    bad = [t for t in tasks if t not in FT_TASKS]
    if bad:
        raise SystemExit(f"--finetune {args.finetune}: unknown {bad}; expected some of {list(FT_TASKS)} or 'none'")
    return tasks


def fmean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def stdev(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None  # None: one seed, no spread


# -----------------------------------------------------------------------------
# The base PLM (plain MLM on generic text only)

def generic_lines(corpus_path, probe_dir):
    """Corpus lines without entity annotations that name no probe fact's subject and object together.
    -> (kept JSONL lines, counts)."""
    if not corpus_path.endswith(".jsonl"):
        raise SystemExit(f"{corpus_path}: the base PLM needs corpus.jsonl, whose fact lines carry 'entities' "
                         "(a raw corpus.txt cannot tell fact sentences from generic text)")
    if not os.path.isdir(probe_dir):
        raise SystemExit(f"{probe_dir}: no probes/ folder; the base PLM's corpus drops lines naming a probe fact "
                         "(pass --probe-dir)")
    pairs, labels = set(), set()
    for name in sorted(os.listdir(probe_dir)):
        if name.startswith("P") and name.endswith(".jsonl"):
            for r in lama.read_lama_relation(os.path.join(probe_dir, name)):
                pairs.add((r["sub_label"], r["obj_label"]))
                labels |= {r["sub_label"], r["obj_label"]}
    if not labels:
        raise SystemExit(f"{probe_dir}: no P*.jsonl probe file")
    matcher = data_mini.AliasMatcher({l: {"aliases": [l]} for l in labels})
    kept, counts = [], {"fact_lines": 0, "text_lines_naming_a_probe_fact": 0}
    for _, rec in lama.read_jsonl(corpus_path):  # a bad line names corpus_path:line
        if rec.get("entities"):
            counts["fact_lines"] += 1
            continue
        found = matcher.entities_in(rec["text"])
        if any((s, o) in pairs for s in found for o in found):
            counts["text_lines_naming_a_probe_fact"] += 1
            continue
        kept.append(json.dumps({"text": rec["text"]}, ensure_ascii=False) + "\n")
    if not kept:
        raise SystemExit(f"{corpus_path}: no generic text line (every line is a fact line or names a probe fact)")
    counts["generic_lines"] = len(kept)
    return kept, counts


def mini_probes(args):
    """The probes/ folder of --data (--probe-dir, else <data>/probes, else the embedded default's)."""
    if args.probe_dir:
        return args.probe_dir
    kg_dir, _ = data.resolve_data(args.data)
    return os.path.join(os.path.dirname(kg_dir), "probes")


def base_key(args):
    """(key, cache dir, generic lines, their counts, kg dir) of the base PLM, from its inputs alone."""
    kg_dir, corpus = data.resolve_data(args.data)
    lines, counts = generic_lines(corpus, mini_probes(args))
    key = {"base_model": args.base_model, "corpus_sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
           "steps": args.base_steps, "seq_len": args.seq_len, "batch_size": args.train_batch_size, "seed": 0}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return key, os.path.join(args.base_root or data.MINI_ROOT, f"base-{digest}"), lines, counts, kg_dir


def base_checkpoint(args):
    """Build (or reuse) the base PLM; -> (its final/ model dir, its record). Processes that need it at
    once (one study process per seed) take a file lock: the first builds it, the others wait and reuse it."""
    key, root, lines, counts, kg_dir = base_key(args)
    record_path = os.path.join(root, "base.json")
    if os.path.exists(record_path):
        return os.path.join(root, "run", "final"), json.load(open(record_path))
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.exists(record_path):  # another process built it while this one waited
            return os.path.join(root, "run", "final"), json.load(open(record_path))
        return build_base(args, key, root, lines, counts, kg_dir)


def build_base(args, key, root, lines, counts, kg_dir):
    """base_checkpoint's build: the generic corpus, plain MLM from --base-model, the record (base.json)."""
    record_path = os.path.join(root, "base.json")
    corpus_dir, run_dir = os.path.join(root, "data"), os.path.join(root, "run")
    if not os.path.exists(os.path.join(corpus_dir, "corpus.jsonl")):
        os.makedirs(corpus_dir, exist_ok=True)
        if not os.path.isdir(os.path.join(corpus_dir, "kg")):
            shutil.copytree(kg_dir, os.path.join(corpus_dir, "kg"))
        common.atomic_write(os.path.join(corpus_dir, "corpus.jsonl"), lambda tmp: open(tmp, "w").writelines(lines))
    if not os.path.exists(os.path.join(run_dir, "final", "config.json")):
        argv = ["--method", "mlm", "--model", args.base_model, "--data", corpus_dir, "--output-dir", run_dir,
                "--seed", "0", "--max-steps", str(args.base_steps), "--seq-len", str(args.seq_len),
                "--batch-size", str(args.train_batch_size), "--log-every", "1",
                "--save-every", str(max(1, args.base_steps // 10))]
        run_pretrain(argv + resume_flag(run_dir))
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    tenth = max(1, len(rows) // 10)
    last, prev = fmean(r["l_mlm"] for r in rows[-tenth:]), fmean(r["l_mlm"] for r in rows[-2 * tenth:-tenth])
    rec = {"key": key, "dir": common.portable_path(root), **counts, "l_mlm_first": rows[0]["l_mlm"],
           "l_mlm_last_tenth": last, "l_mlm_previous_tenth": prev, "relative_drop_last_tenth": None if prev is None else (prev - last) / prev,
           "train_seconds": rows[-1]["elapsed"], "s_per_step": rows[-1]["elapsed"] / rows[-1]["step"],
           "commit": json.load(open(os.path.join(run_dir, "config.json")))["commit"],
           "probe": probe(args, os.path.join(run_dir, "final"), os.path.join(root, "probe"))}
    common.atomic_write_json(record_path, rec)
    return os.path.join(run_dir, "final"), rec


def plateaued(rec):
    return rec["relative_drop_last_tenth"] is not None and rec["relative_drop_last_tenth"] <= PLATEAU_TOL


def study_model(args):
    """(model(): the initial model of every variant, its id in run keys). 'base': the base PLM, built
    only when a run must be pre-trained (runs resumed from their JSON need no base on this machine)."""
    if args.model != "base":
        return (lambda: args.model), recorded(args.model)
    return (lambda: base_checkpoint(args)[0]), os.path.basename(base_key(args)[1])


# -----------------------------------------------------------------------------
# Scores of one model dir

def prior_free(per_relation, key):
    """(macro mean over relations of seen - held-out `key`, its probe-set SE). Relations lacking a
    split are skipped. SE uses v = p (1 - p) per split (exact for P@1, an upper bound for MRR)."""
    rows = [(m["seen"], m["heldout"]) for m in per_relation.values()
            if m.get("seen", {}).get("facts") and m.get("heldout", {}).get("facts")]
    if not rows:
        return None, None
    diff = statistics.fmean(s[key] - h[key] for s, h in rows)
    var = sum(s[key] * (1 - s[key]) / s["facts"] + h[key] * (1 - h[key]) / h["facts"] for s, h in rows)
    return diff, math.sqrt(var) / len(rows)


def task_args(module, task, **flags):
    """The arguments `python evaluate.py --task <task>` parses when given `flags` (dest=value): evaluate.py's
    shared flags (--seed 0, --batch-size unset: the task's own), `module.add_args`'s defaults, then `flags`."""
    p = argparse.ArgumentParser()
    module.add_args(p)
    return argparse.Namespace(**{**vars(p.parse_args([])), "task": task, "seed": 0, "batch_size": None, **flags})


def run_task(module, task, **flags):
    """Run an evaluate.py task of `module` (lama, finetune) as the CLI would, seeded by its --seed."""
    args = task_args(module, task, **flags)
    common.seed_everything(args.seed)
    return module.TASKS[task](args)


def probe(args, model_dir, out_dir):
    """Probe scores of one model dir (lama.py's results file, cached in out_dir)."""
    task = "mini" if args.probe == "mini" else "lama"
    path = os.path.join(out_dir, f"{task}.json")
    if not os.path.exists(path):
        flags = dict(model_dir=model_dir, output_dir=out_dir, data_dir=args.data_dir or lama.default_data_dir())
        if task == "mini":
            flags["probe_dir"] = mini_probes(args)
        run_task(lama, task, **flags)
    res = json.load(open(path))
    m = res["metrics"]
    if task == "mini":
        out = {f"{s}_{k}": m[s][k] for s in ("seen", "heldout") for k in ("P@1", "MRR")}
        for k in ("MRR", "P@1"):
            out[f"score_{k}"], out[f"se_{k}"] = prior_free(res["per_relation"], k)
        return out
    # --probe lama: no held-out split; the score is the macro average over the LAMA corpora
    corpora = [c for c in m.values() if isinstance(c, dict) and "P@1" in c]
    return {"score_MRR": fmean(c["MRR"] for c in corpora), "score_P@1": fmean(c["P@1"] for c in corpora)}


def finetune_f1(args, model_dir, out_dir, task, seed):
    """Test F1 of one fine-tuning run (finetune.py) at the study's fixed budget, with its test-set SE."""
    path = os.path.join(out_dir, f"{task}.json")
    if not os.path.exists(path):
        run_task(finetune, task, model_dir=model_dir, output_dir=out_dir, seed=seed, seeds=str(seed),
                 train_limit=args.ft_train_limit, eval_limit=args.ft_eval_limit, epochs=args.ft_epochs,
                 max_seq_len=args.ft_max_seq_len, data_dir=args.data_dir or lama.default_data_dir())
    res = json.load(open(path))
    f1, n = res["metrics"]["test"]["f1"]["mean"], res["data"]["sizes"]["test"]
    run = res["per_seed"][0]
    return {"f1": f1, "se": math.sqrt(f1 * (1 - f1) / n), "n_test": n,
            "seconds": run["train_seconds"] + run["eval_seconds"]}


def run_pretrain(argv):
    """pretrain.py with the flags `argv` (kept as a list: the command that made the run)."""
    pretrain.train(pretrain.resolve_config(pretrain.get_parser().parse_args(argv)))


# -----------------------------------------------------------------------------
# One run: pre-train, probe, curve, fine-tune; its small JSON is the unit of resume

def run_name(name, steps, seed):
    return f"{name}-n{steps}-s{seed}"


def pretrain_variant(args, name, flags, seed, steps, model):
    """Train (or reuse / resume) one variant from model() (called only if it must train); -> its run dir."""
    run_dir = os.path.join(args.runs_dir, run_name(name, steps, seed))
    if os.path.exists(os.path.join(run_dir, "final", "config.json")):
        return run_dir
    every = max(1, steps // max(1, args.snapshots))
    argv = ["--model", model(), "--data", args.data, "--output-dir", run_dir, "--seed", str(seed),
            "--max-steps", str(steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.train_batch_size),
            "--snapshot-every", str(every), "--save-every", str(every), "--log-every", "1", *args.pretrain_args.split(),
            *flags]  # the variant's own flags last: they win over --pretrain-args (a per-batch reading's --route-every)
    run_pretrain(argv + resume_flag(run_dir))
    return run_dir


def curve(args, run_dir):
    """L_MLM against in-process training time (metrics.jsonl), and the score of every snapshot."""
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    at = {r["step"]: r["elapsed"] for r in rows}
    points = []
    for d in sorted(x for x in os.listdir(run_dir) if x.startswith("step_")):
        step = int(d.split("_")[1])
        points.append({"step": step, "elapsed": at[step], **probe(args, os.path.join(run_dir, d),
                                                                  os.path.join(run_dir, f"probe_{d}"))})
    return {"loss": [{"step": r["step"], "elapsed": r["elapsed"], "l_mlm": r["l_mlm"], "loss": r["loss"],
                      "l_cka": r.get("l_cka"), "l_dec": r.get("l_dec")}
                     for r in rows], "snapshots": points}


def resume_flag(run_dir):
    """["--resume"] when run_dir holds a checkpoint pretrain.py can resume from (checkpoint/, or the
    .checkpoint.tmp/.old pair a crash inside save() leaves), else []."""
    names = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old")
    found = any(os.path.exists(os.path.join(run_dir, n, "training_state.pt")) for n in names)
    return ["--resume"] if found else []


def data_id(args):
    """--data (as recorded) and a hash of its corpus file, so that a rebuilt corpus invalidates the runs
    made on another."""
    _, corpus = data.resolve_data(args.data)
    with open(corpus, "rb") as f:
        return f"{recorded(args.data)}@{hashlib.sha256(f.read()).hexdigest()[:12]}"


def run_record(args, name, flags, seed, steps, model, model_id, want_curve=False, want_ft=False):
    """The per-run JSON <output-dir>/runs/<variant>-n<steps>-s<seed>.json: reused when its key matches,
    completed (curve, F1) when asked for more than it holds."""
    key = {"variant": name, "flags": flags, "seed": seed, "steps": steps, "seq_len": args.seq_len,
           "batch_size": args.train_batch_size, "model": model_id, "data": data_id(args), "probe": args.probe,
           "pretrain_args": args.pretrain_args, "snapshots": args.snapshots,
           "finetune": [args.ft_train_limit, args.ft_eval_limit, args.ft_epochs, args.ft_max_seq_len]}
    path = os.path.join(args.output_dir, "runs", run_name(name, steps, seed) + ".json")
    rec = json.load(open(path)) if os.path.exists(path) else None
    if rec is not None and rec["key"] != key:
        print(f"{path}: made with other settings ({ {k: rec['key'].get(k) for k in key if rec['key'].get(k) != key[k]} }); "
              "running again")
        rec = None
    rec = rec or {"key": key}
    tasks = ft_tasks(args) if want_ft else []
    missing = ("probe" not in rec or (want_curve and "curve" not in rec)
               or any(t not in rec.get("finetune", {}) for t in tasks))
    if not missing:
        return rec
    run_dir = pretrain_variant(args, name, flags, seed, steps, model)
    final = os.path.join(run_dir, "final")
    if "probe" not in rec:
        rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
        t0 = time.time()
        rec.update(probe=probe(args, final, os.path.join(run_dir, "probe_final")), probe_seconds=time.time() - t0,
                   train={"steps": rows[-1]["step"], "seconds": rows[-1]["elapsed"],
                          "s_per_step": rows[-1]["elapsed"] / rows[-1]["step"], "final_l_mlm": rows[-1]["l_mlm"]},
                   commit=json.load(open(os.path.join(run_dir, "config.json")))["commit"])
    if want_curve and "curve" not in rec:
        rec["curve"] = curve(args, run_dir)
    for t in tasks:
        if t not in rec.setdefault("finetune", {}):
            rec["finetune"][t] = finetune_f1(args, final, os.path.join(run_dir, f"ft_{t}"), t, seed)
    common.atomic_write_json(path, rec)
    return rec


def flat(rec):
    """The per-seed numbers of a run record that tables and verdicts use."""
    out = {k: v for k, v in rec["probe"].items()}
    out["s_per_step"] = rec["train"]["s_per_step"]
    out["final_l_mlm"] = rec["train"]["final_l_mlm"]
    for t, v in rec.get("finetune", {}).items():
        out[f"f1_{t}"], out[f"se_f1_{t}"] = v["f1"], v["se"]
    return out


def variants_of(args, task):
    """VARIANTS[task], or the ones --variants names (each must be one of them)."""
    if not getattr(args, "variants", None):
        return VARIANTS[task]
    names = args.variants.split(",")
    known = [n for n, _ in VARIANTS[task]]
    if set(names) - set(known):
        raise SystemExit(f"--variants: {sorted(set(names) - set(known))} not in --task {task}'s variants {known}")
    return [(n, f) for n, f in VARIANTS[task] if n in names]


def run_variants(args, task, steps=None):
    """Every variant of `task` x every seed (progress bar over both) ->
    {name: {"seeds": {seed: flat numbers}, "mean", "std", "flags", "records": {seed: run record}}}."""
    steps = steps or args.steps
    model, model_id = study_model(args)
    todo = [(n, f, s) for n, f in variants_of(args, task) for s in seeds_of(args)]
    out = {}
    for name, flags, seed in tqdm(todo, desc=f"{task} (variant x seed)", unit="run", position=0):
        rec = run_record(args, name, flags, seed, steps, model, model_id, want_curve=task in ("efficiency", "frontier"),
                         want_ft=task != "pilot" and (args.finetune_all or name in FINETUNED))
        v = out.setdefault(name, {"flags": flags, "seeds": {}, "records": {}})
        v["seeds"][str(seed)], v["records"][str(seed)] = flat(rec), rec
    for v in out.values():
        keys = sorted({k for s in v["seeds"].values() for k in s})
        v["mean"] = {k: fmean(s.get(k) for s in v["seeds"].values()) for k in keys}
        v["std"] = {k: stdev([s.get(k) for s in v["seeds"].values()]) for k in keys}
    return out


# -----------------------------------------------------------------------------
# The verdict rule

def verdict(a, b):
    """Claim 'a > b'. a, b: {seed: value}. Seed-paired d_s = a_s - b_s; held if mean > 2 SE, did not
    hold if -mean > 2 SE, else inconclusive (always with fewer than 2 paired seeds)."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return {"verdict": "not measured", "n": 0}
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"verdict": "inconclusive (one seed: no standard error)", "diff": mean, "se": None, "n": 1}
    se = statistics.stdev(d) / math.sqrt(len(d))
    v = "held" if mean > 2 * se else "did not hold" if -mean > 2 * se else "inconclusive"
    return {"verdict": v, "diff": mean, "se": se, "n": len(d), "lo": mean - 2 * se, "hi": mean + 2 * se}


def beats_all(a, others):
    """Claim 'a beats every one of others' ({label: {seed: value}}): held if every pairwise claim held,
    did not hold if any other beats a by the rule, else inconclusive."""
    pair = {k: verdict(a, b) for k, b in others.items()}
    vs = [p["verdict"] for p in pair.values()]
    overall = ("held" if vs and all(v == "held" for v in vs) else "did not hold" if "did not hold" in vs
               else "not measured" if all(v == "not measured" for v in vs) else "inconclusive")
    return {"verdict": overall, "pairs": pair}


def values(res, name, key):
    return {s: x.get(key) for s, x in res[name]["seeds"].items()} if name in res else {}


def time_to_reach(points, target, key=PRIMARY, x="elapsed"):
    """The x (in-process time, or cost) at which a snapshot curve first reaches `target` (linear
    interpolation between snapshots; from the first snapshot's x if already reached there), or None."""
    prev = None
    for p in points:
        if p[key] is not None and p[key] >= target:
            if prev is None or p[key] == prev[key]:
                return p[x]
            f = (target - prev[key]) / (p[key] - prev[key])
            return prev[x] + max(0.0, f) * (p[x] - prev[x])
        prev = p
    return None


def efficiency_ratios(res, baseline="dkplm", key=PRIMARY, variant="trelm", x="elapsed"):
    """Per seed: the variant's x (time or cost) to the baseline's final score / the baseline's x;
    unreached seeds give a lower bound (the variant's whole run / the baseline's)."""
    out = {}
    for s, rec in res[baseline]["records"].items():
        tr = res[variant]["records"].get(s)
        if tr is None:
            continue
        dk, pts = rec["curve"]["snapshots"], tr["curve"]["snapshots"]
        target, t_dk = dk[-1][key], dk[-1][x]
        t_tr = time_to_reach(pts, target, key, x)
        out[s] = {"dkplm_final": target, "dkplm_time": t_dk, "trelm_time": t_tr, "reached": t_tr is not None,
                  "ratio": (t_tr if t_tr is not None else pts[-1][x]) / t_dk}
    return out


def ratio_verdict(ratios, claim=PAPER["efficiency_ratio"], baseline="DKPLM"):
    """'ratio <= claim' by the rule on claim - ratio_s; an unreached seed's ratio is only a lower bound."""
    v = verdict({s: claim for s in ratios}, {s: r["ratio"] for s, r in ratios.items()})
    if v["verdict"] == "held" and not all(r["reached"] for r in ratios.values()):
        v["verdict"] = f"inconclusive (TRELM did not reach {baseline}'s final score in some seeds)"
    return v


# -----------------------------------------------------------------------------
# Tasks

def fmt(mean, std=None, scale=100):
    if mean is None:
        return "n/a"
    return f"{scale * mean:.1f}" if std is None else f"{scale * mean:.1f} ± {scale * std:.1f}"


def table(res, names_labels, cols):
    """Markdown table of mean ± std over seeds (x 100)."""
    head = "| variant | seeds | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {label} | {len(res[n]['seeds'])} | " +
                          " | ".join(fmt(res[n]["mean"].get(c), res[n]["std"].get(c)) for c in cols) + " |\n"
                          for n, label in names_labels if n in res)


COLS = ("score_MRR", "score_P@1", "se_MRR", "seen_MRR", "heldout_MRR", "f1_fewrel", "f1_open-entity")


def write_task(args, task, res, md, **extra):
    cfg = {k: v for k, v in recorded_config(args).items() if not callable(v)}
    metrics = {n: {k: v[k] for k in ("flags", "seeds", "mean", "std")} for n, v in res.items()}
    path = common.write_result(args.output_dir, task, cfg["model"], cfg, seeds_of(args), metrics, **extra)
    common.atomic_write(os.path.join(args.output_dir, f"{task}.md"), lambda tmp: open(tmp, "w").write(md))
    print(md)
    return path


def header(args, title):
    return (f"## {title}\nx 100, mean ± std over seeds {args.seeds}, {args.steps} steps; score = per-relation "
            "seen - held-out, macro-averaged; se_MRR = probe-set SE of one run's score.\n\n")


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
        config = recorded_config(args)
        common.write_result(args.output_dir, "base", config["base_model"], config, 0, rec)
    p = rec["probe"]
    if not plateaued(rec):
        print(f"warning: the base PLM's L_MLM fell {fmt(rec['relative_drop_last_tenth'])}% over its last tenth "
              f"(more than {100 * PLATEAU_TOL:.0f}%, or too few steps to tell): not plateaued; raise --base-steps")
    print(f"base PLM {path}\n  L_MLM {rec['l_mlm_first']:.3f} (step 1) -> {rec['l_mlm_last_tenth']:.3f} (mean of the last "
          f"tenth; the tenth before: {rec['l_mlm_previous_tenth']:.3f})\n  probes: seen P@1 {fmt(p.get('seen_P@1'))}, "
          f"held-out P@1 {fmt(p.get('heldout_P@1'))}, score_MRR {fmt(p['score_MRR'])} ± {fmt(p.get('se_MRR'))} (SE)")
    return path


def ablation_claims(res):
    """Table 6's verdicts: TRELM above each ablation on the score and both F1s."""
    t = ROLES["trelm"]
    return {f"{ROLES[r]} < {t} [{k}]": verdict(values(res, t, k), values(res, ROLES[r], k))
            for r in ("no-injection", "no-memory-bank", "no-routing") for k in (PRIMARY, "f1_fewrel", "f1_open-entity")}


def run_ablation(args):
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
    res = run_variants(args, "injection")
    labels = [(ROLES["inj-long-tail"], "long-tail only"), (ROLES["inj-frequent"], "frequent only"),
              (ROLES["inj-all"], "all entities"), (ROLES["trelm"], "important (TRELM)")]
    md = (header(args, "Fig. 3 (injection strategies)") + "Paper's claim: long-tail beats frequent; important "
          "(long-tail ranked by SI) is best.\n\n" + table(res, labels, COLS[:5]))
    return write_task(args, "injection", res, md, verdicts=injection_claims(res), roles=ROLES)


def run_hparams(args):
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


def run_efficiency(args):
    """Figs. 4-6 on the cost axis: TRELM's cost to DKPLM's final score (Sec. 4.4), and to the final score
    of TRELM without the memory bank / without routing (Fig. 6: each module speeds convergence)."""
    costs = load_costs(args, "efficiency")
    res = with_cost(run_variants(args, "efficiency"), costs)
    t = ROLES["trelm"]
    ratios = efficiency_ratios(res, variant=t, x="cost")
    modules = {r: efficiency_ratios(res, baseline=ROLES[r], variant=t, x="cost") for r in ("no-memory-bank", "no-routing")}
    eff = {"time_to_dkplm_final": ratios, "ratio_verdict": ratio_verdict(ratios), "x": "cost",
           "time_to_ablation_final": modules,
           "module_verdicts": {r: ratio_verdict(x, claim=1.0, baseline=ROLES[r]) for r, x in modules.items()},
           "step_time_over_mlm": {n: costs[n]["cost_over_mlm"] for n in res},
           "curves": {n: {s: r["curve"] for s, r in v["records"].items()} for n, v in res.items()}}
    rows = "".join(f"| {s} | {fmt(r['dkplm_final'])} | {r['dkplm_time']:.0f} | "
                   f"{'not reached' if not r['reached'] else format(r['trelm_time'], '.0f')} | "
                   f"{'> ' if not r['reached'] else ''}{r['ratio']:.2f} |\n" for s, r in ratios.items())
    md = (f"## Figs. 4-6 (efficiency)\nReading: {READING}.\nPaper's claim: TRELM reaches DKPLM's quality in at most "
          "50% of its cost. Cost: steps x per-step cost over a plain MLM step (results/costs.json), in MLM steps."
          "\n\n| seed | dkplm final score_MRR x 100 | dkplm cost | trelm cost to reach it | ratio |\n"
          "|---|---|---|---|---|\n" + rows +
          "\nPer-step cost over MLM: " + ", ".join(f"{n} {c:.3f}" for n, c in eff["step_time_over_mlm"].items()) +
          "\n\n" + table(res, [(n, n) for n in res], COLS))
    return write_task(args, "efficiency", res, md, efficiency=eff, roles=ROLES,
                      verdicts={"TRELM cost to DKPLM's final <= 0.5 of DKPLM's": eff["ratio_verdict"],
                                **{f"TRELM cost to {ROLES[r]}'s final < its cost": v
                                   for r, v in eff["module_verdicts"].items()}})


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
      than its cost (Fig. 6)."""
    costs = load_costs(args, "frontier")
    res = with_cost(run_variants(args, "frontier"), costs)
    routed = [n for n in READINGS if n.startswith("trelm-") and n != "trelm-norouting" and n in res]
    verdicts, rows = {}, []
    for n in [v for v, _ in variants_of(args, "frontier")]:
        c = costs[n]
        ratio = efficiency_ratios(res, "dkplm", variant=n, x="cost") if n.startswith("trelm") and "dkplm" in res else None
        speed = efficiency_ratios(res, "trelm-norouting", variant=n, x="cost") \
            if n in routed and "trelm-norouting" in res else None
        if ratio is not None:
            verdicts[f"{n} ({READINGS[n]}): cost to DKPLM's final <= 0.5 of DKPLM's"] = ratio_verdict(ratio)
        if speed is not None:
            verdicts[f"{n} ({READINGS[n]}): routing speeds convergence (cost to no-routing's final < its cost)"] = \
                ratio_verdict(speed, claim=1.0, baseline="TRELM without routing")
        m, sd = res[n]["mean"], res[n]["std"]
        mean_ratio = statistics.fmean(r["ratio"] for r in ratio.values()) if ratio else None
        rows.append(f"| {n} | {READINGS[n]} | {100 * c['trainable_share']:.1f}% | {c['cost_over_mlm']:.3f} "
                    f"[{c['spread'][0]:.2f}, {c['spread'][1]:.2f}] | {c['flops_over_mlm']:.3f} | "
                    f"{args.steps * c['cost_over_mlm']:.0f} | {fmt(m.get(PRIMARY), sd.get(PRIMARY))} | "
                    f"{fmt(m.get('final_l_mlm'), sd.get('final_l_mlm'), scale=1)} | "
                    f"{'' if mean_ratio is None else format(mean_ratio, '.2f')} |")
    lines = [f"- {k}: **{v['verdict']}**" + ("" if v.get("diff") is None else f" (mean margin {v['diff']:.2f})")
             for k, v in verdicts.items()]
    md = ("## Frontier: probe score against cost, every reading of routing\n"
          f"Cost = steps x the variant's per-step cost over a plain MLM step (results/costs.json: bench.py "
          f"interleaved in one process; per-batch variants include their attribution, every-100 variants its "
          f"amortised share), in MLM-step units; FLOPs: counted matmul FLOPs, the same ratio. {args.steps} steps, "
          f"seeds {args.seeds}, Eq. 8 over {LAMBDA_EPOCHS} counted epochs for every TRELM variant.\n\n"
          "| variant | reading | trains | cost / MLM step | FLOPs / MLM step | run cost | score_MRR x 100 | "
          "final L_MLM | cost to DKPLM's final / DKPLM's |\n|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n\n" + "\n".join(lines) + "\n")
    return write_task(args, "frontier", res, md, verdicts=verdicts, costs=costs,
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
          "".join(f"| {b} | {fmt(r['mean']['mlm'], r['std']['mlm'])} | {fmt(r['mean'][TRELM[0]], r['std'][TRELM[0]])} | "
                  f"{fmt(r['probe_se'][TRELM[0]])} | {fmt(r['paired_diff'].get('diff'))} ± {fmt(r['paired_diff'].get('se'))} "
                  f"| {r['seeds_needed'] or 'n/a (mlm score <= 0 or one seed)'} | "
                  f"{r['s_per_step']['mlm']:.2f}, {r['s_per_step'][TRELM[0]]:.2f} |\n" for b, r in rows.items()) +
          f"\nRecommended: --steps {best} " + ("(resolves a {:.0%} difference with {} seeds)".format(
              args.target_effect, len(seeds)) if ok else f"(no budget resolves it with {len(seeds)} seeds: needs "
              f"{rows[best]['seeds_needed'] or 'a positive baseline score'}; raise --seeds or the budget)") +
          f". Estimated time of the full `--task reproduce` at that budget on this machine (in-process times "
          f"measured here): {rec['estimated_hours']:.1f} h for {len(names)} variants x {len(seeds)} seeds ("
          + ", ".join(f"{k} {v / 3600:.1f} h" for k, v in rec["estimate_seconds"].items()) + ").\n")
    config = recorded_config(args)
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
    model = base_checkpoint(args)[0] if args.model == "base" else args.model
    path = os.path.join(args.output_dir, "f1_floor.json")
    config = recorded_config(args)
    same = ("model", "base_model", "base_steps", "data_dir", "ft_eval_limit", "ft_max_seq_len")
    prior = json.load(open(path)) if os.path.exists(path) else None
    if prior is not None and any(prior["config"].get(k) != config.get(k) for k in same):
        print(f"{path}: made with other settings ({ {k: prior['config'].get(k) for k in same} }); measuring again")
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
                    done[k] = finetune_f1(ft, model, os.path.join(args.runs_dir, "f1_floor", b, f"{t}_s{s}"), t, s)
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
          f"{len(seeds)} seeds resolve differences >= 2 sigma sqrt(2/{len(seeds)}); a {100 * args.floor_effect:.1f}-point "
          "difference needs 8 (sigma / effect)^2 seeds. The pre-training seed adds its own noise on top: this is "
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


# -----------------------------------------------------------------------------
# REPORT.md

def load_results(out_dir):
    """{task: results JSON} for the study's tasks present in out_dir; an experiment's JSON in an older
    format (no per-seed prior-free score) is skipped with plots.py's message, i.e. reported as not run."""
    out = {t: json.load(open(os.path.join(out_dir, f"{t}.json"))) for t in ("base", "pilot")
           if os.path.exists(os.path.join(out_dir, f"{t}.json"))}
    for t in ("ablation", "injection", "hparams", "efficiency"):
        doc = plots.load(out_dir, t) if os.path.exists(os.path.join(out_dir, f"{t}.json")) else None
        if doc is not None:
            out[t] = doc
    return out


def pending_reasons(args, res):
    """Why the results cannot carry verdicts about HEAD yet (empty: the study is final)."""
    why = [f"{t} not run" for t in ("ablation", "injection", "hparams", "efficiency") if t not in res]
    few = sorted({n for t, r in res.items() if t not in ("base", "pilot") for n, v in r["metrics"].items() if len(v["seeds"]) < 3})
    if few:
        why.append(f"fewer than 3 seeds: {', '.join(few)}")
    runs = os.path.join(args.output_dir, "runs")
    by_commit = {}  # commit -> variants of the runs at the study's budget made there
    for f in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if f"-n{args.steps}-s" in f and f.endswith(".json"):
            c = json.load(open(os.path.join(runs, f))).get("commit")
            by_commit.setdefault(c, set()).add(f.rsplit("-n", 1)[0])
    checks = code_checks(args.output_dir)
    for c, variants in sorted(by_commit.items(), key=lambda kv: str(kv[0])):
        changed = code_changed_since(c)
        if changed and not still_current(c, variants, checks):
            why.append(f"runs made at {str(c)[:12]}{'-dirty' if str(c).endswith('-dirty') else ''}; the code differs "
                       f"at HEAD {common.git_commit()[:12]} ({changed})")
    if args.model == "base" and "base" in res and not plateaued(res["base"]["metrics"]):
        why.append(f"the base PLM's L_MLM still fell {fmt(res['base']['metrics']['relative_drop_last_tenth'])}% "
                   "over its last tenth (raise --base-steps)")
    rec = res.get("pilot", {}).get("recommendation")
    if rec is None:
        why.append("no pilot (--task pilot) chose the budget")
    elif rec["steps"] > args.steps or not rec["resolves"]:
        why.append(f"the pilot recommends --steps {rec['steps']} (resolves: {rec['resolves']}); this run used {args.steps}")
    return why


# .py files no study run executes: the tests, the subnetwork analysis, the benchmark, the figure drawing
# (figures are redrawn from results/); editing them leaves the study's results current
NOT_STUDY_CODE = ("tests/", "subnetworks.py", "bench.py", "plots.py")


def code_changed_since(commit, repo=None):
    """'' if no tracked code that study runs execute differs between `commit` and the working tree of
    `repo` (default: this checkout; results, figures and docs committed after a run leave it current),
    else the changed files or why it cannot tell."""
    if not commit or commit == "unknown" or commit.endswith("-dirty"):
        return "unknown or uncommitted code"
    changed = common.changed_code(commit, repo, ignore=NOT_STUDY_CODE)
    return f"commit {commit[:12]} not in this clone" if changed is None else ", ".join(changed)


def code_commit():
    """HEAD, or HEAD-dirty if study code differs from it (results, figures or docs edited since HEAD, as
    when plots.py has just redrawn the figures, leave it HEAD's code)."""
    head = common.git_commit().removesuffix("-dirty")
    return head if not code_changed_since(head) else head + "-dirty"


def code_checks(out_dir):
    """The same-code checks recorded in <output-dir>/code_checks.json (a list, oldest first)."""
    path = os.path.join(out_dir, "code_checks.json")
    return json.load(open(path)) if os.path.exists(path) else []


def still_current(commit, variants, checks):
    """True if a recorded same-code check found every one of `variants` bitwise identical between
    `commit` and code equal to this checkout's (a .py-identical commit). Never for a '-dirty' commit:
    a check of the committed code says nothing of what was uncommitted."""
    return not str(commit).endswith("-dirty") and any(str(commit).startswith(c["from"]) and not code_changed_since(c["to"]) and
               all(c["variants"].get(v) for v in variants) for c in checks)


def run_same_code(args):
    """Do results made at --against still describe this code? Short deterministic runs of each variant
    (--check-steps steps, seed 0, the study's shape and initial model, re-routing every 2 steps) in a
    checkout of --against and in this one, final weights and every logged loss compared bitwise. The
    outcome is appended to <output-dir>/code_checks.json; REPORT.md's pending check accepts runs of a
    commit whose every variant passed against code equal to the current."""
    if not args.against:
        raise SystemExit("--task same-code needs --against COMMIT (the commit the results were made at)")
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
    tmp = tempfile.mkdtemp(prefix="same-code-")
    old = os.path.join(tmp, "old")
    r = subprocess.run(["git", "worktree", "add", "--detach", old, args.against], cwd=HERE, capture_output=True, text=True)
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
                cmd = [sys.executable, "pretrain.py", *flags[n], "--model", model, "--data", data_arg, "--output-dir", out,
                       "--max-steps", str(args.check_steps), "--seq-len", str(args.seq_len), "--batch-size",
                       str(args.train_batch_size), "--seed", "0", "--deterministic", "--route-every", "2", "--log-every", "1",
                       *args.pretrain_args.split()]
                r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"same-code: {n} failed in {tree}: {r.stderr.strip().splitlines()[-1:]}")
                outs.append(out)
            a, b = (load_file(os.path.join(o, "final", "model.safetensors")) for o in outs)
            la, lb = ([json.loads(l)["loss"] for l in open(os.path.join(o, "metrics.jsonl"))] for o in outs)
            same[n] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and la == lb
            print(f"same-code {args.against[:12]} vs this checkout, {n}: {'bitwise identical' if same[n] else 'DIFFERENT'}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old], cwd=HERE, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    full = subprocess.run(["git", "rev-parse", args.against], cwd=HERE, capture_output=True, text=True).stdout.strip()
    to = code_commit()
    rec = {"from": full or args.against, "to": to, "variants": same, "steps": args.check_steps,
           "model": recorded(model) if args.model != "base" else "base", "command": "python evaluate.py --task same-code "
           f"--against {args.against}" + (f" --check-variants {args.check_variants}" if args.check_variants else "")}
    common.atomic_write_json(os.path.join(args.output_dir, "code_checks.json"), code_checks(args.output_dir) + [rec])
    return rec


def effect(v, scale=100):
    if v.get("diff") is None:
        return "n/a"
    if v.get("se") is None:
        return f"{scale * v['diff']:+.1f} (1 seed)"
    return f"{scale * v['diff']:+.1f} [{scale * v['lo']:+.1f}, {scale * v['hi']:+.1f}] (n={v['n']})"


def claims(res, roles, f1_verdicts=True):
    """The claims table's rows for one study's results (load_results), its variants named by `roles`
    (ROLES, or STRICT for the first study's): the paper's value, ours, the seed-paired effect, the verdict
    (none for F1 when its fine-tuning budget lies below the noise floor, f1_verdicts False)."""
    m = {t: r["metrics"] for t, r in res.items()}
    lines, T = [], roles["trelm"]

    def ours(task, names, key):
        return ", ".join(f"{n} {fmt(m[task][n]['mean'].get(key), m[task][n]['std'].get(key))}"
                         for n in names if n in m.get(task, {}))

    def row(claim, paper, task, names, key, v):
        said = v["verdict"] if f1_verdicts or not key.startswith("f1_") else "no verdict (below F1's noise floor)"
        lines.append(f"| {claim} | {paper} | {ours(task, names, key)} | {effect(v)} | {said} |")

    def pair(task, a, b, key):
        return verdict(values(m[task], a, key), values(m[task], b, key))

    if "efficiency" in m:
        P = PAPER
        for other, paper in (("mlm", f"T-REx P@1 BERT {P['table2_trex_p1']['BERT']} vs TRELM_BERT "
                                     f"{P['table2_trex_p1']['TRELM_BERT']} (Table 2)"),
                             ("dkplm", f"T-REx P@1 DKPLM {P['table1_trex_p1']['DKPLM']} vs TRELM "
                                       f"{P['table1_trex_p1']['TRELM']} (Table 1)")):
            row(f"TRELM probes better than {other}", paper, "efficiency", [T, other], PRIMARY,
                pair("efficiency", T, other, PRIMARY))
        for key, label, paper in (("f1_fewrel", "FewRel F1", lambda o: f"TACRED F1 {'RoBERTa' if o == 'mlm' else 'DKPLM'} "
                                   f"{P['table5_tacred_f1']['RoBERTa' if o == 'mlm' else 'DKPLM']} vs TRELM "
                                   f"{P['table5_tacred_f1']['TRELM']} (Table 5)"),
                                  ("f1_open-entity", "Open Entity F1",
                                   lambda o: f"TRELM {P['table4_open_entity_f1']['TRELM']} best (Table 4)")):
            for other in ("mlm", "dkplm"):
                row(f"TRELM beats {other} on {label}", paper(other), "efficiency", [T, other], key,
                    pair("efficiency", T, other, key))
        eff = res["efficiency"]["efficiency"]
        rs, word = eff["time_to_dkplm_final"], "cost" if eff.get("x") == "cost" else "in-process time"
        lines.append(f"| TRELM needs <= {P['efficiency_ratio']:.0%} of DKPLM's pre-training {word} to reach its final "
                     f"score (Sec. 4.4) | {P['efficiency_ratio']} | "
                     "ratio per seed: " + ", ".join(f"{'>' if not r['reached'] else ''}{r['ratio']:.2f}" for r in rs.values())
                     + f" | {effect(eff['ratio_verdict'], scale=1)} (0.5 - ratio) | {eff['ratio_verdict']['verdict']} |")
        for role, label in (("no-memory-bank", "the memory bank"), ("no-routing", "knowledge routing")):
            n = roles[role]
            key = role if role in eff["time_to_ablation_final"] else n  # the first study keyed them by name
            r, v = eff["time_to_ablation_final"][key], eff["module_verdicts"][key]
            lines.append(f"| {label} speeds convergence (Fig. 6) | ratio < 1 | TRELM's {word} to {n}'s final / its "
                         f"{word}: " + ", ".join(f"{'>' if not x['reached'] else ''}{x['ratio']:.2f}" for x in r.values())
                         + f" | {effect(v, scale=1)} (1 - ratio) | {v['verdict']} |")
    if "ablation" in m:
        for role, label in (("no-injection", "knowledge injection"), ("no-memory-bank", "memory bank"),
                            ("no-routing", "knowledge routing")):
            n = roles[role]
            for key, paper in ((PRIMARY, "n/a"),
                               ("f1_fewrel", f"TACRED {PAPER['table6_tacred_f1']['trelm']} vs "
                                             f"{PAPER['table6_tacred_f1']['trelm_' + role]}"),
                               ("f1_open-entity", f"Open Entity {PAPER['table6_open_entity_f1']['trelm']} vs "
                                                  f"{PAPER['table6_open_entity_f1']['trelm_' + role]}")):
                row(f"removing {label} lowers {key} (Table 6)", paper, "ablation", [T, n], key,
                    pair("ablation", T, n, key))
    if "injection" in m:
        v = res["injection"]["verdicts"]
        row("long-tail injection beats frequent (Fig. 3)", "yes (figure)", "injection",
            [roles["inj-long-tail"], roles["inj-frequent"]], PRIMARY, v["long-tail > frequent"])
        row("important entities beat all entities (Fig. 3)", "yes (figure)", "injection", [T, roles["inj-all"]],
            PRIMARY, v["important > all"])
        b = v["important best"]
        lines.append(f"| important entities are best (Fig. 3) | yes (figure) | "
                     f"{ours('injection', [T, *(roles[r] for r in ('inj-long-tail', 'inj-frequent', 'inj-all'))], PRIMARY)}"
                     f" | " + "; ".join(f"vs {k}: {effect(x)}" for k, x in b["pairs"].items()) + f" | {b['verdict']} |")
    if "hparams" in m:
        for p, v in res["hparams"]["verdicts"].items():
            pts = res["hparams"]["sweeps"][p.split()[0]]
            lines.append(f"| {p} (Figs. 7-8) | {PAPER_PEAKS[p.split()[0]]} | " +
                         ", ".join(f"{x['value']}: {fmt(x[PRIMARY + '_mean'], x[PRIMARY + '_std'])}" for x in pts) +
                         " | " + "; ".join(f"vs {k}: {effect(x)}" for k, x in v["pairs"].items()) +
                         f" | {v['verdict']} |")
    return lines


def write_report(args):
    """REPORT.md: the paper's value, ours (mean ± std), the seed-paired effect with its 2-SE interval and
    the verdict of every claim; a status line saying whether the study is final or pending, and why."""
    res = load_results(args.output_dir)
    why = pending_reasons(args, res)
    m = {t: r["metrics"] for t, r in res.items()}
    lines = ["# Small-scale study of TRELM's claims", "",
             ("**Status: final.**" if not why else "**Status: PENDING.** These numbers are not verdicts on the "
              "current code: " + "; ".join(why) + ". Rerun `python evaluate.py --task reproduce` from a clean "
              "checkout at the recommended budget."), ""]
    if "base" in res:
        b = res["base"]["metrics"]
        p = b["probe"]
        lines += [f"Base PLM ({b['key']['base_model']}, plain MLM on {b['generic_lines']} generic lines, "
                  f"{b['key']['steps']} steps): L_MLM {b['l_mlm_first']:.2f} -> {b['l_mlm_last_tenth']:.2f} "
                  f"(last tenth; {100 * (b['relative_drop_last_tenth'] or 0):.1f}% below the tenth before); "
                  f"seen P@1 {fmt(p.get('seen_P@1'))}, held-out {fmt(p.get('heldout_P@1'))}, score_MRR "
                  f"{fmt(p['score_MRR'])} ± {fmt(p.get('se_MRR'))} (probe-set SE).", ""]
    lines += [f"Study: every variant continues from --model {args.model} for {args.steps} steps of "
              f"{args.train_batch_size} x {args.seq_len} tokens, seeds {args.seeds}, data {args.data}. Score = "
              "per-relation seen - held-out MRR, macro-averaged (x 100). F1: fine-tuned on FewRel (TACRED "
              f"stand-in) and Open Entity, {args.ft_train_limit} training rows, {args.ft_epochs} epochs, "
              f"{args.ft_max_seq_len} tokens, {args.ft_eval_limit} test rows. Effect = seed-paired mean difference "
              "[± 2 SE]; held if the interval lies above 0 in the claimed direction, did not hold if below, else "
              "inconclusive.", ""]
    if "pilot" in res:
        r = res["pilot"]["recommendation"]
        lines += [f"Pilot: recommends --steps {r['steps']} (resolves a {args.target_effect:.0%} difference with "
                  f"{r['seeds']} seeds: {r['resolves']}); estimated pre-training time "
                  f"{r['estimated_hours']:.1f} h for the full study on the machine that ran the pilot. See "
                  "results/pilot.md.", ""]
    floor_path = os.path.join(args.output_dir, "f1_floor.json")
    floor = json.load(open(floor_path))["recommendation"] if os.path.exists(floor_path) else None
    f1_ok = floor is None or f"{args.ft_train_limit}x{args.ft_epochs}" in floor["resolving"]
    if floor is not None:
        lines += [open(os.path.join(args.output_dir, "f1_floor.md")).read(),
                  f"F1 verdicts below: {'given' if f1_ok else 'none'} (the study fine-tunes at {args.ft_train_limit} "
                  f"rows x {args.ft_epochs} epochs).", ""]
    head = ["| claim (paper) | paper's value | ours (mean ± std) | effect | verdict |", "|---|---|---|---|---|"]
    lines += [f"Reading of every verdict in the table below: {READING}.", "", *head, *claims(res, ROLES, f1_ok)]
    strict = load_results(os.path.join(args.output_dir, "strict"))
    if strict:
        lines += ["", "## The first study: the strict reading (results/strict/)",
                  f"Reading of every verdict in this table: {FIRST_READING}. Kept as its own table: under this reading "
                  "the model learns almost no facts (the frontier below), so these verdicts describe that reading only.",
                  "", *head, *claims(strict, STRICT, f1_ok)]
    frontier = os.path.join(args.output_dir, "frontier.md")
    if os.path.exists(frontier):  # its own readings: every verdict names the one it was made under
        lines += ["", open(frontier).read().replace("## Frontier", "## Frontier (results/frontier.md)", 1),
                  f"Figure: {args.figures}/frontier.png. The efficiency verdicts there use the cost axis "
                  "(results/costs.json), not wall time; the table above used in-process seconds of runs that shared "
                  "the machine, which measure the load as much as the method (docs/study.md)."]
    conclusions = os.path.join(args.output_dir, "conclusions.md")
    if os.path.exists(conclusions):  # prose written by hand from the tables above, committed beside them
        lines += ["", f"## Conclusions, claim by claim ({conclusions}: written by hand from the tables above)", "",
                  open(conclusions).read().strip()]
    noise = [(n, v) for t in ("efficiency", "ablation", "injection", "hparams") for n, v in m.get(t, {}).items()]
    if noise:
        seen = {}
        for n, v in noise:
            seen.setdefault(n, v)
        lines += ["", "Noise of the score (x 100): seed std vs the probe-set SE of one run (the same probes serve "
                  "every run, so paired differences cancel most of the latter).", "",
                  "| variant | seeds | seed std | probe-set SE |", "|---|---|---|---|"]
        lines += [f"| {n} | {len(v['seeds'])} | {fmt(v['std'].get(PRIMARY))} | {fmt(v['mean'].get('se_MRR'))} |"
                  for n, v in sorted(seen.items())]
    lines += ["", "Not run here: GLUE (Table 3) and LAMA / LAMA-UHN on the real corpora (Tables 1-2) need the "
              "paper's scale; the paper's values above are for BERT/RoBERTa-base on Wikipedia + Wikidata5M, ours for "
              "a 6-layer MiniLM, a few hundred facts and minutes of CPU. A verdict here is about this scale only.",
              f"Figures: {args.figures}/; tables: {args.output_dir}/*.md; per-run JSON: {args.output_dir}/runs/. "
              f"Code of commit {code_commit()}.", ""]
    common.atomic_write(args.report, lambda tmp: open(tmp, "w").write("\n".join(lines)))
    print("\n".join(lines))
    return args.report


def run_reproduce(args):
    """The whole study: base PLM, the pilot (its --steps runs are the study's own), every experiment,
    the figures, REPORT.md (pending while the pilot recommends a larger budget than --steps)."""
    run_base(args)
    run_pilot(args)
    for task in ("ablation", "efficiency", "injection", "hparams"):  # the tables' claims first, sweeps last
        TASKS[task](args)
    return run_report(args)


def run_report(args):
    """plots.py and REPORT.md from the results in --output-dir (e.g. a study continued elsewhere)."""
    plots.draw_all(args.output_dir, args.figures)
    return write_report(args)


TASKS = {"base": run_base, "pilot": run_pilot, "ablation": run_ablation, "injection": run_injection,
         "hparams": run_hparams, "efficiency": run_efficiency, "reproduce": run_reproduce, "report": run_report,
         "same-code": run_same_code, "frontier": run_frontier, "f1-floor": run_f1_floor}
