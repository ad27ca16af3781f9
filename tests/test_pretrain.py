"""pretrain.py end to end on the tiny fixture data with a tiny model: output loadable, exact resume,
bad flags, NaN loss, and a real torchrun run with 2 processes (gloo)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import config
import data
import model
import optim
import pretrain
import routing
from kg import load_kg

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
                                          ("trelm", ("--route-every", "2")),
                                          ("trelm", ("--route-scope", "ffn", "--route-every", "1",
                                                     "--ig-form", "first-order", "--route-warmup", "2")),
                                          ("trelm", ("--route-scope", "blocks", "--route-select", "random",
                                                     "--route-every", "2", "--no-memory-bank")),
                                          ("trelm", ("--no-routing", "--long-tail-words"))])
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
    (["--long-tail-words"], r"--long-tail-words: adds memory-bank keys \(TRELM only\)"),
    (["--word-percentile", "0"], r"--word-percentile: expected \(0, 100\]"),
    (["--word-min-count", "0"], r"--word-min-count: expected a positive integer"),
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


@pytest.mark.parametrize("extra", [(), ("--long-tail-words",),
                                   ("--route-scope", "ffn", "--route-every", "1", "--ig-form", "first-order",
                                    "--route-warmup", "1"),
                                   ("--route-every", "1", "--ig-form", "loss-grad", "--route-warmup", "1")])
def test_torchrun_trelm_ranks_hold_identical_memory_paths_and_weights(tiny_model_dir, tmp_path, extra):
    """Memory bank (Eq. 4-6 updates gathered in rank order; word keys too), knowledge paths
    (attributions all-reduced) and weights are bitwise equal on both ranks after several TRELM steps."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "ddp_trelm_worker.py"), str(tmp_path), "--method", "trelm",
           "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "run"), "--max-steps", "5",
           "--batch-size", "2", "--seq-len", "32", "--route-every", "2", "--seed", "2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert len(a["bank"]["sorted_keys"]) > 0
    num_entities = load_kg(os.path.join(FIX, "kg")).num_entities
    assert (int(a["bank"]["sorted_keys"].max()) >= num_entities) == ("--long-tail-words" in extra)  # word keys
    for k, v in a["bank"].items():
        assert (torch.equal(v, b["bank"][k]) if torch.is_tensor(v) else v == b["bank"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["paths"], b["paths"]))
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize("extra", [(), ("--no-injection",)])
def test_chunked_attribution_equals_sequential(tiny_model_dir, tmp_path, extra):
    """--ig-chunk stacks alpha steps by tiling the batch and its injection plan: same attributions."""
    args = config.from_argv(
        ["--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path), "--batch-size", "4",
         "--seq-len", "32", "--ig-steps", "6", "--ig-batch", "2", *extra])
    t = pretrain.Trainer(args)
    batch = t.get_batch(0)
    assert batch["plan"] is not None and len(batch["plan"].rows) > 0
    got = {}
    for chunk in (1, 3):
        got[chunk] = routing.Attribution("layer", steps=6, chunk=chunk)(t.net.mlm, t.knowledge_prob(batch))
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
    assert not common.has_mlm_head(str(encoder_only))
    assert common.has_mlm_head(tiny_model_dir)
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
                   "--max-steps", "100", "--batch-size", "4", "--seq-len", "48", "--log-every", "1", "--seed", "0"])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    cka = [r["l_cka"] for r in rows if r["injected"] > 0]
    assert len(cka) >= 60
    first, last = sum(cka[:10]) / 10, sum(cka[-10:]) / 10
    # measured with SI's one-mask replacement (seed 0): 3.52 -> 1.52 (0.43x) over 81 injected steps of 100;
    # at 50 steps the same run is at 0.86x (too few injected steps to tell learning from noise)
    assert last < 0.7 * first, (first, last)


# ----------------------------------------------------------------------------- one step by hand

def _model_dir(kind, tmp_path):
    from conftest import make_bert_tokenizer, make_model, make_roberta_tokenizer
    tok = make_bert_tokenizer(tmp_path) if kind == "bert" else make_roberta_tokenizer(tmp_path)
    d = os.path.join(tmp_path, f"tiny_{kind}")
    make_model(kind, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _grab(seen, name, get):
    """A forward (pre-)hook that keeps a detached copy of the first tensor `get` picks out."""
    def hook(module, first, second):
        seen.setdefault(name, get(first, second).detach().clone())
    return hook


def _known_memory(t, keys, H):
    """Write random local / global memories (count 1) for `keys` into t's bank; {key: (local, global, 1)}."""
    slots = t.know.bank._find(keys)[0]
    g = torch.Generator().manual_seed(5)
    A, G = 9 * torch.randn(len(keys), H, generator=g), 7 * torch.randn(len(keys), H, generator=g)
    t.know.bank.local[slots], t.know.bank.global_[slots], t.know.bank.count[slots] = A, G, 1
    return {int(k): (A[i].clone(), G[i].clone(), 1) for i, k in enumerate(keys)}


def _captured_step(t, mlm):
    """One t.train_step(); returns its stats and the encoder's inputs_embeds ("x"), last hidden state ("h")
    and the MLM labels ("labels") of that step."""
    seen = {}
    h1 = mlm.base_model.register_forward_pre_hook(_grab(seen, "x", lambda a, kw: kw["inputs_embeds"]), with_kwargs=True)
    h2 = mlm.base_model.register_forward_hook(_grab(seen, "h", lambda i, o: o.last_hidden_state))
    orig_forward = t.net.forward
    t.net.forward = lambda *args, **kw: (seen.setdefault("labels", args[2].clone()), orig_forward(*args, **kw))[1]
    stats = t.train_step()
    h1.remove(), h2.remove()
    return stats, seen


def _trainer(model_dir, out, *extra):
    argv = ["--model", model_dir, "--data", FIX, "--output-dir", str(out), "--batch-size", "8", "--seq-len", "32",
            "--seed", "1", "--no-routing", "--injection", "long-tail", "--window-k", "2", *extra]
    return pretrain.Trainer(config.from_argv(argv))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_one_trelm_step_position_by_position(kind, tmp_path):
    """Eq. 7 input at the injected spans and E_p elsewhere; MLM labels -100 exactly there; lambda =
    Eq. 8; the memory after the step = Eq. 4-6 applied by hand to every mention of a key."""
    t = _trainer(_model_dir(kind, tmp_path), tmp_path / "r")
    tok, mlm = t.tok, t.net.mlm
    W = mlm.get_input_embeddings().weight
    with torch.no_grad():  # hand-set embeddings: row i = a fixed pattern scaled by (1 + i / V)
        V, H = W.shape
        W.copy_(torch.sin(torch.arange(V)[:, None] * 0.37 + torch.arange(H)[None] * 1.3) * (1 + torch.arange(V)[:, None] / V))
    t.step = len(t.store) // t.global_batch + 1  # in epoch q = 1: lambda = 0.5 / 2
    peek = t.get_batch(0)
    plan = peek["plan"]
    assert plan is not None and len(plan.rows) > 0
    keys = torch.unique(plan.ent_id)
    mem_before = _known_memory(t, keys, H)
    W0 = W.detach().clone()

    stats, seen = _captured_step(t, mlm)
    assert stats["lambda"] == 0.25
    lam = 0.25

    ids = peek["input_ids"]
    x, hid, labels = seen["x"], seen["h"], seen["labels"]
    inj = {(int(r), int(c)): int(m) for r, c, m in zip(plan.rows, plan.cols, plan.mention)}
    emb = lambda label: W0[tok(" " + label, add_special_tokens=False)["input_ids"][:16]].mean(0)
    unit = lambda v, n: v * (n / v.norm())
    g2 = torch.Generator().manual_seed(int(np.random.SeedSequence([t.cfg.run.seed, t.step - 1, 0]).generate_state(1)[0]))
    rows = t.store.rows(data.micro_batch_indices(t.step - 1, 0, 0, len(t.store), t.cfg.data.batch_size, 1, 1,
                                                 t.cfg.run.seed))
    ref = t.collate(rows, g2)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            if (r, c) in inj:
                e = int(plan.ent_id[inj[r, c]])
                _, rel, tail = t.know.injector.triple[e].tolist()
                h_e = emb(t.know.kg.entity_labels[tail]) - emb(t.know.kg.relation_labels[rel])
                loc, glo, _ = mem_before[e]
                want = (1 - lam) * h_e + lam / 2 * (unit(loc, h_e.norm()) + unit(glo, h_e.norm()))  # Eq. (7)
                torch.testing.assert_close(x[r, c], want, rtol=0, atol=1e-5)
                assert int(labels[r, c]) == -100
            else:
                assert torch.equal(x[r, c], W0[ids[r, c]])  # I_p = E_p
                assert int(labels[r, c]) == int(ref["mlm_labels"][r, c])

    # Eq. 4-6 by hand over every mention of a key, injected or not, in mention order
    mem = {k: [v[0].clone(), v[1].clone(), v[2]] for k, v in mem_before.items()}
    counted = set()
    am = peek["attention_mask"]
    for j in range(len(peek["ent_id"])):
        e = int(peek["ent_id"][j])
        if e not in mem:
            continue
        r, s, en = int(peek["ent_batch"][j]), int(peek["ent_start"][j]), int(peek["ent_end"][j])
        n = int(am[r].sum())
        ctx = [i for i in range(max(1, s - 2), min(n - 1, en + 2)) if not s <= i < en]  # no [CLS]/last, no span
        obs = hid[r, ctx].mean(0) if ctx else hid[r, s:en].mean(0)  # Eq. (4)
        mem[e][0] = 0.9 * mem[e][0] + 0.1 * obs  # Eq. (5), gamma = 0.1
        if (r, e) not in counted:  # Eq. (6): running mean of [CLS] over contexts
            counted.add((r, e))
            mem[e][2] += 1
            mem[e][1] = mem[e][1] + (hid[r, 0] - mem[e][1]) / mem[e][2]
    for e, (loc, glo, cnt) in mem.items():
        slot = t.know.bank._find(torch.tensor([e]))[0]
        torch.testing.assert_close(t.know.bank.local[slot][0], loc, rtol=0, atol=1e-5)
        torch.testing.assert_close(t.know.bank.global_[slot][0], glo, rtol=0, atol=1e-5)
        assert int(t.know.bank.count[slot]) == cnt
    assert len(counted) > 0


def test_eq3_weighting_is_the_same_with_and_without_injected_spans(tiny_model_dir, tmp_path):
    """L = theta L_MLM + (1 - theta) L_CKA for every batch: a batch without injected spans trains on
    theta * L_MLM, not on L_MLM at weight 1."""
    t = _trainer(tiny_model_dir, tmp_path / "r", "--theta", "0.3")
    b = t.get_batch(0)
    out = t.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], None, theta=0.3)
    assert float(out["l_cka"]) == 0.0
    torch.testing.assert_close(out["loss"], 0.3 * out["l_mlm"])
    out = t.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], b["plan"], theta=0.3)
    torch.testing.assert_close(out["loss"], 0.3 * out["l_mlm"] + 0.7 * out["l_cka"])
    assert float(out["l_cka"]) > 0


def test_lambda_logged_and_constant_under_beta_1(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "b1", "--beta", "1", "--no-routing", method="trelm", steps=6)
    rows = [json.loads(l) for l in open(tmp_path / "b1" / "metrics.jsonl")]
    assert [r["lambda"] for r in rows] == [0.5] * 6
    run(tiny_model_dir, tmp_path / "b2", "--beta", "2", "--no-routing", "--lambda-q", "fraction",
        method="trelm", steps=6)
    rows = [json.loads(l) for l in open(tmp_path / "b2" / "metrics.jsonl")]
    cfg = json.load(open(tmp_path / "b2" / "config.json"))
    per_step = cfg["global_batch"] / cfg["sequences"]  # epochs per step
    for r in rows:  # logged before the step's update: q = (step - 1) epochs-per-step
        assert r["lambda"] == pytest.approx(0.5 / 2 ** ((r["step"] - 1) * per_step), rel=1e-5)
    with pytest.raises(SystemExit, match="--beta"):
        run(tiny_model_dir, tmp_path / "b3", "--beta", "0.5", method="trelm", steps=1)


def test_dkplm_logs_l_dec_and_sums_its_losses(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "d", "--injection", "long-tail", method="dkplm", steps=3)
    rows = [json.loads(l) for l in open(tmp_path / "d" / "metrics.jsonl")]
    assert all("l_dec" in r and "l_cka" not in r for r in rows)
    assert all(r["loss"] == pytest.approx(r["l_mlm"] + r["l_dec"], abs=2e-6) for r in rows)
    assert any(r["l_dec"] > 0 for r in rows)


def test_dkplm_readings_plain_decoder_theta_loss_and_detached_kg(tiny_model_dir, tmp_path):
    """--dkplm-decoder plain: L_dec is the MLM head's cross-entropy on h itself at the injected spans;
    --dkplm-loss theta: L = theta L_MLM + (1 - theta) L_dec; --kg-grad off: h_e takes no gradient; the
    readings are refused for another method, and --no-injection is a valid DKPLM reading."""
    argv = ["--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "r"), "--batch-size", "8",
            "--seq-len", "32", "--method", "dkplm", "--injection", "long-tail"]
    t = pretrain.Trainer(config.from_argv([*argv, "--dkplm-decoder", "plain", "--dkplm-loss", "theta",
                                           "--theta", "0.3", "--kg-grad", "off"]))
    b = t.get_batch(0)
    plan = b["plan"]
    assert plan is not None and len(plan.rows) > 0
    out = t.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], plan, theta=0.3, return_hidden=True)
    h = out["hidden"][plan.rows, plan.cols]
    want = F.cross_entropy(common.mlm_logits(t.net.mlm, h).float(), plan.targets)
    torch.testing.assert_close(out["l_dec"], want)
    torch.testing.assert_close(out["loss"], 0.3 * out["l_mlm"] + 0.7 * out["l_dec"])
    assert not t.net.kg_table().requires_grad and t.net.kg_table().data_ptr() == \
        t.net.mlm.get_input_embeddings().weight.data_ptr()
    d = config.from_argv(["--method", "dkplm"]).injection  # the defaults since issue 33
    assert (d.dkplm_decoder, d.dkplm_select, d.dkplm_loss) == ("plain", "at-least-mean", "sum")
    for flag in (["--dkplm-loss", "theta"], ["--dkplm-select", "above-mean"], ["--dkplm-decoder", "relation"]):
        with pytest.raises(SystemExit, match="is a DKPLM reading"):
            config.from_argv(["--method", "trelm", *flag])
    assert config.from_argv(["--method", "dkplm", "--no-injection"]).injection.no_injection


def test_relation_decoding_loss_hand_case():
    """DKPLM's decoding: full-softmax head on h * E(r)/rms(E(r)); checked against a hand-built head."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=11, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=8)).eval()
    h = torch.randn(3, 4)
    rel = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    r_hat = torch.tensor([[1.0] * 4, [1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 2.0]])  # rms 2, 1, 1.5
    y = torch.tensor([1, 5, 7])
    want = F.cross_entropy(mlm.cls(h * r_hat), y)
    torch.testing.assert_close(model.relation_decoding_loss(mlm, h, y, rel), want)
    assert float(model.relation_decoding_loss(mlm, h[:0], y[:0], rel[:0])) == 0.0


def test_no_injection_shows_only_the_mask_embedding(tiny_model_dir, tmp_path):
    """--no-injection (Table 6): the chosen spans get the mask embedding, no h_e and no memory."""
    t = _trainer(tiny_model_dir, tmp_path / "r", "--no-injection")
    assert t.know.bank is None
    b = t.get_batch(0)
    plan = b["plan"]
    W = t.net.mlm.get_input_embeddings().weight
    seen = {}
    h = t.net.mlm.base_model.register_forward_pre_hook(_grab(seen, "x", lambda a, kw: kw["inputs_embeds"]),
                                                       with_kwargs=True)
    t.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], plan)
    h.remove()
    assert plan.mem is None
    for r, c in zip(plan.rows, plan.cols):
        assert torch.equal(seen["x"][r, c], W[t.tok.mask_token_id])


def test_plan_head_and_tile():
    P = model.Plan(rows=torch.tensor([0, 0, 2]), cols=torch.tensor([1, 2, 3]), mention=torch.tensor([0, 0, 1]),
                      targets=torch.tensor([7, 8, 9]), ent_id=torch.tensor([4, 5]), sel=torch.tensor([0, 3]),
                      negatives=torch.tensor([[1], [2], [3]]), mem=(torch.ones(2, 2), torch.zeros(2, 2)))
    h = P.head(2)
    assert h.rows.tolist() == [0, 0] and h.targets.tolist() == [7, 8] and h.negatives.tolist() == [[1], [2]]
    assert h.ent_id.tolist() == [4, 5]
    t2 = P.tile(2, batch_size=3)
    assert t2.rows.tolist() == [0, 0, 2, 3, 3, 5] and t2.mention.tolist() == [0, 0, 1, 2, 2, 3]
    assert t2.ent_id.tolist() == [4, 5, 4, 5] and t2.mem[0].shape == (4, 2)


def test_si_refresh_rescores_with_the_current_model(tiny_model_dir, tmp_path):
    """--si-refresh 1: at the first step of epoch 1 (20 sequences / batch 4 = step 5) SI(e) of every
    candidate is Eq. 1 under the weights of that moment, and the threshold is the corpus-level one
    of the new values; before it, the initial model's SI."""
    import entity_importance as ei
    argv = ["--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "o"), "--batch-size", "4",
            "--seq-len", "32", "--seed", "1", "--no-routing", "--si-refresh", "1", "--lr", "1e-2"]
    t = pretrain.Trainer(config.from_argv(argv))
    assert len(t.store) == 20 and t.global_batch == 4
    initial = t.know.si.values.astype(np.float64)
    for _ in range(5):
        t.train_step()
    assert t.know.si.epoch == 0 and np.array_equal(t.know.si.values.astype(np.float64), initial, equal_nan=True)
    t.train_step()  # step 6 starts epoch 1: refresh first
    assert t.know.si.epoch == 1
    si = t.know.si.values.astype(np.float64)
    scored = ~np.isnan(si)
    assert scored.sum() > 3 and np.array_equal(scored, ~np.isnan(initial))
    assert np.abs(si[scored] - initial[scored]).max() > 1e-6  # another model scored them
    row = next(i for i in range(len(t.store)) if len(t.store.rows([i])[0]["ent_id"]))
    r = {**t.store.rows([row])[0], "ent_si": t.know.si.values[t.store.mention_index([row])]}
    ids = torch.tensor([r["input_ids"]])
    n = len(r["ent_start"])
    # the weights SI saw are those of step 5's end; step 6 has changed them since: recompute from a copy
    # of the state before step 6 by re-running steps 1-5 in a fresh trainer
    t2 = pretrain.Trainer(config.from_argv(
        [*argv[:5], str(tmp_path / "o2"), *argv[6:]]))
    for _ in range(5):
        t2.train_step()
    ref = ei.semantic_importance(t2.net.mlm, ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long),
                                 torch.tensor(r["ent_start"]), torch.tensor(r["ent_end"]), t2.tok.mask_token_id,
                                 window=8)
    got = torch.tensor(r["ent_si"])
    ok = ~torch.isnan(got)
    assert got[ok].abs().max() > 2e-6  # the tiny random model's SI is small: compare to a few float32 ulps of cos
    torch.testing.assert_close(got[ok], ref[ok].float(), atol=3e-7, rtol=0)
    cand = t.know.si.candidate[t.store.flat("ent_id")]
    assert t.know.si.threshold == ei.important_threshold(si, cand, 0.5)


def test_si_refresh_resumes_exactly_across_the_refresh(tiny_model_dir, tmp_path, monkeypatch):
    """The refresh at step 6 lies before the step-6 checkpoint: the resumed run must restore the
    refreshed SI from training_state.pt (its model is gone), and end bitwise equal."""
    extra = ("--no-routing", "--si-refresh", "1", "--lr", "1e-2")
    run(tiny_model_dir, tmp_path / "full", *extra, method="trelm", steps=8)
    orig = pretrain.Trainer.train_step

    def interrupted(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return orig(self)
    monkeypatch.setattr(pretrain.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, tmp_path / "split", "--save-every", "3", *extra, method="trelm", steps=8)
    st = torch.load(tmp_path / "split" / "checkpoint" / "training_state.pt", weights_only=False)
    assert st["step"] == 6 and st["si"]["epoch"] == 1
    argv = ["--method", "trelm", "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(tmp_path / "split"),
            "--max-steps", "8", "--batch-size", "4", "--seq-len", "32", "--log-every", "1", "--seed", "3",
            "--save-every", "3", "--resume", *extra]
    t = pretrain.Trainer(config.from_argv(argv))
    initial = t.know.si.values.copy()
    t.resume()  # the refreshed values come back, not the initial model's
    restored = t.know.si.values
    assert t.know.si.epoch == 1 and np.array_equal(restored, st["si"]["values"], equal_nan=True)
    assert not np.array_equal(restored, initial, equal_nan=True)
    monkeypatch.setattr(pretrain.Trainer, "train_step", orig)
    run(tiny_model_dir, tmp_path / "split", "--resume", *extra, method="trelm", steps=8)
    a, b = weights(tmp_path / "full" / "final"), weights(tmp_path / "split" / "final")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    split = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["loss"] for r in full] == [r["loss"] for r in split]


# ----------------------------------------------------------------------------- --long-tail-words

def _hand_corpus(tok, path):
    """Four sequences, one linked mention ("France" in the first), as the prepare step lays them out."""
    from conftest import store_from_rows
    texts = ["Paris is the capital of France.", "Berlin, the capital of Germany", "Tokyo is in -Japan",
             "Zq is in Japan"]
    ents = [[{"id": "Q142", "start": 24, "end": 30}], [], [], []]
    docs = data.tokenize_docs({"text": texts, "entities": ents}, tok, {"Q142": 0})
    rows = [data.pack_docs({k: [v[i]] for k, v in docs.items()}, tok.cls_token_id, tok.sep_token_id, 32)
            for i in range(len(texts))]
    return store_from_rows(path, {k: [r[k][0] for r in rows] for k in rows[0]})


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_long_tail_word_selection_on_a_hand_made_corpus(kind, tmp_path):
    """Whole-word tokens outside mention spans, punctuation and special tokens left out, counted by
    hand; multi-piece words (z ##q; RoBERTa's unspaced first words Pa+ris, Be+rlin) are not words."""
    from conftest import make_bert_tokenizer, make_roberta_tokenizer
    from entity_importance import long_tail_mask
    tok = make_bert_tokenizer(tmp_path) if kind == "bert" else make_roberta_tokenizer(tmp_path)
    plain = data.plain_tokens(tok)
    assert not plain[tok.cls_token_id] and not plain[tok.convert_tokens_to_ids(",")]
    counts = data.word_counts(_hand_corpus(tok, tmp_path / "store"), plain)
    got = {tok.convert_ids_to_tokens(int(i)): int(counts[i]) for i in np.nonzero(counts)[0]}
    if kind == "bert":  # France is the mention; "." and "," are punctuation; "-" starts japan's word
        want = {"paris": 1, "is": 3, "the": 2, "capital": 2, "of": 2, "berlin": 1, "germany": 1, "tokyo": 1,
                "in": 2, "japan": 2}
    else:  # Pa+ris, Be+rlin, To+kyo, Z+q and (-)Jap+an are split words
        want = {"\u0120is": 3, "\u0120the": 2, "\u0120capital": 2, "\u0120of": 2, "\u0120Germany": 1,
                "\u0120in": 2, "\u0120Japan": 1}
    assert got == want
    # the long-tail rule of pretrain.py: at or below the 50th percentile of the counts, at least twice
    lt = long_tail_mask(counts, 50.0, inclusive=True) & (counts >= 2)
    chosen = sorted(tok.convert_ids_to_tokens(int(i)) for i in np.nonzero(lt)[0])
    if kind == "bert":  # counts sorted 1 1 1 1 2 2 2 2 2 3: median 2
        assert chosen == ["capital", "in", "japan", "of", "the"]
    else:  # 1 1 2 2 2 2 3: median 2
        assert chosen == sorted(["\u0120the", "\u0120capital", "\u0120of", "\u0120in"])


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_long_tail_words_one_step_by_hand(kind, tmp_path):
    """--long-tail-words: Eq. 7 (same lambda, same rescaling) at every shown long-tail word position,
    E_p at a masked or replaced one, MLM labels unchanged there; the memory at word keys
    (num_entities + token id) after the step = Eq. 4-6 by hand over every occurrence."""
    t = _trainer(_model_dir(kind, tmp_path), tmp_path / "r", "--long-tail-words")
    tok, mlm = t.tok, t.net.mlm
    E = t.know.kg.num_entities
    long_tail = set(t.know.long_tail_word.nonzero()[:, 0].tolist())
    assert long_tail and not long_tail & set(tok.all_special_ids)
    W = mlm.get_input_embeddings().weight
    with torch.no_grad():
        V, H = W.shape
        W.copy_(torch.sin(torch.arange(V)[:, None] * 0.37 + torch.arange(H)[None] * 1.3) * (1 + torch.arange(V)[:, None] / V))
    W0 = W.detach().clone()
    peek = t.get_batch(0)
    ids, orig, am = peek["input_ids"], peek["orig_ids"], peek["attention_mask"]
    in_span = set()
    for r, s, e in zip(peek["ent_batch"].tolist(), peek["ent_start"].tolist(), peek["ent_end"].tolist()):
        in_span |= {(r, c) for c in range(s, e)}
    # by hand: every real position, outside all mention spans, whose original token is a long-tail word
    occ = [(r, c) for r in range(ids.shape[0]) for c in range(ids.shape[1])
           if am[r, c] and (r, c) not in in_span and int(orig[r, c]) in long_tail]
    words = peek["plan"].words
    assert list(zip(words.rows.tolist(), words.cols.tolist())) == occ
    assert any(int(ids[p]) != int(orig[p]) for p in occ) and any(int(ids[p]) == int(orig[p]) for p in occ)
    keys = torch.unique(torch.tensor([int(orig[p]) + E for p in occ]))
    assert int(keys.min()) >= E  # never an entity's key
    mem = {k: list(v) for k, v in _known_memory(t, keys, H).items()}

    stats, seen = _captured_step(t, mlm)
    lam = stats["lambda"]
    assert lam == 0.5 and stats["words_mixed"] == sum(int(ids[p]) == int(orig[p]) for p in occ)
    x, hid, labels = seen["x"], seen["h"], seen["labels"]
    unit = lambda v, n: v * (n / v.norm())
    for r, c in occ:
        e_p = W0[ids[r, c]]
        if int(ids[r, c]) == int(orig[r, c]):  # shown: Eq. (7) with h = E_p
            loc, glo, _ = mem[int(orig[r, c]) + E]
            want = (1 - lam) * e_p + lam / 2 * (unit(loc, e_p.norm()) + unit(glo, e_p.norm()))
            torch.testing.assert_close(x[r, c], want, rtol=0, atol=1e-5)
            assert not torch.equal(x[r, c], e_p)
        else:  # masked or replaced: the input shows no word, so no memory either
            assert torch.equal(x[r, c], e_p)
        assert int(labels[r, c]) == int(peek["mlm_labels"][r, c])  # not taken out of MLM
    plan_pos = set(zip(peek["plan"].rows.tolist(), peek["plan"].cols.tolist()))
    for r in range(ids.shape[0]):  # everything else is E_p (outside the injected spans)
        for c in range(ids.shape[1]):
            if (r, c) not in plan_pos and (r, c) not in occ:
                assert torch.equal(x[r, c], W0[ids[r, c]])
    counted = set()
    for r, p in occ:  # Eq. 4-6 by hand, window k = 2 around the one-token span, without it
        k = int(orig[r, p]) + E
        n = int(am[r].sum())
        ctx = [i for i in range(max(1, p - 2), min(n - 1, p + 3)) if i != p]
        mem[k][0] = 0.9 * mem[k][0] + 0.1 * hid[r, ctx].mean(0)  # Eq. (4), (5)
        if (r, k) not in counted:
            counted.add((r, k))
            mem[k][2] += 1
            mem[k][1] = mem[k][1] + (hid[r, 0] - mem[k][1]) / mem[k][2]  # Eq. (6)
    for k, (loc, glo, cnt) in mem.items():
        slot = t.know.bank._find(torch.tensor([k]))[0]
        torch.testing.assert_close(t.know.bank.local[slot][0], loc, rtol=0, atol=1e-5)
        torch.testing.assert_close(t.know.bank.global_[slot][0], glo, rtol=0, atol=1e-5)
        assert int(t.know.bank.count[slot]) == cnt


def test_long_tail_words_off_is_todays_step_bitwise(tiny_model_dir, tmp_path):
    """Flag off: no word path at all. Flag on with no word selected: the same two steps bitwise
    (weights, memory, losses); with words selected the run differs (so this test can fail)."""
    def two_steps(*extra, empty=False):
        t = _trainer(tiny_model_dir, tmp_path / f"r{len(extra)}{empty}", *extra)
        if empty:
            t.know.long_tail_word[:] = False
        stats = [t.train_step() for _ in range(2)]
        return t, [(s["loss"], s["l_mlm"], s["l_cka"]) for s in stats]
    off, s_off = two_steps()
    assert off.know.long_tail_word is None and "long_tail_words" not in off.know.census()
    empty, s_empty = two_steps("--long-tail-words", empty=True)
    on, s_on = two_steps("--long-tail-words")
    assert s_off == s_empty and s_on != s_off
    for (n, p), q in zip(off.net.named_parameters(), empty.net.parameters()):
        assert torch.equal(p, q), n
    b_off, b_empty = off.know.bank.state_dict(), empty.know.bank.state_dict()
    assert all(torch.equal(b_off[k], b_empty[k]) if torch.is_tensor(b_off[k]) else b_off[k] == b_empty[k]
               for k in b_off)
    assert len(on.know.bank) > len(off.know.bank)
    assert any(not torch.equal(p, q) for p, q in zip(off.net.parameters(), on.net.parameters()))


def test_plan_tile_and_head_carry_the_words():
    w = model.WordNotes(rows=torch.tensor([0, 2]), cols=torch.tensor([3, 1]), key=torch.tensor([20, 21]),
                           shown=torch.tensor([True, False]), mem=(torch.ones(2, 2), torch.zeros(2, 2)))
    z = torch.zeros(0, dtype=torch.long)
    P = model.Plan(z, z, z, z, ent_id=z, sel=z, words=w)
    assert P.head(2).words.rows.tolist() == [0] and P.head(2).words.mem[0].shape == (1, 2)
    t2 = P.tile(2, batch_size=3).words
    assert t2.rows.tolist() == [0, 2, 3, 5] and t2.key.tolist() == [20, 21, 20, 21]
    assert t2.shown.tolist() == [True, False, True, False] and t2.mem[1].shape == (4, 2)


def test_span_mask_hand_case_with_overlap():
    m = data.span_mask(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), torch.tensor([3, 4, 1]), (2, 5))
    assert m.tolist() == [[False, True, True, True, False], [True, False, False, False, False]]


# ----------------------------------------------------------------------------- the Trainer's routing (Sec. 3.3)

def routed_trainer(model_dir, out, *extra):
    argv = ["--method", "trelm", "--model", model_dir, "--data", FIX, "--output-dir", str(out), "--batch-size", "4",
            "--seq-len", "32", "--ig-steps", "3", "--route-every", "3", "--max-steps", "8", "--seed", "1", *extra]
    return pretrain.Trainer(config.from_argv(argv))


def routing_log(out):
    return [json.loads(l) for l in open(os.path.join(out, "routing.jsonl"))]


def test_trained_head_routes_from_step_zero(tiny_model_dir, tmp_path, capsys):
    """A model with a trained MLM head routes at step 0; under the strict scope the head is frozen."""
    from common import head_decoder
    run(tiny_model_dir, tmp_path, "--route-every", "3", "--ig-steps", "3", "--route-scope", "strict", method="trelm",
        steps=1)
    assert "--route-warmup" not in capsys.readouterr().out
    assert json.load(open(tmp_path / "config.json"))["config"]["route_warmup"] == 0
    t0 = routed_trainer(tiny_model_dir, tmp_path / "fresh")
    head = lambda d: load_file(os.path.join(d, "model.safetensors"))["cls.predictions.bias"]
    assert torch.equal(head(tmp_path / "final"), head_decoder(t0.net.mlm)[1].detach())  # frozen from the first step
    log = routing_log(tmp_path)
    assert [r["step"] for r in log] == [0] and "warmup" not in log[0] and log[0]["jaccard_prev"] is None


def test_fresh_head_warmup_is_logged_and_trains_everything(tiny_model_dir, tmp_path, capsys):
    from transformers import BertModel
    from conftest import make_bert_tokenizer, make_model
    tok = make_bert_tokenizer(tmp_path)
    encoder_only = str(tmp_path / "encoder_only")
    BertModel(make_model("bert", tok).config).save_pretrained(encoder_only)
    tok.save_pretrained(encoder_only)
    run(encoder_only, tmp_path / "run", "--route-every", "3", "--ig-steps", "3", method="trelm", steps=4)
    assert "freshly initialised" in capsys.readouterr().out
    log = routing_log(tmp_path / "run")
    assert log[0] == {"step": 0, "warmup": 3, "reason": "fresh MLM head"} and [r["step"] for r in log] == [0, 3]
    t = routed_trainer(encoder_only, tmp_path / "t")
    for _ in range(3):
        t.train_step()
        assert t.router is None and isinstance(t.optimizer, torch.optim.AdamW)  # full-parameter warm-up
    t.train_step()
    assert t.router is not None and isinstance(t.optimizer, optim.NeuronAdamW)


@pytest.mark.parametrize("scope", routing.SCOPES)
def test_per_batch_routing_moves_only_the_paths_and_keeps_every_neurons_moments(tiny_model_dir, tmp_path, scope):
    """--route-every 1, first-order: new paths every step (set after the forward, before the backward);
    the FFN rows and columns outside the step's paths, and their Adam moments and step counts, are
    bitwise unchanged by that step; parameters the scope freezes never move; the scope's others do."""
    from common import ffn_modules
    t = routed_trainer(tiny_model_dir, tmp_path, "--route-scope", scope, "--route-every", "1", "--ig-form", "first-order",
                       "--route-warmup", "1")
    t.train_step()  # full-parameter warm-up
    t.train_step()  # routed
    before = {n: p.detach().clone() for n, p in t.net.mlm.named_parameters()}
    ffn = ffn_modules(t.net.mlm)
    state = {id(p): {k: v.clone() for k, v in t.optimizer.state[p].items()} for pair in ffn for m in pair
             for p in (m.dense.weight,)}
    paths_before = t.paths
    t.train_step()
    assert path_jaccard_lt1(paths_before, t.paths)  # per-batch: the paths changed
    named = dict(t.net.mlm.named_parameters())
    trained = {id(p) for p in t.router.trainable()}
    for l, (inter, out) in enumerate(ffn):
        keep = torch.ones(inter.dense.out_features, dtype=torch.bool)
        keep[t.paths[l]] = False  # neurons outside this step's paths
        for p, dim in ((inter.dense.weight, 0), (out.dense.weight, 1)):
            name = next(n for n, q in named.items() if q is p)
            old, st = before[name], t.optimizer.state[p]
            assert torch.equal(p.detach().index_select(dim, keep.nonzero()[:, 0]),
                               old.index_select(dim, keep.nonzero()[:, 0])), name
            assert not torch.equal(p.detach(), old), name  # the selected ones moved
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k].index_select(dim, keep.nonzero()[:, 0]),
                                   state[id(p)][k].index_select(dim, keep.nonzero()[:, 0])), (name, k)
            assert torch.equal(st["step"][keep], state[id(p)]["step"][keep])
            assert torch.equal(st["step"][~keep], state[id(p)]["step"][~keep] + 1)
    frozen = [n for n, p in named.items() if id(p) not in trained]
    assert (len(frozen) > 0) == (scope != "ffn")
    for n in frozen:
        assert torch.equal(named[n], before[n]), n
    moved_other = [n for n, p in named.items() if id(p) in trained and "intermediate" not in n
                   and "output.dense" not in n and not torch.equal(p, before[n])]
    assert (len(moved_other) > 0) == (scope != "strict")


def path_jaccard_lt1(a, b):
    return routing.path_jaccard(a, b) < 1.0


def test_random_selection_is_reproducible_and_exact_across_resume(tiny_model_dir, tmp_path):
    """--route-select random: the same neurons for the same (seed, step) in two runs, a different draw at
    each routing, as many per layer as --route-ratio gives."""
    t1 = routed_trainer(tiny_model_dir, tmp_path / "a", "--route-select", "random", "--route-every", "1")
    t2 = routed_trainer(tiny_model_dir, tmp_path / "b", "--route-select", "random", "--route-every", "1")
    draws = []
    for _ in range(2):
        t1.train_step(), t2.train_step()
        assert all(torch.equal(x, y) for x, y in zip(t1.paths, t2.paths))
        I = t1.router.sizes[0]
        assert [len(p) for p in t1.paths] == [max(1, round(0.1 * I))] * len(t1.paths)
        draws.append(t1.paths)
    assert routing.path_jaccard(*draws) < 1.0


@pytest.mark.parametrize("argv,msg", [(["--ig-chunk", "-1"], "--ig-chunk"), (["--ig-memory-mb", "0"], "--ig-memory-mb"),
                                      (["--route-select", "random", "--route-threshold", "0.5"], "--route-threshold")])
def test_bad_routing_flags_name_the_flag(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        config.from_argv(argv)


def test_path_jaccard_by_hand():
    a = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([5])]
    b = [torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.long), torch.tensor([6])]
    assert routing.path_jaccard(a, b) == pytest.approx((2 / 4 + 1 + 0) / 3)


def test_process_group_serves_cpu_and_cuda_tensors():
    """On GPU the group must carry CUDA tensors (attributions, gradients) over nccl and CPU tensors
    (the memory bank's gathers, --memory-device cpu) over gloo: nccl alone has no CPU backend."""
    from torch.distributed.distributed_c10d import BackendConfig
    assert BackendConfig(pretrain.process_group_backend(True)).get_device_backend_map() == \
        {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in BackendConfig("nccl").get_device_backend_map()
    assert BackendConfig(pretrain.process_group_backend(False)).get_device_backend_map()["cpu"] == "gloo"


def test_lambda_epochs_spreads_eq8_over_the_run(tiny_model_dir, tmp_path):
    """--lambda-epochs 4 over 8 steps: q = floor(4 s / 8), lambda = 0.5 / 2^q at step s = 0..7, whatever
    the corpus size (the fixture is 20 sequences: 5 real epochs at batch 4 would give 0.5, 0.5, 0.5, 0.5, 0.5,
    0.25, ...)."""
    run(tiny_model_dir, tmp_path, "--no-routing", "--lambda-epochs", "4", method="trelm", steps=8)
    lam = [json.loads(l)["lambda"] for l in open(tmp_path / "metrics.jsonl")]
    assert lam == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]
    with pytest.raises(SystemExit, match="--lambda-epochs: expected a finite number >= 0"):
        config.from_argv(["--lambda-epochs", "-1"])
