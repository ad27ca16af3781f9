"""Robustness probe of issue 32: its cases rerun as a new user would, on the tiny fixtures, one table row each.

    python tests/probe_robustness.py          # a few minutes on 2 cores, one thread per process
    python tests/probe_robustness.py --keep   # and keep the work directory (printed) to look at

Each case runs the real entry points (pretrain.py, evaluate.py, subnetworks.py, bench.py) in fresh
processes on a tiny BERT (tests/conftest.py) and tests/fixtures, and is classified:
  OK            refused in one line naming the flag or file (and its range or what to do) before any work,
                or the run did what it should and left consistent outputs
  DATA-LOSS     outputs lost or mixed (two runs writing one directory)
  SILENT-WRONG  a bad setting accepted: the run trains or scores something else than asked
  UNCLEAR       a traceback, several lines, or a message that does not name the flag / file
The cases of issue 32's item 3 (caches: --cache-dir, $TRELM_CACHE, read-only folders) are in caches(). Not collected
by pytest (no test_ prefix): it classifies rather than asserts; tests/test_guards.py holds the assertions.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DATA = os.path.join(FIXTURES, "tiny_data")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROGRESS = re.compile(r"\d+%\||it/s|s/it|^\[transformers\]|^\s*$")  # tqdm bars and transformers' notices


def start(*argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run(*argv):
    return finish(start(*argv))


def lines(text):
    return [l for l in text.splitlines() if not PROGRESS.search(l)]


def last(r):
    said = lines(r.stderr) or lines(r.stdout)
    return said[-1] if said else f"(exit {r.returncode}, nothing said)"


def refusal(r, *words):
    """A run that should be refused: one line on stderr naming every one of `words`."""
    if r.returncode == 0:
        return "SILENT-WRONG", "accepted: " + last(r)
    said = lines(r.stderr)
    if "Traceback" in r.stderr or len(said) != 1 or not all(w in said[0] for w in words):
        return "UNCLEAR", " / ".join(said[-2:])
    return "OK", said[0]


def wait_for(path, p, timeout=300):
    t0 = time.time()
    while not os.path.exists(path):
        if p.poll() is not None or time.time() - t0 > timeout:
            raise RuntimeError(f"{path} never appeared: {p.stderr.read()[-500:] if p.poll() is not None else ''}")
        time.sleep(0.1)


def tiny_model(work):
    """A saved tiny BERT masked LM (tests/conftest.py's), as the tests use."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import make_bert_tokenizer, make_model
    tok = make_bert_tokenizer(work)
    d = os.path.join(work, "tiny_bert")
    make_model("bert", tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def metrics(out):
    return [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- the cases

def pretrain(model, out, *extra, steps=12):
    return ["pretrain.py", "--method", "mlm", "--model", model, "--data", DATA, "--output-dir", out,
            "--max-steps", str(steps), "--batch-size", "2", "--seq-len", "32", "--log-every", "1",
            "--save-every", "4", *extra]


def collide(model, work, name, extra_a, extra_b, steps=60):
    """Two pretrain.py runs started at once into one --output-dir: one must run to the end with outputs that are
    all its own (a metrics line per step, its config, its last checkpoint, final/) and resume; the other be
    refused in one line (while the first runs: in use; had it already ended: holds a previous run)."""
    out = os.path.join(work, name)
    a, b = (start(*pretrain(model, out, *x, steps=steps)) for x in (extra_a, extra_b))
    ra, rb = finish(a), finish(b)
    done = [(r, x) for r, x in ((ra, extra_a), (rb, extra_b)) if r.returncode == 0]
    refused = [r for r in (ra, rb) if r.returncode != 0]
    if len(done) != 1:
        return "DATA-LOSS", f"{len(done)} of 2 runs finished: " + " | ".join(last(r) for r in (ra, rb))
    cls, line = refusal(refused[0], "--output-dir")
    if cls != "OK" or not ("in use by another run" in line or "holds a previous run" in line):
        return "UNCLEAR" if cls == "OK" else cls, line
    winner = done[0][1]
    cfg = json.load(open(os.path.join(out, "config.json")))["config"]
    import torch
    step = torch.load(os.path.join(out, "checkpoint", "training_state.pt"), weights_only=False)["step"]
    leftovers = [n for n in (".checkpoint.tmp", ".checkpoint.old", ".pretrain.lock")
                 if os.path.exists(os.path.join(out, n))]
    seed = int(winner[winner.index("--seed") + 1]) if "--seed" in winner else 0
    if metrics(out) != list(range(1, steps + 1)) or cfg["seed"] != seed or step != steps or leftovers \
            or not os.path.exists(os.path.join(out, "final", "model.safetensors")):
        return "DATA-LOSS", (f"{len(metrics(out))} metric lines for {steps} steps, config seed {cfg['seed']}, "
                             f"checkpoint step {step}, left {leftovers}")
    resumed = run(*pretrain(model, out, *winner, "--resume", steps=steps + 2))
    if resumed.returncode or metrics(out) != list(range(1, steps + 3)):
        return "DATA-LOSS", "the survivor does not resume: " + last(resumed)
    return "OK", line + f" [the other run: {steps} steps, its own config, resumed to {steps + 2}]"


def killed_then_rerun(model, work):
    """kill -9 mid-run, then --resume: the stale lock is taken over with a note and the run completes."""
    out = os.path.join(work, "killed")
    argv = pretrain(model, out, "--save-every", "5", steps=400)
    a = start(*argv)
    wait_for(os.path.join(out, "checkpoint", "training_state.pt"), a)
    a.send_signal(signal.SIGKILL)
    a.wait()
    r = run(*argv, "--resume")
    note = [l for l in lines(r.stdout) if l.startswith("note:")]
    if r.returncode or not note or f"pid {a.pid}" not in note[0]:
        return "UNCLEAR", (note or [last(r)])[0]
    steps = metrics(out)
    if steps != list(range(1, 401)):
        return "DATA-LOSS", f"metrics.jsonl after the resume: {len(steps)} lines, {len(set(steps))} distinct steps"
    return "OK", note[0]


def evaluate_at_once(model, work):
    """A long evaluate.py --task fewrel runs; the same task into the same --output-dir is refused, another task
    (mini) runs beside it; both results files end complete."""
    out = os.path.join(work, "results")
    fewrel = ["evaluate.py", "--task", "fewrel", "--model-dir", model, "--data-dir", FIXTURES, "--output-dir", out]
    a = start(*fewrel, "--epochs", "1500")
    wait_for(os.path.join(out, ".fewrel.lock"), a)
    same = run(*fewrel, "--epochs", "1")
    other = run("evaluate.py", "--task", "mini", "--model-dir", model, "--probe-dir", os.path.join(DATA, "probes"),
                "--output-dir", out)
    ra = finish(a)
    rows = []
    cls, line = refusal(same, "--output-dir", "in use by another run")
    rows.append(("evaluate.py: the same task twice into one --output-dir at once", cls, line))
    try:
        ok = {t: json.load(open(os.path.join(out, f"{t}.json")))["task"] == t for t in ("fewrel", "mini")}
    except (OSError, ValueError) as e:
        ok = {"error": str(e)}
    if other.returncode or ra.returncode or not all(ok.values()):
        rows.append(("evaluate.py: two tasks into one --output-dir at once", "DATA-LOSS",
                     f"fewrel exit {ra.returncode}, mini exit {other.returncode}, results {ok}"))
    else:
        rows.append(("evaluate.py: two tasks into one --output-dir at once", "OK",
                     f"both ran: {last(other)}; {last(ra)[:60]}..."))
    return rows


def cases(model, work):
    """[(case, classification, the line the user saw)]."""
    rows = []
    rows.append(("pretrain.py: two runs into one --output-dir at once, same flags",
                 *collide(model, work, "same", [], [])))
    rows.append(("pretrain.py: two runs at once, --seed 0 and --seed 1 --lr 1e-4",
                 *collide(model, work, "different", ["--seed", "0"], ["--seed", "1", "--lr", "1e-4"])))
    rows.append(("pretrain.py: kill -9 mid-run, then --resume (stale lock)", *killed_then_rerun(model, work)))
    out = lambda n: os.path.join(work, n)
    for name, extra, words in [
        ("--warmup-steps -5", ["--warmup-steps", "-5"], ["--warmup-steps", ">= 0"]),
        ("--mlm-prob 0", ["--mlm-prob", "0"], ["--mlm-prob", "(0, 1)"]),
        ("--route-threshold 5 (trelm)", ["--method", "trelm", "--route-threshold", "5"],
         ["--route-threshold", "(0, 1]"]),
        ("--log-every 0", ["--log-every", "0"], ["--log-every", "positive"]),
        ("--negatives 0 (trelm: L_CKA = 0)", ["--method", "trelm", "--negatives", "0"], ["--negatives", ">= 1"]),
        ("--seq-len 200 (the tiny model has 160 positions)", ["--seq-len", "200"], ["--seq-len", "<= 160"]),
        ("--warmup-steps 50 with --max-steps 12", ["--warmup-steps", "50"], ["--warmup-steps", "<= --max-steps"]),
        ("--lr nan", ["--lr", "nan"], ["--lr", "finite"]),
        ("--batch-size 0", ["--batch-size", "0"], ["--batch-size", "positive"]),
        ("--seed -1", ["--seed", "-1"], ["--seed", ">= 0"]),
        ("--device cuda on a machine without one", ["--device", "cuda"], ["--device", "no CUDA"]),
    ]:
        if name.startswith("--device") and _cuda():
            continue
        rows.append((f"pretrain.py {name}", *refusal(run(*pretrain(model, out("bad"), *extra)), *words)))
    os.makedirs(out("empty"))
    r = run(*pretrain(model, out("empty"), "--resume"))
    cls, line = refusal(r, "--resume", "no complete checkpoint")
    if cls == "OK" and " sequences, global batch" in r.stdout:
        cls = "UNCLEAR"  # refused only after the data were loaded
    rows.append(("pretrain.py --resume into an empty directory", cls, line))
    rows += evaluate_at_once(model, work)
    open(out("afile"), "w").close()
    for where in (os.path.join(out("afile"), "res"), "/sys/trelm-probe"):
        r = run("evaluate.py", "--task", "fewrel", "--model-dir", model, "--data-dir", FIXTURES, "--output-dir", where,
                "--epochs", "1")
        cls, line = refusal(r, "--output-dir", "not writable")
        if "fewrel seed" in r.stdout:
            cls = "UNCLEAR"  # it trained before refusing
        rows.append((f"evaluate.py --task fewrel, unwritable --output-dir {where}", cls, line))
    ev = lambda task, *extra: run("evaluate.py", "--task", task, "--model-dir", model, "--data-dir", FIXTURES,
                                  "--output-dir", out("res2"), *extra)
    rows.append(("evaluate.py --task glue --lr nan", *refusal(ev("glue", "--lr", "nan"), "--lr", "finite")))
    rows.append(("evaluate.py --task mini --batch-size 0",
                 *refusal(ev("mini", "--batch-size", "0"), "--batch-size", "positive")))
    rows.append(("evaluate.py --task fewrel --max-grad-norm 0 (zero gradients)",
                 *refusal(ev("fewrel", "--max-grad-norm", "0"), "--max-grad-norm", "> 0")))
    rows.append(("evaluate.py --task fewrel --seeds 1,x", *refusal(ev("fewrel", "--seeds", "1,x"), "--seeds")))
    rows.append(("evaluate.py --task ablation --pretrain-args '--route-threshold 5'",
                 *refusal(run("evaluate.py", "--task", "ablation", "--model", model, "--output-dir", out("res3"),
                              "--pretrain-args", "--route-threshold 5"), "--route-threshold", "(0, 1]")))
    sub = run("subnetworks.py", "--model", model, "--lr", "nan", "--output-dir", out("sub"), "--work-dir", out("subw"))
    rows.append(("subnetworks.py --lr nan", *refusal(sub, "--lr")))
    rows.append(("bench.py --hidden 100", *refusal(run("bench.py", "--hidden", "100"), "--hidden")))
    trunc = out("truncated")
    shutil.copytree(model, trunc)
    weights = os.path.join(trunc, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    rows.append(("pretrain.py --model with a truncated model.safetensors",
                 *refusal(run(*pretrain(trunc, out("t1"))), weights, "truncated")))
    rows.append(("evaluate.py --task mini --model-dir with a truncated model.safetensors",
                 *refusal(run("evaluate.py", "--task", "mini", "--model-dir", trunc, "--probe-dir",
                              os.path.join(DATA, "probes"), "--output-dir", out("t2")), weights, "truncated")))
    rows += caches(model, work)
    return rows


def read_only(path):
    """Make the folder `path` read-only for this user -> a function that undoes it, or None where that is not
    possible. Root ignores file modes, so for root it is a read-only bind mount (which needs mount rights)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    for cmd in (["mount", "--bind", path, path], ["mount", "-o", "remount,ro,bind", path]):
        if subprocess.run(cmd, capture_output=True).returncode:
            subprocess.run(["umount", path], capture_output=True)
            return None
    return lambda: subprocess.run(["umount", path], capture_output=True)


def cached_run(r, *dirs):
    """A run that should succeed and leave its caches in `dirs`."""
    if r.returncode != 0:
        return "UNCLEAR", last(r)
    missing = [d for d in dirs if not os.path.isdir(d) or not os.listdir(d)]
    return ("SILENT-WRONG", f"no cache in {missing}") if missing else ("OK", f"exit 0; caches in {', '.join(dirs)}")


def caches(model, work):
    """Issue 32's item 3: --cache-dir and $TRELM_CACHE are honoured, a cache that must take a write and cannot
    ends in one line naming it and the flag, and a read-only cache that already holds everything is enough.
    (The Arrow cache under <out>/data_cache/hf of the issue's probe is gone: issue 31's store replaced it.)"""
    out = lambda n: os.path.join(work, n)
    trelm = ["--method", "trelm", "--max-steps", "2"]
    rows = []
    c = out("cache-flag")
    rows.append(("--cache-dir DIR: KG parse, prepared store and SI scores go there",
                 *cached_run(run(*pretrain(model, out("c1"), *trelm, "--cache-dir", c)),
                             os.path.join(c, "kg"), os.path.join(c, "prepared"), os.path.join(c, "si"))))
    e = out("cache-env")
    rows.append(("$TRELM_CACHE=DIR: the same there",
                 *cached_run(finish(subprocess.Popen([sys.executable, *pretrain(model, out("c2"), *trelm)], cwd=ROOT,
                                                     env={**ENV, "TRELM_CACHE": e}, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True)),
                             os.path.join(e, "kg"), os.path.join(e, "prepared"), os.path.join(e, "si"))))
    undo = read_only(c)
    if undo is None:
        return rows + [("read-only caches", "SKIPPED", "cannot make a folder read-only here (root without mount rights)")]
    try:
        rows.append(("a read-only --cache-dir that already holds this run's caches (a shared, prepared cache)",
                     *cached_run(run(*pretrain(model, out("c3"), *trelm, "--cache-dir", c)), os.path.join(c, "kg"))))
    finally:
        undo()
    ro = out("cache-ro")
    undo = read_only(ro)
    try:
        r = finish(subprocess.Popen([sys.executable, *pretrain(model, out("c4"))], cwd=ROOT, env={**ENV, "TRELM_CACHE": ro},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        rows.append(("a read-only cache ($TRELM_CACHE) with a new --data DIR to prepare", *refusal(r, ro, "--cache-dir")))
        rows.append(("a read-only --cache-dir on the first build of the mini data",
                     *refusal(run(*pretrain(model, out("c5"), "--data", "mini", "--cache-dir", ro)), ro, "--cache-dir")))
    finally:
        undo()
    code = out("code")  # the code alone, no data_cache/: the default cache root is beside it
    os.makedirs(code)
    for f in os.listdir(ROOT):
        if f.endswith(".py"):
            shutil.copy(os.path.join(ROOT, f), code)
    undo = read_only(code)
    try:
        r = finish(subprocess.Popen([sys.executable, os.path.join(code, "pretrain.py"), *pretrain(model, out("c6"), "--data", "mini")[1:]],
                                    cwd=work, env={k: v for k, v in ENV.items() if k != "TRELM_CACHE"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        rows.append(("a read-only code directory on the first build of the mini data",
                     *refusal(r, os.path.join(code, "data_cache"), "--cache-dir")))
    finally:
        undo()
    return rows


def _cuda():
    import torch
    return torch.cuda.is_available()


def main():
    work = tempfile.mkdtemp(prefix="probe-robustness-")
    try:
        rows = cases(tiny_model(work), work)
    finally:
        if "--keep" in sys.argv:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| case | classification | what the user saw |\n|---|---|---|")
    for case, cls, line in rows:
        print(f"| {case} | {cls} | {line.replace('|', '/')} |")
    counts = {c: sum(r[1] == c for r in rows) for c in ("OK", "DATA-LOSS", "SILENT-WRONG", "UNCLEAR", "SKIPPED")}
    print("\n" + ", ".join(f"{n} {c}" for c, n in counts.items()))


if __name__ == "__main__":
    main()
