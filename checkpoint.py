"""Checkpoints, exact resume and the output directory of a pretrain.py run.

    <output-dir>/checkpoint/     model + tokenizer + training_state.pt (for --resume), written every
                                 --save-every steps and at the end
    <output-dir>/final/          model + tokenizer (AutoModelForMaskedLM / AutoTokenizer loadable)
    <output-dir>/step_NNNNNN/    model snapshots (--snapshot-every)
    <output-dir>/metrics.jsonl, routing.jsonl, config.json
    <output-dir>/.pretrain.lock  held by the run writing here (pretrain.train, common.output_lock): a second
                                 run into the same directory is refused; deleted when the run ends

A directory is written into .<name>.tmp and renamed: <name> -> .<name>.old, .<name>.tmp -> <name>,
then .<name>.old is deleted. A crash between the two renames leaves two complete copies;
find_checkpoint takes the newer. training_state.pt is written last, so a torn copy has none.

A resumed run must be the same run: every flag outside OPERATIONAL, the world size and the global
batch must match the checkpoint's (differences() names each one), with one exception: --max-steps may
be raised to extend a run. The linear learning-rate decay is then recomputed for the new total (the
warm-up stays as recorded, config.recorded_warmup), and config.json records the extension. Logs written
after the checkpoint's step are dropped (trim_log), so a resumed run writes them again exactly once.
Nothing is written to the run's logs before the resume is validated.
"""
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import common

# Flags that change nothing the run computes. Every other flag, including any added later, must match
# the checkpoint's on --resume (--max-steps may grow): otherwise the resumed run is silently another run.
OPERATIONAL = ("output_dir", "save_every", "snapshot_every", "log_every", "num_proc", "device", "resume",
               "overwrite", "debug", "cache_dir", "ddp_timeout", "preset", "loader_workers")
RUN_FILES = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old", "final")
LOGS = ("metrics.jsonl", "routing.jsonl")


# ----------------------------------------------------------------------------- before anything loads

def prepare_output_dir(run):
    """--output-dir must be writable, and a previous run in it is continued (--resume: it must hold a
    complete checkpoint, checked here before any data loads) or deleted (--overwrite), never silently
    replaced. run: config.Run."""
    out = run.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"pretrain.py: --output-dir {out}: not writable ({e.strerror or e})")
    if run.resume:
        find_checkpoint(out, warn=False)  # Trainer.resume reads it again (and warns) once the model is built
        return
    previous = [n for n in RUN_FILES if os.path.isdir(os.path.join(out, n))]
    if not previous:
        return
    if not run.overwrite:
        raise SystemExit(f"pretrain.py: --output-dir {out} holds a previous run ({', '.join(previous)}); pass "
                         f"--resume to continue it, or --overwrite to delete it and start afresh")
    if int(os.environ.get("RANK", 0)) == 0:
        snapshots = [n for n in os.listdir(out) if n.startswith("step_")]
        for n in previous + snapshots:
            shutil.rmtree(os.path.join(out, n))
        for n in ("config.json",) + LOGS:
            if os.path.exists(os.path.join(out, n)):
                os.remove(os.path.join(out, n))
        print(f"--overwrite: deleted the previous run in {out} ({', '.join(previous + snapshots)})", flush=True)


# ----------------------------------------------------------------------------- writing

def rng_states(device, ddp, world):
    """[per rank: python, numpy, torch (and cuda) RNG states], gathered on every rank under DDP."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not ddp:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save(out, name, model, tok, training_state=None):
    """Write <out>/<name>/ (model + tokenizer [+ training_state.pt, written last]) atomically (module
    docstring). Rank 0 only."""
    final, tmp, old = (os.path.join(out, n) for n in (name, f".{name}.tmp", f".{name}.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if training_state is not None:
        torch.save(training_state, os.path.join(tmp, "training_state.pt"))
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def find_checkpoint(out, warn=True):
    """-> (training_state, dir) of the newest complete checkpoint in out: checkpoint/ when it loads,
    else (a crash inside save()) the newer loadable one of .checkpoint.tmp/ and .checkpoint.old/ (said in
    a warning unless warn=False)."""
    found, errors = [], []
    for name in ("checkpoint", ".checkpoint.tmp", ".checkpoint.old"):
        d = os.path.join(out, name)
        if not os.path.isdir(d):
            continue
        try:
            st = torch.load(os.path.join(d, "training_state.pt"), map_location="cpu", weights_only=False)
            with safe_open(os.path.join(d, "model.safetensors"), "pt"):  # header and size complete
                pass
        except Exception as e:  # missing or torn: not a complete checkpoint
            errors.append(f"{d}: {type(e).__name__}")
            continue
        if name == "checkpoint":
            return st, d
        found.append((st["step"], d, st))
    if not found:
        raise SystemExit(f"--resume: no complete checkpoint in --output-dir {out} (looked for checkpoint/, "
                         f".checkpoint.tmp/, .checkpoint.old/ with training_state.pt and model.safetensors"
                         + (f"; unreadable: {', '.join(errors)}" if errors else "") + ")")
    step, d, st = max(found, key=lambda f: f[0])
    if warn:
        print(f"warning: --resume: {out}/checkpoint/ is missing or torn (a crash inside save()); resuming from the "
              f"newest complete copy, {d} (step {step})", flush=True)
    return st, d


def differences(st, new, world, global_batch, deterministic, defaults=None):
    """['--flag old -> new', ...]: every run-changing difference between a checkpoint and this run's
    flags `new` (config.Config.flat()). A larger --max-steps is an extension, not a difference; a flag
    added after the checkpoint was written matches it at its default (`defaults`: config.defaults()),
    the behaviour the checkpoint's code had."""
    old = {**{k: v for k, v in (defaults or {}).items() if k in new}, **st["config"]}
    diff = []
    for k in sorted(set(old) | set(new)):
        if k in OPERATIONAL or old.get(k, "(not recorded)") == new.get(k, "(not recorded)"):
            continue
        if k == "max_steps" and new[k] > old.get(k, new[k]):
            continue
        diff.append(f"--{k.replace('_', '-')} {old.get(k, '(not recorded)')} -> {new.get(k, '(not set)')}")
    old_world = st.get("world", len(st["rng"]))
    if old_world != world:
        diff.append(f"world size (processes) {old_world} -> {world}")
    batch = st.get("global_batch", new["batch_size"] * new["grad_accum"] * old_world)
    if batch != global_batch:
        diff.append(f"global batch {batch} -> {global_batch}")
    if deterministic and st.get("threads") != torch.get_num_threads():  # reductions split by thread
        diff.append(f"threads per process {st.get('threads')} -> {torch.get_num_threads()} (set OMP_NUM_THREADS)")
    return diff


def load_weights(model, ck):
    """The checkpoint's weights into model; tied parameters are saved once, under one of their names."""
    weights = load_file(os.path.join(ck, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    tied = {n for group in names.values() if any(m in weights for m in group) for n in group}
    if unexpected or set(missing) - tied:
        raise SystemExit(f"--resume: {ck}/model.safetensors does not match the model "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")


def restore_rng(rng, device):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def promote(out, ck, ddp, master):
    """A checkpoint recovered from a crash inside save() becomes checkpoint/ again."""
    if os.path.basename(ck) == "checkpoint":
        return
    if ddp:
        dist.barrier()  # every rank has read it
    if master:
        os.replace(ck, os.path.join(out, "checkpoint"))
        for n in (".checkpoint.tmp", ".checkpoint.old"):
            shutil.rmtree(os.path.join(out, n), ignore_errors=True)


def trim_log(path, last):
    """On resume drop the lines of a JSONL log whose "step" is above `last` (written after the
    checkpoint: they will be written again), and a torn last line (the process died while writing it)
    with a warning. metrics.jsonl counts completed steps (last = the checkpoint's step); routing.jsonl
    the steps completed before a routing (last = the checkpoint's step - 1: a routing at the
    checkpoint's step is redone after it)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise SystemExit(f"--resume: {path}:{n}: not a JSON line (only a torn last line is repaired); "
                                 f"fix or delete {os.path.basename(path)}")
            print(f"warning: {path}:{n}: dropped a torn last line ({line[:40]!r}...)", flush=True)
            continue
        if rec.get("step", 0) <= last:
            keep.append(line if line.endswith("\n") else line + "\n")
    common.atomic_write(path, lambda tmp: open(tmp, "w").writelines(keep))
