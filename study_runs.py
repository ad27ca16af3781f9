"""How the study makes and caches one run: the base PLM, pre-training a variant (study_variants.py), probing
and fine-tuning it, and the per-run JSON that is the unit of resume.

Base PLM. The paper continues pre-training BERT/RoBERTa, whose MLM head is trained. The packaged MiniLM
has none, so `base_checkpoint` trains the encoder and a fresh tied head by plain MLM (`pretrain.py
--method mlm`) on the generic text of --data only: corpus lines without entity annotations (the embedded
default's fact lines all carry them), minus any line that names both the subject and the object of a
probe fact. It is cached in <base-root>/base-<hash>/, the hash taken over its inputs (base model, the
generic corpus's bytes, steps, sequence length, batch size, seed, extra flags), and reused. Its probe
scores are recorded: it has seen no fact, so seen and held-out should match.

Scores of one model dir: the probe score (study_stats.prior_free over lama.py's `--task mini`, or LAMA's
macro scores with --probe lama) and the paper's metric, fine-tuned F1 on FewRel (the TACRED stand-in;
micro F1 = accuracy, no no_relation class) and Open Entity (loose micro F1) with one fixed small budget
(--ft-*: 1000 training rows, 2 epochs, 64 tokens, 700 test rows, fine-tuning seed = pre-training seed)
for the FINETUNED variants (--finetune-all: every variant). F1's test-set SE: sqrt(F1 (1 - F1) / n_test)
(exact for FewRel's accuracy, approximate for OE). Probing and fine-tuning run lama.py's and finetune.py's
tasks (task_args: the arguments the CLI would parse), pre-training pretrain.train.

Resume: every (variant, steps, seed) leaves <output-dir>/runs/<variant>-n<steps>-s<seed>.json (probe
scores, F1, step times, curves, the code commit), reused when its key (flags, budget, model, data)
matches, so a study can be continued on another machine from committed results. Pre-training runs live
in --runs-dir/<variant>-n<steps>-s<seed> (a finished run is reused, an interrupted one resumes). Time is
in-process (metrics.jsonl `elapsed`: train-step time only, never wall time of concurrent runs). Each
record names the commit it was made at (study_report.py tells whether that code is still current).
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import time

from tqdm import tqdm

import common
import config
import data
import data_mini
import finetune
import lama
import pretrain
from study_stats import fmean, prior_free, stdev
from study_variants import FINETUNED, VARIANTS

# The base PLM has plateaued when L_MLM's mean over the last tenth of its steps is within this fraction of
# the tenth before (a necessary check only: the linear learning-rate decay also flattens the end)
PLATEAU_TOL = 0.02
FT_TASKS = ("fewrel", "open-entity")


def int_list(flag, value):
    """'0,1,2' -> [0, 1, 2], or one line naming `flag` and what was expected."""
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
    """The F1 tasks of --finetune ([] for 'none')."""
    tasks = [] if args.finetune == "none" else [t.strip() for t in args.finetune.split(",") if t.strip()]
    bad = [t for t in tasks if t not in FT_TASKS]
    if bad:
        raise SystemExit(f"--finetune {args.finetune}: unknown {bad}; expected some of {list(FT_TASKS)} or 'none'")
    return tasks


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
    expected = 'one JSON object per line with a string "text" field'
    for n, rec in common.read_jsonl(corpus_path, expected=expected):
        if not isinstance(rec.get("text"), str):
            raise common.DataError(f"{corpus_path}:{n}: expected {expected}")
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
    return key, os.path.join(args.base_root or common.cache_root(), f"base-{digest}"), lines, counts, kg_dir


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
    rows = read_metrics(run_dir)
    tenth = max(1, len(rows) // 10)
    last, prev = fmean(r["l_mlm"] for r in rows[-tenth:]), fmean(r["l_mlm"] for r in rows[-2 * tenth:-tenth])
    rec = {"key": key, "dir": common.portable_path(root), **counts, "l_mlm_first": rows[0]["l_mlm"],
           "l_mlm_last_tenth": last, "l_mlm_previous_tenth": prev,
           "relative_drop_last_tenth": None if prev is None else (prev - last) / prev,
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
        return (lambda: args.model), common.recorded_config(args, ["model"])["model"]
    return (lambda: base_checkpoint(args)[0]), os.path.basename(base_key(args)[1])


# -----------------------------------------------------------------------------
# Scores of one model dir

def task_args(module, task, **flags):
    """The arguments `python evaluate.py --task <task>` parses when given `flags` (dest=value): evaluate.py's
    shared flags (--seed 0, --batch-size unset: the task's own), `module.add_args`'s defaults, then `flags`."""
    p = argparse.ArgumentParser()
    module.add_args(p)
    return argparse.Namespace(**{**vars(p.parse_args([])), "task": task, "seed": 0, "batch_size": None, **flags})


def run_task(module, task, **flags):
    """Run an evaluate.py task of `module` (lama, finetune) as the CLI would, its flags checked, seeded by its --seed."""
    args = task_args(module, task, **flags)
    module.check(args)
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


# -----------------------------------------------------------------------------
# One run: pre-train, probe, curve, fine-tune; its small JSON is the unit of resume

def run_pretrain(argv):
    """pretrain.py with the flags `argv` (kept as a list: the command that made the run)."""
    pretrain.train(config.from_argv(argv))


def read_metrics(run_dir):
    """The rows pretrain.py logged to <run_dir>/metrics.jsonl, one per logged step (step, elapsed, loss,
    l_mlm, ...); a malformed line raises common.DataError naming metrics.jsonl:line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    return [rec for _, rec in common.read_jsonl(path, expected="one JSON object per logged step")]


def run_name(name, steps, seed):
    return f"{name}-n{steps}-s{seed}"


def resume_flag(run_dir):
    """["--resume"] when run_dir holds a checkpoint pretrain.py can resume from (checkpoint/, or the
    .checkpoint.tmp/.old pair a crash inside save() leaves), else []."""
    names = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old")
    found = any(os.path.exists(os.path.join(run_dir, n, "training_state.pt")) for n in names)
    return ["--resume"] if found else []


def pretrain_variant(args, name, flags, seed, steps, model, key):
    """Train (or reuse / resume) one variant from model() (called only if it must train); -> its run dir.
    The run dir holds the run's key (study_key.json): a dir made under another key (other flags, data or
    shape under the same name) is deleted and trained again, never reused or resumed."""
    where = args.runs_dir if args.data == "mini" else os.path.join(args.runs_dir, os.path.basename(
        os.path.normpath(args.data)))  # a second scale's runs beside, not over, the first's of the same name
    run_dir = os.path.join(where, run_name(name, steps, seed))
    key_path = os.path.join(run_dir, "study_key.json")
    if os.path.isdir(run_dir) and (not os.path.exists(key_path) or json.load(open(key_path)) != key):
        print(f"{run_dir}: made under another key (or none recorded); deleting it and training again")
        shutil.rmtree(run_dir)
    if os.path.exists(os.path.join(run_dir, "final", "config.json")):
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    common.atomic_write_json(key_path, key)
    every = max(1, steps // max(1, args.snapshots))
    argv = ["--model", model(), "--data", args.data, "--output-dir", run_dir, "--seed", str(seed),
            "--max-steps", str(steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.train_batch_size),
            "--snapshot-every", str(every), "--save-every", str(every), "--log-every", "1",
            *args.pretrain_args.split(),
            *flags]  # the variant's own flags last: they win over --pretrain-args (a per-batch reading's --route-every)
    run_pretrain(argv + resume_flag(run_dir))
    return run_dir


def curve(args, run_dir):
    """L_MLM against in-process training time (metrics.jsonl), and the score of every snapshot."""
    rows = read_metrics(run_dir)
    at = {r["step"]: r["elapsed"] for r in rows}
    points = []
    for d in sorted(x for x in os.listdir(run_dir) if x.startswith("step_")):
        step = int(d.split("_")[1])
        points.append({"step": step, "elapsed": at[step], **probe(args, os.path.join(run_dir, d),
                                                                  os.path.join(run_dir, f"probe_{d}"))})
    return {"loss": [{"step": r["step"], "elapsed": r["elapsed"], "l_mlm": r["l_mlm"], "loss": r["loss"],
                      "l_cka": r.get("l_cka"), "l_dec": r.get("l_dec")}
                     for r in rows], "snapshots": points}


def data_id(args):
    """--data (as recorded) and a hash of its corpus file, so that a rebuilt corpus invalidates the runs
    made on another."""
    _, corpus = data.resolve_data(args.data)
    with open(corpus, "rb") as f:
        return f"{common.recorded_config(args, ['data'])['data']}@{hashlib.sha256(f.read()).hexdigest()[:12]}"


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
        differs = {k: rec["key"].get(k) for k in key if rec["key"].get(k) != key[k]}
        print(f"{path}: made with other settings ({differs}); running again")
        rec = None
    rec = rec or {"key": key}
    tasks = ft_tasks(args) if want_ft else []
    missing = ("probe" not in rec or (want_curve and "curve" not in rec)
               or any(t not in rec.get("finetune", {}) for t in tasks))
    if not missing:
        return rec
    run_dir = pretrain_variant(args, name, flags, seed, steps, model, key)
    final = os.path.join(run_dir, "final")
    if "probe" not in rec:
        rows = read_metrics(run_dir)
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


TOGETHER = {"dkplm": ("dkplm-plateau",), "dkplm-plateau": ("dkplm",)}  # lists one task runs: --variants filters both


def variants_of(args, task):
    """VARIANTS[task], or the ones --variants names (each must be one of them)."""
    if not getattr(args, "variants", None):
        return VARIANTS[task]
    names = args.variants.split(",")
    known = [n for t in (task, *TOGETHER.get(task, ())) for n, _ in VARIANTS[t]]  # a name of either list is valid
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
        rec = run_record(args, name, flags, seed, steps, model, model_id,
                         want_curve=task in ("efficiency", "frontier", "scale"),
                         want_ft=task != "pilot" and (args.finetune_all or name in FINETUNED))
        v = out.setdefault(name, {"flags": flags, "seeds": {}, "records": {}})
        v["seeds"][str(seed)], v["records"][str(seed)] = flat(rec), rec
    for v in out.values():
        keys = sorted({k for s in v["seeds"].values() for k in s})
        v["mean"] = {k: fmean(s.get(k) for s in v["seeds"].values()) for k in keys}
        v["std"] = {k: stdev([s.get(k) for s in v["seeds"].values()]) for k in keys}
    return out

