"""Runs that cannot collide, flags refused before any work, failures in one line (issue 32).

One output directory, one writer: pretrain.py holds <output-dir>/.pretrain.lock and an evaluate.py task
<output-dir>/.<task>.lock for the whole run (common.output_lock); a second process is refused in one
line naming the holder and changes no byte there, and a lock left by a killed holder is taken over with a
note naming it. Every flag of every entry point is checked against its range before anything is read,
written or trained; --resume looks for a checkpoint first; a truncated model.safetensors is one line."""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import bench
import common
import evaluate
import experiments
import finetune
import pretrain
import subnetworks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOLD = ("import sys, common\n"  # holds one output lock until its stdin closes
        "with common.output_lock(sys.argv[1], sys.argv[2], 'holder'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n")


def pretrain_argv(model_dir, out, *extra, method="mlm", steps=4):
    return ["--method", method, "--model", model_dir, "--data", FIX, "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--seq-len", "32", "--log-every", "1", *extra]


def tree(d):
    """{relative path: (size, mtime_ns, sha256)} of every file under d, hidden ones included."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def never(*a, **k):
    raise AssertionError("ran although a flag was refused")


# ----------------------------------------------------------------------------- the lock itself

def test_lock_is_released_on_exit_and_a_stale_one_is_reported(tmp_path, capsys):
    d = tmp_path / "out"
    with common.output_lock(str(d), "t", "x: --output-dir"):
        rec = json.load(open(d / ".t.lock"))
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["started"]
        with common.output_lock(str(d), "t", "x: --output-dir"):  # nested in one process: held once
            pass
        assert (d / ".t.lock").exists()
    assert not (d / ".t.lock").exists()
    with pytest.raises(RuntimeError):
        with common.output_lock(str(d), "t", "x: --output-dir"):
            raise RuntimeError  # an error inside the run releases it too
    assert not (d / ".t.lock").exists()
    # left by a holder that was killed (no process holds the flock any more): taken over with a note
    stale = {"host": "node7", "pid": 4242, "started": "yesterday", "command": "python x"}
    (d / ".t.lock").write_text(json.dumps(stale))
    capsys.readouterr()
    with common.output_lock(str(d), "t", "x: --output-dir"):
        assert json.load(open(d / ".t.lock"))["pid"] == os.getpid()
    said = capsys.readouterr().out
    assert re.search(r"^note: x: --output-dir .*out: the previous run \(pid 4242 on host node7, since yesterday: "
                     r"python x\) ended without releasing its lock", said, re.M), said
    with pytest.raises(SystemExit, match=r"^x: --output-dir .*afile/out: not writable"):
        (tmp_path / "afile").write_text("x")
        with common.output_lock(str(tmp_path / "afile" / "out"), "t", "x: --output-dir"):
            pass


def wait_for(cond, what, proc, timeout=300):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.2)


def test_two_pretrain_processes_into_one_output_dir(tiny_model_dir, tmp_path, capsys):
    """A runs; B into the same --output-dir (same flags, and other flags) is refused in one line naming A
    and changes no byte there; A is killed with SIGKILL; C takes the stale lock over, says so, and runs."""
    out = tmp_path / "run"
    a_argv = pretrain_argv(tiny_model_dir, out, "--save-every", "0", "--log-every", str(10 ** 6), steps=10 ** 6)
    a = subprocess.Popen([sys.executable, "pretrain.py", *a_argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(out / "metrics.jsonl") and os.path.getsize(out / "metrics.jsonl") > 0,
                 "A's step-1 metrics line", a)  # from here on A writes nothing until it ends
        assert json.load(open(out / ".pretrain.lock"))["pid"] == a.pid
        before = tree(out)
        for b_argv in (a_argv, pretrain_argv(tiny_model_dir, out, "--seed", "1", "--lr", "1e-4", steps=3)):
            b = subprocess.run([sys.executable, "pretrain.py", *b_argv], cwd=ROOT, env=ENV, capture_output=True,
                               text=True, timeout=300)
            lines = [l for l in b.stderr.strip().splitlines() if not l.startswith("Loading weights")]
            assert b.returncode == 1 and len(lines) == 1, b.stderr
            assert re.fullmatch(rf"pretrain\.py: --output-dir {re.escape(str(out))}: in use by another run \(pid "
                                rf"{a.pid} on host {re.escape(socket.gethostname())}, since .*\); nothing was changed "
                                r"here\. Wait for it to end, or use another directory", lines[0]), lines[0]
            assert tree(out) == before
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    capsys.readouterr()
    pretrain.main(pretrain_argv(tiny_model_dir, out, steps=2))
    said = capsys.readouterr().out
    assert f"the previous run (pid {a.pid} on host {socket.gethostname()}" in said and "ended without releasing" in said
    assert (out / "final" / "model.safetensors").exists() and not (out / ".pretrain.lock").exists()


def test_evaluate_task_lock_is_per_task(tiny_model_dir, tmp_path):
    """The same task twice into one --output-dir: the second is refused in one line naming the holder
    and its results file is untouched; another task into the same --output-dir runs."""
    out = tmp_path / "res"
    argv = ["--task", "mini", "--model-dir", tiny_model_dir, "--probe-dir", os.path.join(FIX, "probes"),
            "--output-dir", str(out)]
    evaluate.main(argv)
    for task, refused in (("mini", True), ("glue", False)):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), task], cwd=ROOT, env=ENV, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert holder.stdout.readline().strip() == "held", holder.stderr.read()
            before = tree(out)
            if refused:
                r = subprocess.run([sys.executable, "evaluate.py", *argv], cwd=ROOT, env=ENV, capture_output=True,
                                   text=True, timeout=300)
                assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
                assert re.fullmatch(rf"evaluate\.py --task mini: --output-dir {re.escape(str(out))}: in use by another "
                                    rf"run \(pid {holder.pid} on host .*\); nothing was changed here\. .*",
                                    r.stderr.strip()), r.stderr
                assert tree(out) == before
            else:
                evaluate.main(argv)
                assert tree(out)["mini.json"] != before["mini.json"]  # rewritten beside the other task's lock
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
    assert sorted(os.listdir(out)) == ["mini.json"]  # every lock released and deleted


def test_study_locks_are_per_task_and_seeds():
    """docs/study.md runs `--task ablation --seeds 0`, `--seeds 1`, `--seeds 2` at once: each its own lock;
    reproduce holds every task's."""
    parse = lambda *a: evaluate.build_parser("ablation").parse_args(["--task", *a])
    assert experiments.lock_names(parse("ablation", "--seeds", "0")) == ["ablation.seeds-0"]
    assert experiments.lock_names(parse("ablation", "--seeds", "1")) == ["ablation.seeds-1"]
    assert experiments.lock_names(parse("same-code")) == ["same-code"]
    names = experiments.lock_names(parse("reproduce"))
    assert names[0] == "reproduce" and "ablation.seeds-0,1,2" in names and "f1-floor" in names and "base" in names


# ----------------------------------------------------------------------------- pretrain.py flags

@pytest.mark.parametrize("extra,method,flag,expected", [
    (["--warmup-steps", "-5"], "mlm", "--warmup-steps", "expected an integer >= 0, got -5"),
    (["--warmup-steps", "10"], "mlm", "--warmup-steps", "expected <= --max-steps (4)"),
    (["--mlm-prob", "0"], "mlm", "--mlm-prob", "expected a share in (0, 1)"),
    (["--mlm-prob", "1"], "mlm", "--mlm-prob", "expected a share in (0, 1)"),
    (["--route-threshold", "5"], "trelm", "--route-threshold", "expected (0, 1]"),
    (["--log-every", "0"], "mlm", "--log-every", "expected a positive integer, got 0"),
    (["--batch-size", "0"], "mlm", "--batch-size", "expected a positive integer, got 0"),
    (["--grad-accum", "0"], "mlm", "--grad-accum", "expected a positive integer, got 0"),
    (["--max-steps", "0"], "mlm", "--max-steps", "expected a positive integer, got 0"),
    (["--lr", "nan"], "mlm", "--lr", "expected a finite number, got nan"),
    (["--lr", "0"], "mlm", "--lr", "expected > 0"),
    (["--seed", "-1"], "mlm", "--seed", "expected an integer >= 0"),
    (["--seed", str(2 ** 32)], "mlm", "--seed", "expected an integer in [0, 2**32)"),
    (["--seq-len", "4"], "mlm", "--seq-len", "expected 8..4096"),
    (["--seq-len", "200"], "mlm", "--seq-len", "expected <= 160 (the positions of --model"),
    (["--negatives", "0"], "trelm", "--negatives", "expected >= 1 with --method trelm"),
    (["--important-fraction", "0"], "trelm", "--important-fraction", "expected (0, 1]"),
    (["--route-ratio", "0"], "trelm", "--route-ratio", "expected (0, 1]"),
    (["--ig-steps", "0"], "trelm", "--ig-steps", "expected a positive integer"),
    (["--gamma", "2"], "trelm", "--gamma", "expected a value in [0, 1]"),
])
def test_pretrain_flag_refused_before_anything(extra, method, flag, expected, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "train", never)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pretrain.main(pretrain_argv(tiny_model_dir, out, *extra, method=method))
    assert one_line(e).startswith(f"pretrain.py: {flag}: ") and expected in str(e.value), str(e.value)
    assert not out.exists()


def test_resume_into_an_empty_dir_is_refused_before_data(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "Trainer", never)  # no model, data or SI before the refusal
    with pytest.raises(SystemExit, match=r"^--resume: no complete checkpoint in --output-dir .*empty"):
        pretrain.main(pretrain_argv(tiny_model_dir, tmp_path / "empty", "--resume"))
    assert os.listdir(tmp_path / "empty") == []


# ----------------------------------------------------------------------------- evaluate.py flags

EVALUATE_CASES = [
    ("glue", ["--lr", "nan"], "--lr: expected a finite number, got nan"),
    ("glue", ["--lr=-1e-5"], "--lr: expected a learning rate > 0"),
    ("mini", ["--batch-size", "0"], "--batch-size: expected a positive integer"),
    ("fewrel", ["--batch-size", "-3"], "--batch-size: expected a positive integer"),
    ("mini", ["--seed", "-1"], "--seed: expected an integer in [0, 2**32)"),
    ("glue", ["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
    ("fewrel", ["--max-seq-len", "4"], "--max-seq-len: expected an integer >= 8"),
    ("fewrel", ["--train-limit", "-1"], "--train-limit: expected an integer >= 0"),
    ("tacred", ["--eval-limit", "-1"], "--eval-limit: expected an integer >= 0"),
    ("fewrel", ["--split-seed", "-2"], "--split-seed: expected an integer >= 0"),
    ("fewrel", ["--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    ("fewrel", ["--warmup", "1.5"], "--warmup: expected a fraction of the steps in [0, 1]"),
    ("fewrel", ["--weight-decay", "-0.1"], "--weight-decay: expected a value >= 0"),
    ("fewrel", ["--max-grad-norm", "0"], "--max-grad-norm: expected a norm > 0"),
    ("open-entity", ["--threshold", "1"], "--threshold: expected a probability in (0, 1)"),
    ("fewrel", ["--fewrel-split", "70,10"], "--fewrel-split: expected three percentages >= 0 summing to 100"),
    ("glue", ["--glue-tasks", "CoLA,BoolQ"], "--glue-tasks: unknown task 'BoolQ'"),
    ("lama-uhn", ["--uhn-top-k", "0"], "--uhn-top-k: expected an integer >= 1"),
    ("mini", ["--vocab", "common"], "--task mini --vocab common: the embedded data ships no common vocabulary"),
    ("mini", ["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    ("ablation", ["--steps", "0"], "--steps: expected an integer >= 1"),
    ("ablation", ["--seeds", "0,x"], "--seeds 0,x: expected comma-separated integers"),
    ("ablation", ["--train-batch-size", "0"], "--train-batch-size: expected an integer >= 1"),
    ("ablation", ["--ft-epochs", "0"], "--ft-epochs: expected an integer >= 1"),
    ("ablation", ["--ft-eval-limit", "-1"], "--ft-eval-limit: expected an integer >= 0"),
    ("ablation", ["--finetune", "fewrel,glue"], "--finetune fewrel,glue: unknown ['glue']"),
    ("ablation", ["--variants", "nope"], "--variants: ['nope'] not in --task ablation"),
    ("dkplm", ["--plateau", "-1"], "--plateau: expected an integer >= 0 (0: no plateau runs)"),
    ("ablation", ["--seq-len", "4"], "pretrain.py: --seq-len: expected 8..4096"),
    ("hparams", ["--pretrain-args", "--route-threshold 5"], "pretrain.py: --route-threshold: expected (0, 1]"),
    ("ablation", ["--pretrain-args", "--no-such-flag 1"], "['--no-such-flag', '1'] are not pretrain.py flags"),
    ("pilot", ["--pilot-steps", "0,2"], "--pilot-steps: expected comma-separated step counts >= 1"),
    ("pilot", ["--target-effect", "nan"], "--target-effect: expected a finite difference > 0"),
    ("f1-floor", ["--floor-budgets", "100x0"], "--floor-budgets: expected ROWSxEPOCHS"),
    ("f1-floor", ["--floor-effect", "0"], "--floor-effect: expected a finite difference > 0"),
    ("same-code", [], "--task same-code needs --against COMMIT"),
    ("reproduce", ["--variants", "mlm"], "--variants: ['mlm'] not in --task ablation"),
]


@pytest.mark.parametrize("task,extra,expected", EVALUATE_CASES)
def test_evaluate_flag_refused_before_anything(task, extra, expected, tiny_model_dir, tmp_path, monkeypatch):
    module = evaluate.TASK_MODULE[task]
    monkeypatch.setitem(module.TASKS, task, never)
    model = ["--model", tiny_model_dir] if module is experiments else ["--model-dir", tiny_model_dir]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", task, *model, "--output-dir", str(tmp_path / "res"), *extra])
    assert expected in one_line(e), str(e.value)
    assert not (tmp_path / "res").exists()


def test_evaluate_unwritable_output_dir_is_refused_before_the_task(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(finetune.TASKS, "glue", never)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "glue", "--model-dir", tiny_model_dir, "--output-dir", str(tmp_path / "afile" / "r")])
    assert re.fullmatch(r"evaluate\.py --task glue: --output-dir .*afile/r: not writable \(.*\)", one_line(e))


# ----------------------------------------------------------------------------- subnetworks.py, bench.py

@pytest.mark.parametrize("extra,expected", [
    (["--steps", "0"], "--steps: expected an integer >= 1"),
    (["--lr", "nan"], "--lr: expected a finite number"),
    (["--lr", "0"], "--lr: expected a value > 0"),
    (["--init-prob", "1"], "--init-prob: expected a probability in (0, 1)"),
    (["--route-ratio", "0"], "--route-ratio: expected a fraction in (0, 1]"),
    (["--warmup", "2"], "--warmup: expected a fraction of the steps in [0, 1]"),
    (["--seeds", "-1"], "--seeds: expected integers in [0, 2**32)"),
    (["--random-seeds", "0"], "--random-seeds: expected an integer >= 1"),
    (["--top-layers", "0"], "--top-layers: expected an integer >= 1"),
    (["--control-size", "1"], "--control-size: expected an integer >= 2"),
    (["--w-sparse", "-1"], "--w-sparse: expected a weight >= 0"),
])
def test_subnetworks_flag_refused_before_anything(extra, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(subnetworks, "run", never)
    with pytest.raises(SystemExit) as e:
        subnetworks.main(["--output-dir", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work"), *extra])
    assert one_line(e).startswith("subnetworks.py: ") and expected in str(e.value), str(e.value)
    assert not (tmp_path / "res").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--batch", "0"], "--batch: expected a positive integer"),
    (["--layers", "0"], "--layers: expected a positive integer"),
    (["--hidden", "100"], "--hidden: expected a size divisible by its 3 attention heads"),
    (["--seq", "1024"], "--seq: expected 8..512"),
    (["--route-every", "0"], "--route-every: expected a positive integer"),
    (["--costs", "AFILE/costs.json"], "--costs AFILE/costs.json: cannot create its folder"),
])
def test_bench_flag_refused_before_anything(extra, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "configs", never)
    monkeypatch.setattr(bench, "write_costs", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "AFILE").write_text("x")
    with pytest.raises(SystemExit) as e:
        bench.main(extra)
    assert one_line(e).startswith("bench.py: ") and expected in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- a truncated model file

def test_truncated_model_file_is_one_line_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    weights = os.path.join(tiny_model_dir, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)  # an interrupted copy
    expected = f"{weights} is truncated or corrupt (safetensors: "
    for load in (common.load_mlm, common.has_mlm_head):
        with pytest.raises(SystemExit) as e:
            load(tiny_model_dir)
        assert one_line(e).startswith(f"--model {tiny_model_dir}: {expected}")
    with pytest.raises(SystemExit) as e:
        pretrain.main(pretrain_argv(tiny_model_dir, tmp_path / "run"))
    assert expected in one_line(e)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "mini", "--model-dir", tiny_model_dir, "--probe-dir", os.path.join(FIX, "probes"),
                       "--output-dir", str(tmp_path / "res")])
    assert one_line(e).startswith(f"--model-dir {tiny_model_dir}: {expected}")
    assert not os.path.exists(tmp_path / "res" / "mini.json")
