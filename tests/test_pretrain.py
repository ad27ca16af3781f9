"""pretrain.py end to end on the tiny fixture data with a tiny model: output loadable, exact resume,
bad flags, NaN loss, and a real torchrun run with 2 processes (gloo)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "tiny_data")


def run(model_dir, out, *extra, method="mlm", steps=4):
    pretrain.main(["--method", method, "--model", model_dir, "--data", FIX, "--output-dir", str(out),
                   "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
                   "--seed", "3", *extra])


def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def test_mlm_run_writes_loadable_model_and_metrics(tiny_model_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    run(tiny_model_dir, tmp_path / "r", steps=3)
    final = tmp_path / "r" / "final"
    AutoModelForMaskedLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    rows = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["l_mlm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    before, after = weights(tiny_model_dir), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


@pytest.mark.parametrize("method,extra", [("mlm", ()), ("dkplm", ()), ("trelm", ("--no-routing",)),
                                          ("trelm", ("--route-every", "2"))])
def test_exact_resume(tiny_model_dir, tmp_path, method, extra, monkeypatch):
    """N steps + save + resume + N steps == 2N steps, bitwise (memory bank and routing included)."""
    run(tiny_model_dir, tmp_path / "full", *extra, method=method, steps=6)
    orig = pretrain.Trainer.train_step

    def interrupted(self):  # dies during step 5, after the step-3 checkpoint and 4 logged steps
        if self.step == 4:
            raise KeyboardInterrupt
        return orig(self)
    monkeypatch.setattr(pretrain.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "split", "--save-every", "3", *extra, method=method, steps=6)
    monkeypatch.setattr(pretrain.Trainer, "train_step", orig)
    run(tiny_model_dir, tmp_path / "split", "--resume", *extra, method=method, steps=6)
    a, b = weights(tmp_path / "full" / "final"), weights(tmp_path / "split" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    split = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["loss"] for r in full] == [r["loss"] for r in split]


def test_resume_refuses_changed_flags_and_missing_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="checkpoint"):
        run(tiny_model_dir, tmp_path / "none", "--resume")
    run(tiny_model_dir, tmp_path / "r", steps=2)
    with pytest.raises(SystemExit, match=r"--lr 0.0003 -> 0.001"):
        run(tiny_model_dir, tmp_path / "r", "--resume", "--lr", "1e-3", steps=4)


@pytest.mark.parametrize("argv,msg", [
    (["--theta", "1.5"], r"--theta: expected a value in \[0, 1\], got 1.5"),
    (["--max-steps", "0"], r"--max-steps: expected a positive integer"),
    (["--no-routing"], r"--no_routing|--no-routing: is a TRELM ablation"),
    (["--route-ratio", "0"], r"--route-ratio"),
])
def test_bad_flags(argv, msg, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=msg):
        run(tiny_model_dir, tmp_path / "r", *argv)


def test_bad_data_dir_and_model(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match=r"--data .*not a directory"):
        pretrain.main(["--model", tiny_model_dir, "--data", str(tmp_path / "nope"), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"not a local directory and not in the Hugging Face cache"):
        pretrain.main(["--model", "no-such-org/no-such-model", "--data", FIX, "--output-dir", str(tmp_path)])


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForMaskedLM
    run(tiny_model_dir, tmp_path / "r", steps=2)
    ck = tmp_path / "r" / "checkpoint"
    good = weights(ck)
    m = AutoModelForMaskedLM.from_pretrained(ck)
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.weight.fill_(float("nan"))
    m.save_pretrained(tmp_path / "nan_model")
    with pytest.raises(SystemExit, match=r"non-finite loss nan \(micro-batch 0\) at step 1; no checkpoint was written"):
        run(str(tmp_path / "nan_model"), tmp_path / "r2", "--save-every", "1", steps=2)
    assert not (tmp_path / "r2" / "checkpoint").exists()  # nothing bad written
    assert all(torch.equal(good[k], weights(ck)[k]) for k in good)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, model_dir, *extra, nproc=2, steps=4):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(free_port()), os.path.join(ROOT, "pretrain.py"), "--model", model_dir, "--data", FIX,
           "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "2", "--seq-len", "32", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_torchrun_two_processes_equals_one_process_global_batch(tiny_model_dir, tmp_path):
    """DDP with 2 x 2 sequences gives the same model as 1 process with 2 x 2 accumulated (same data order)."""
    torchrun(tmp_path / "ddp", tiny_model_dir, "--method", "mlm", "--seed", "1")
    pretrain.main(["--method", "mlm", "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "one"),
                   "--max-steps", "4", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--seed", "1"])
    a, b = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "one" / "final")
    cfg = json.load(open(tmp_path / "ddp" / "config.json"))
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_torchrun_trelm_ranks_hold_identical_memory_paths_and_weights(tiny_model_dir, tmp_path):
    """Memory bank (Eq. 4-6 updates gathered in rank order), knowledge paths (attributions
    all-reduced) and weights are bitwise equal on both ranks after several TRELM steps."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "ddp_trelm_worker.py"), str(tmp_path), "--method", "trelm",
           "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "run"), "--max-steps", "5",
           "--batch-size", "2", "--seq-len", "32", "--route-every", "2", "--seed", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert len(a["bank"]["sorted_keys"]) > 0
    for k, v in a["bank"].items():
        assert (torch.equal(v, b["bank"][k]) if torch.is_tensor(v) else v == b["bank"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["paths"], b["paths"]))
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize("extra", [(), ("--no-injection",)])
def test_chunked_attribution_equals_sequential(tiny_model_dir, tmp_path, extra, monkeypatch):
    """--ig-chunk stacks alpha steps by tiling the batch and its injection plan: same attributions."""
    import routing
    args = pretrain.resolve_config(pretrain.get_parser().parse_args(
        ["--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path), "--batch-size", "4",
         "--seq-len", "32", "--ig-steps", "6", "--ig-batch", "2", *extra]))
    t = pretrain.Trainer(args)
    batch = t.get_batch(0)
    assert batch["inj"] is not None and len(batch["inj"]["rows"]) > 0
    got = {}
    real = routing.ffn_attributions

    def spy(model, run, chunk=None, **kw):
        got[chunk] = real(model, run, chunk=chunk, **kw)
        return got[chunk]
    monkeypatch.setattr(routing, "ffn_attributions", spy)
    for chunk in (1, 3):
        t.args.ig_chunk = chunk
        t.reroute(batch)
    torch.testing.assert_close(got[1], got[3], rtol=1e-4, atol=1e-6)
    assert got[1].abs().sum() > 0


def test_fresh_head_delays_routing(tmp_path, tiny_model_dir):
    """A checkpoint without an MLM head (like MiniLM) gets a fresh head that routing would freeze:
    the first --route-every steps train every parameter, then routing starts."""
    import common
    from transformers import BertModel
    from conftest import make_bert_tokenizer, make_model
    tok = make_bert_tokenizer(tmp_path)
    encoder_only = tmp_path / "encoder_only"
    BertModel(make_model("bert", tok).config).save_pretrained(encoder_only)
    tok.save_pretrained(encoder_only)
    assert common.load_mlm(str(encoder_only))[0].fresh_mlm_head
    assert not common.load_mlm(tiny_model_dir)[0].fresh_mlm_head
    run(str(encoder_only), tmp_path / "r", "--route-every", "3", method="trelm", steps=4)
    cfg = json.load(open(tmp_path / "r" / "config.json"))["config"]
    assert cfg["route_warmup"] == 3
    head_bias = lambda d: load_file(os.path.join(d, "model.safetensors"))["cls.predictions.bias"]
    # the head trained during the warm-up (it is frozen while routing)
    assert not torch.equal(head_bias(tmp_path / "r" / "final"), torch.zeros_like(head_bias(tmp_path / "r" / "final")))


def test_cka_loss_falls_on_the_embedded_default(tmp_path):
    """A short seeded TRELM run on the embedded default (MiniLM, --data mini): L_CKA of the last ten
    steps is clearly below that of the first ten (the model learns to pick the entity's own token)."""
    pretrain.main(["--method", "trelm", "--no-routing", "--no-memory-bank", "--output-dir", str(tmp_path),
                   "--max-steps", "50", "--batch-size", "4", "--seq-len", "48", "--log-every", "1", "--seed", "0"])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    cka = [r["l_cka"] for r in rows if r["injected"] > 0]
    assert len(cka) >= 40
    first, last = sum(cka[:10]) / 10, sum(cka[-10:]) / 10
    assert last < 0.7 * first, (first, last)
