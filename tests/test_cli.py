"""pretrain.py as a user meets it: nothing lost on a rerun, a resume that is the same run
or a refusal naming the difference, recovery from a crash inside save() and a torn metrics line,
one-line messages instead of tracebacks, and a refusal when nothing can be injected."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import optim
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "tiny_data")


def run(model_dir, out, *extra, method="mlm", steps=4, data=FIX):
    pretrain.main(["--method", method, "--model", model_dir, "--data", data, "--output-dir", str(out),
                   "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
                   "--seed", "3", *extra])


def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def step_of(ck):
    return torch.load(os.path.join(ck, "training_state.pt"), weights_only=False)["step"]


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_rerun_without_resume_is_refused_and_overwrite_starts_afresh(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    run(tiny_model_dir, out, steps=6)
    before, rows = weights(out / "checkpoint"), metrics(out)
    with pytest.raises(SystemExit, match=r"holds a previous run .*--resume.*--overwrite"):
        run(tiny_model_dir, out, steps=3)
    assert step_of(out / "checkpoint") == 6  # untouched
    assert all(torch.equal(before[k], weights(out / "checkpoint")[k]) for k in before)
    assert metrics(out) == rows
    run(tiny_model_dir, out, "--overwrite", steps=3)
    assert step_of(out / "checkpoint") == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    with pytest.raises(SystemExit, match=r"--resume/--overwrite: pass one"):
        run(tiny_model_dir, out, "--overwrite", "--resume", steps=3)


def test_resume_refuses_every_run_changing_flag(tiny_model_dir, tmp_path):
    """Every flag outside Trainer.OPERATIONAL must match (--max-steps may only grow: an extension); the
    checkpoint and config.json stay the run's record; operational flags may change."""
    out = tmp_path / "r"
    run(tiny_model_dir, out, "--no-routing", method="trelm", steps=2)
    config = json.load(open(out / "config.json"))
    for flag, value, shown in [("--weight-decay", "0.1", "--weight-decay 0.01 -> 0.1"),
                               ("--grad-clip", "0.5", "--grad-clip 1.0 -> 0.5"),
                               ("--si-window", "4", "--si-window 8 -> 4"),
                               ("--important-fraction", "0.25", "--important-fraction 0.5 -> 0.25"),
                               ("--long-tail-percentile", "80", "--long-tail-percentile 50.0 -> 80.0"),
                               ("--memory-dtype", "bf16", "--memory-dtype fp32 -> bf16"),
                               ("--train-layernorm", None, "--train-layernorm False -> True"),
                               ("--max-steps", None, "--max-steps 2 -> 1")]:
        extra = [flag] + ([value] if value else [])
        if flag == "--max-steps":
            extra = []
        with pytest.raises(SystemExit, match="different run.*" + shown.replace(".", r"\.")) as e:
            run(tiny_model_dir, out, "--no-routing", "--resume", *extra, method="trelm", steps=1 if flag == "--max-steps" else 2)
        assert str(e.value).count("->") == 1, str(e.value)  # exactly the one difference is named
    assert json.load(open(out / "config.json")) == config
    # operational flags are not part of the run
    run(tiny_model_dir, out, "--no-routing", "--resume", "--save-every", "7", "--log-every", "5", "--num-proc", "1",
        method="trelm", steps=2)
    rec = json.load(open(out / "config.json"))
    assert [r["step"] for r in rec["resumed"]] == [2] and rec["commit"] == config["commit"]
    assert {k: v for k, v in rec["config"].items() if k not in pretrain.Trainer.OPERATIONAL} == \
           {k: v for k, v in config["config"].items() if k not in pretrain.Trainer.OPERATIONAL}


def test_resume_with_more_steps_extends_the_run(tiny_model_dir, tmp_path, capsys):
    """A finished 4-step run resumed with --max-steps 6 continues to step 6: the first 4 steps stay as
    they were, the learning rate of steps 5-6 is lr_at() for 6 steps with the recorded warm-up, one
    line says so, config.json records the extension, and a changed flag beside it is still refused."""
    out = tmp_path / "r"
    run(tiny_model_dir, out, steps=4)
    first = metrics(out)
    recorded = json.load(open(out / "config.json"))
    with pytest.raises(SystemExit, match=r"different run.*--lr 0\.0003 -> 0\.001"):
        run(tiny_model_dir, out, "--resume", "--lr", "1e-3", steps=6)
    capsys.readouterr()
    run(tiny_model_dir, out, "--resume", steps=6)
    said = capsys.readouterr().out
    assert "extending the run from --max-steps 4 to 6 at step 4" in said and "recomputed for 6 steps" in said
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:4] == first
    warmup = recorded["config"]["warmup_steps"]
    ext = config.from_argv(["--max-steps", "6", "--warmup-steps", str(warmup)])
    assert [r["lr"] for r in rows[4:]] == [round(optim.lr_at(s, ext.optim), 6) for s in (4, 5)]
    assert rows[4]["lr"] > 0  # the 4-step schedule had reached 0
    rec = json.load(open(out / "config.json"))
    assert rec["config"]["max_steps"] == 6 and rec["config"]["warmup_steps"] == warmup
    assert rec["resumed"] == [{"step": 4, "commit": rec["resumed"][0]["commit"], "max_steps": [4, 6]}]
    assert step_of(out / "checkpoint") == 6


def test_refused_resume_writes_nothing_and_routing_log_is_trimmed(tmp_path, tiny_model_dir, monkeypatch):
    """A refused --resume leaves every log as it was (a fresh-head model logs its routing warm-up:
    only at a fresh start); a resumed run drops the routing lines written after its checkpoint, so
    routing.jsonl ends equal to the uninterrupted run's (timings aside)."""
    from transformers import BertModel
    from conftest import make_bert_tokenizer, make_model
    tok = make_bert_tokenizer(tmp_path)
    encoder_only = str(tmp_path / "encoder_only")
    BertModel(make_model("bert", tok).config).save_pretrained(encoder_only)
    tok.save_pretrained(encoder_only)
    routed = ("--route-every", "2", "--ig-steps", "2")
    run(encoder_only, tmp_path / "full", *routed, method="trelm", steps=8)
    orig = pretrain.Trainer.train_step

    def interrupted(self):  # dies in step 8, after the step-5 checkpoint and the routing at step 6
        if self.step == 7:
            raise KeyboardInterrupt
        return orig(self)
    monkeypatch.setattr(pretrain.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(encoder_only, tmp_path / "split", *routed, "--save-every", "5", method="trelm", steps=8)
    monkeypatch.setattr(pretrain.Trainer, "train_step", orig)
    split = tmp_path / "split"
    logs = {n: open(split / n).read() for n in ("routing.jsonl", "metrics.jsonl", "config.json")}
    for _ in range(3):
        with pytest.raises(SystemExit, match="different run"):
            run(encoder_only, split, *routed, "--resume", "--save-every", "5", "--seed", "4", method="trelm", steps=8)
    assert {n: open(split / n).read() for n in logs} == logs
    run(encoder_only, split, *routed, "--resume", "--save-every", "5", method="trelm", steps=8)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "attr_s"} for l in open(p)]
    assert strip(split / "routing.jsonl") == strip(tmp_path / "full" / "routing.jsonl")
    assert [r["step"] for r in strip(split / "routing.jsonl")] == [0, 2, 4, 6]


def test_a_flag_added_after_the_checkpoint_matches_it_at_its_default(tiny_model_dir, tmp_path):
    """A flag the checkpoint does not record (added later by another change) stands for the behaviour the
    checkpoint's code had: at its default the resume goes on, at any other value it is refused."""
    out = tmp_path / "r"
    run(tiny_model_dir, out, steps=2)
    path = out / "checkpoint" / "training_state.pt"
    st = torch.load(path, weights_only=False)
    del st["config"]["whole_word_mask"]
    torch.save(st, path)
    with pytest.raises(SystemExit, match=r"--whole-word-mask False -> True"):
        run(tiny_model_dir, out, "--resume", "--whole-word-mask", steps=3)
    run(tiny_model_dir, out, "--resume", steps=3)
    assert [r["step"] for r in metrics(out)][-1] == 3


def test_resume_refuses_another_world_size(tiny_model_dir, tmp_path):
    """A 2-process checkpoint (RNG states of two ranks, world 2, global batch 8) resumed by one process."""
    out = tmp_path / "r"
    run(tiny_model_dir, out, steps=2)
    path = out / "checkpoint" / "training_state.pt"
    st = torch.load(path, weights_only=False)
    st.update(world=2, global_batch=8, rng=st["rng"] * 2)
    torch.save(st, path)
    with pytest.raises(SystemExit, match=r"world size \(processes\) 2 -> 1, global batch 8 -> 4"):
        run(tiny_model_dir, out, "--resume", steps=2)
    st.update(world=1, global_batch=4, rng=st["rng"][:1])
    del st["world"], st["global_batch"]  # a checkpoint from before this field: world = len(rng)
    torch.save(st, path)
    run(tiny_model_dir, out, "--resume", steps=2)


def test_resume_after_crash_between_renames_and_torn_metrics_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """save() dies after checkpoint/ -> .checkpoint.old and before .checkpoint.tmp -> checkpoint/ (step 4),
    and metrics.jsonl ends in half a line: --resume takes the newer complete copy, drops the torn line,
    and ends bitwise equal to the uninterrupted run."""
    run(tiny_model_dir, tmp_path / "full", steps=6)
    real = os.replace

    def crash(src, dst):
        if src.endswith(".checkpoint.tmp") and pretrain_step[0] == 4:
            raise KeyboardInterrupt  # power loss between the two renames
        return real(src, dst)
    pretrain_step = [0]
    orig_save = pretrain.Trainer.save

    def save(self, name, training_state=True):
        pretrain_step[0] = self.step
        return orig_save(self, name, training_state)
    monkeypatch.setattr(pretrain.os, "replace", crash)
    monkeypatch.setattr(pretrain.Trainer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "split", "--save-every", "2", steps=6)
    monkeypatch.undo()
    split = tmp_path / "split"
    assert not (split / "checkpoint").exists()
    assert step_of(split / ".checkpoint.old") == 2 and step_of(split / ".checkpoint.tmp") == 4
    with open(split / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "l_ml')
    capsys.readouterr()
    run(tiny_model_dir, split, "--resume", "--save-every", "2", steps=6)
    err = capsys.readouterr().out
    assert "resuming from the newest complete copy" in err and "(step 4)" in err
    assert "dropped a torn last line" in err
    assert not (split / ".checkpoint.tmp").exists() and not (split / ".checkpoint.old").exists()
    a, b = weights(tmp_path / "full" / "final"), weights(split / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "full")] == [r["loss"] for r in metrics(split)]


def test_resume_without_any_complete_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    run(tiny_model_dir, out, steps=2)
    os.rename(out / "checkpoint", out / ".checkpoint.tmp")
    with open(out / ".checkpoint.tmp" / "training_state.pt", "r+b") as f:
        f.truncate(100)  # torn while being written
    with pytest.raises(SystemExit, match=r"no complete checkpoint .*unreadable: .*\.checkpoint\.tmp"):
        run(tiny_model_dir, out, "--resume", steps=2)


@pytest.mark.parametrize("argv,msg", [
    (["--lr", "nan"], r"--lr: expected a finite number, got nan"),
    (["--weight-decay", "inf"], r"--weight-decay: expected a finite number"),
    (["--grad-clip", "-1"], r"--weight-decay/--grad-clip: expected non-negative"),
])
def test_non_finite_and_negative_flags(argv, msg, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=msg):
        run(tiny_model_dir, tmp_path / "r", *argv)


def test_divergence_stops_with_one_true_message(tiny_model_dir, tmp_path):
    """--lr 1e6 diverges: the loss is huge at step 2 and NaN at step 3, where the run stops (counted as
    metrics.jsonl counts) and says no checkpoint exists when none does."""
    with pytest.raises(SystemExit, match=r"non-finite loss .* at step 3; no checkpoint was written \(--save-every 100\)"):
        run(tiny_model_dir, tmp_path / "r", "--no-routing", "--lr", "1e6", "--grad-clip", "0", method="trelm", steps=4)
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2]
    with pytest.raises(SystemExit, match=r"non-finite .* at step 3; the last good checkpoint \(step 2\) is kept"):
        run(tiny_model_dir, tmp_path / "s", "--lr", "1e6", "--grad-clip", "0", "--save-every", "2", "--warmup-steps", "2",
            method="mlm", steps=6)


def test_data_errors_are_one_line_and_debug_gives_the_traceback(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FIX, bad)
    with open(bad / "corpus.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9 in Paris"}\n')  # latin-1, not UTF-8
    n = sum(1 for _ in open(FIX + "/corpus.jsonl"))
    with pytest.raises(SystemExit, match=rf"pretrain.py: .*corpus.jsonl:{n + 1}: not valid UTF-8"):
        run(tiny_model_dir, tmp_path / "r", data=str(bad))
    import common
    with pytest.raises(common.DataError, match="not valid UTF-8"):
        run(tiny_model_dir, tmp_path / "r2", "--debug", data=str(bad))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--model", tiny_model_dir, "--data",
                        str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r3")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("Loading weights")]  # transformers' bar
    assert len(lines) == 1 and lines[0].startswith("pretrain.py: --data"), r.stderr


def test_unwritable_output_dir_fails_before_anything_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"--output-dir .*afile/run: not writable"):
        pretrain.main(["--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "afile" / "run")])


def test_start_message_and_refusal_when_nothing_can_be_injected(tiny_model_dir, tmp_path, capsys):
    run(tiny_model_dir, tmp_path / "ok", "--no-routing", method="trelm", steps=1)
    out = capsys.readouterr().out
    rows = [json.loads(l) for l in open(FIX + "/corpus.jsonl")]
    mentions = sum(len(r.get("entities", [])) for r in rows)  # lines without "entities" are alias-linked: more
    line = next(l for l in out.splitlines() if "linked mentions" in l)
    assert int(line.split(": ")[1].split()[0]) >= mentions > 0 and "per sequence" in line and "may inject" in line
    cfg = json.load(open(tmp_path / "ok" / "config.json"))
    assert 0 < cfg["injectable_mentions"] <= cfg["mentions"]
    plain = tmp_path / "plain"  # a KG whose entities never occur in the text
    shutil.copytree(os.path.join(FIX, "kg"), plain / "kg")
    (plain / "corpus.txt").write_text("nothing to link here at all .\nthe river is new .\n" * 10)
    for method in ("trelm", "dkplm"):
        with pytest.raises(SystemExit, match=rf"--method {method} .*nothing can be injected: 0 linked mentions.*--method mlm"):
            run(tiny_model_dir, tmp_path / method, method=method, data=str(plain))
    run(tiny_model_dir, tmp_path / "mlm", method="mlm", data=str(plain), steps=1)


def test_model_paths_on_the_pretrain_cli(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^--model .*/no/such/dir: no such directory$"):
        run(str(tmp_path / "no" / "such" / "dir"), tmp_path / "r")
    root = tmp_path / "runs" / "mlm"
    shutil.copytree(tiny_model_dir, root / "final")
    run(str(root), tmp_path / "r2", steps=1)  # continued pre-training from a run root reads its final/
    assert "a pretrain.py run directory; using its final model" in capsys.readouterr().out


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~55 s on 2 loaded cores; test_resume_refuses_another_world_size is the fast check
def test_resume_across_world_sizes_is_refused_for_real(tiny_model_dir, tmp_path):
    """A real 2-process checkpoint resumed by 1 process, and a 1-process one by 2 (was IndexError)."""
    def torchrun(out, nproc, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(free_port()), os.path.join(ROOT, "pretrain.py"), "--method", "mlm", "--model", tiny_model_dir,
               "--data", FIX, "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
               *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = torchrun(tmp_path / "two", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(SystemExit, match=r"world size \(processes\) 2 -> 1, global batch 4 -> 2"):
        pretrain.main(["--method", "mlm", "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "two"),
                       "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--resume"])
    pretrain.main(["--method", "mlm", "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "one"),
                   "--max-steps", "2", "--batch-size", "2", "--seq-len", "32"])
    r = torchrun(tmp_path / "one", 2, "--resume")
    assert r.returncode != 0 and "world size (processes) 1 -> 2" in r.stderr and "IndexError" not in r.stderr


@pytest.fixture
def restore_determinism():
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)  # --deterministic is process-wide; other tests run without it
    torch.set_num_threads(threads)


def test_deterministic_makes_the_indexing_backward_repeatable(restore_determinism):
    """The measured source (pretrain.make_deterministic): weight[idx] backward = index_put_(accumulate=True),
    threaded float atomics on CPU above 32768 written elements. Under --deterministic the gradient of a
    CKA-sized gather (2000 rows of 384 from 8 distinct rows of the decoder) is bitwise the same every time."""
    torch.set_num_threads(max(2, torch.get_num_threads()))  # the atomic path needs more than one thread
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 384, generator=g, requires_grad=True)
    idx = torch.randint(0, 8, (2000,), generator=g)
    up = torch.randn(2000, 384, generator=g)

    def grad():
        w.grad = None
        (w[idx] * up).sum().backward()
        return w.grad.clone()
    pretrain.make_deterministic()
    ref = grad()
    assert all(torch.equal(ref, grad()) for _ in range(10))
    torch.testing.assert_close(ref, torch.zeros(1000, 384).index_add_(0, idx, up))  # and it is the right sum


def default_shape_run(out, *extra):
    """A few steps of the default command's shape (MiniLM, 16 x 128, trelm, memory bank) in a fresh
    process; routing attributes on 2 sequences with 2 IG steps to keep the test minutes, not hours."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), "--output-dir", str(out), "--max-steps", "3",
           "--route-warmup", "1", "--route-every", "2", "--ig-steps", "2", "--ig-batch", "2", "--seed", "0",
           "--log-every", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return weights(os.path.join(out, "final")), metrics(out)


@pytest.mark.slow  # two MiniLM runs at 16 x 128: ~2-4 minutes on 2 loaded cores
def test_deterministic_runs_are_bitwise_equal_at_the_default_shape(tmp_path):
    a, ma = default_shape_run(tmp_path / "a", "--deterministic")
    b, mb = default_shape_run(tmp_path / "b", "--deterministic")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb] and ma[-1]["injected"] > 0
