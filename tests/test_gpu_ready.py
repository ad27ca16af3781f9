"""A step ready for GPUs, checked on the CPU (issue 34, item 4): SDPA attention equals eager, bf16
autocast through routing's custom autograd Function keeps fp32 master weights and the gradients of
plain autograd, fused AdamW only on CUDA (the CPU optimizer unchanged), batches collated by DataLoader
workers bitwise those of the training thread (resume included), and --compile trains as eager does.
GPU-only checks skip here with their reason."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import common
import config
import optim
import pretrain
import routing
from conftest import make_bert_tokenizer, make_model, make_roberta_tokenizer
from model import KnowledgeMLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
CUDA = torch.cuda.is_available()


def padded_batch(tok, seed=0):
    """(ids, attention mask, MLM labels) of three sequences of unequal lengths (12, 7, 3 tokens), padded:
    a third of the real non-special tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    words = [tok.convert_tokens_to_ids(w) for w in tok.tokenize("the capital of france is paris berlin rome madrid")]
    lengths = (12, 7, 3)
    ids = torch.full((len(lengths), max(lengths)), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        body = torch.tensor(words)[torch.randint(len(words), (n - 2,), generator=g)]
        ids[b, :n] = torch.cat([torch.tensor([tok.cls_token_id]), body, torch.tensor([tok.sep_token_id])])
        attn[b, :n] = 1
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.34) & (attn == 1) & (ids != tok.cls_token_id)
                         & (ids != tok.sep_token_id), ids, torch.full_like(ids, -100))
    labels[0, 1] = ids[0, 1]  # at least one label
    return ids, attn, labels


# ----------------------------------------------------------------------------- SDPA attention

@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_sdpa_attention_equals_eager_with_padding(kind, tmp_path):
    """--attention sdpa and eager (common.load_mlm's attn_implementation): the same last hidden states at
    every position and the same MLM loss on a padded batch; the mask matters (without it they change)."""
    tok = (make_bert_tokenizer if kind == "bert" else make_roberta_tokenizer)(tmp_path)
    d = str(tmp_path / kind)
    make_model(kind, tok).save_pretrained(d)
    tok.save_pretrained(d)
    ids, attn, labels = padded_batch(tok)
    out = {}
    for impl in ("sdpa", "eager"):
        mlm, _ = common.load_mlm(d, attn_implementation=impl)
        assert mlm.config._attn_implementation == impl
        with torch.no_grad():
            hidden = mlm.base_model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
            unmasked = mlm.base_model(input_ids=ids, attention_mask=torch.ones_like(attn)).last_hidden_state
            loss = KnowledgeMLM(mlm.eval())(ids, attn, labels)["loss"]
        out[impl] = hidden, loss
        assert not torch.allclose(hidden[2, :3], unmasked[2, :3], atol=1e-4)  # padding is masked
    torch.testing.assert_close(out["sdpa"][0], out["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], rtol=1e-5, atol=1e-6)


def test_attention_flag_reaches_the_model(tiny_model_dir, tmp_path):
    cfg = config.from_argv(["--method", "mlm", "--model", tiny_model_dir, "--data", FIX, "--seq-len", "32",
                            "--output-dir", str(tmp_path / "r"), "--attention", "eager"])
    assert pretrain.Trainer(cfg).net.mlm.config._attn_implementation == "eager"
    assert config.from_argv(["--model", tiny_model_dir]).run.attention == "sdpa"  # the default


# ----------------------------------------------------------------------------- bf16 autocast + Router

@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_bf16_autocast_through_router_matches_plain_autograd(kind, tmp_path):
    """Under CPU bf16 autocast, a Router-patched model (routing._SliceLinear) runs its FFN matmuls in bf16
    and its backward gives, at the selected neurons, the gradients an unpatched copy gets under the same
    autocast (bf16 tolerance), zero elsewhere; weights and gradients stay fp32 (master weights)."""
    tok = (make_bert_tokenizer if kind == "bert" else make_roberta_tokenizer)(tmp_path)
    patched = make_model(kind, tok).train()
    plain = copy.deepcopy(patched)
    ids, attn, labels = padded_batch(tok)
    router = routing.Router(patched, "ffn")
    g = torch.Generator().manual_seed(1)
    paths = [torch.randperm(I, generator=g)[:8].sort().values for I in router.sizes]
    router.set_paths(paths)
    seen = []
    common.ffn_modules(patched)[0][0].dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = []
    for m in (patched, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = KnowledgeMLM(m)(ids, attn, labels)["loss"]
        loss.backward()  # outside autocast, as pretrain.Trainer.train_step
        losses.append(loss.detach())
    assert seen == [torch.bfloat16]  # autocast reached the custom Function's forward
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0.0)
    for (n, p), q in zip(patched.named_parameters(), plain.parameters()):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), n
    for l, ((i_p, o_p), (i_q, o_q)) in enumerate(zip(common.ffn_modules(patched), common.ffn_modules(plain))):
        idx = paths[l]
        for got, want, dim in ((i_p.dense.weight.grad, i_q.dense.weight.grad, 0),
                               (i_p.dense.bias.grad, i_q.dense.bias.grad, 0),
                               (o_p.dense.weight.grad, o_q.dense.weight.grad, 1)):
            sel = want.index_select(dim, idx)
            torch.testing.assert_close(got.index_select(dim, idx), sel, rtol=2e-2, atol=2e-2 * sel.abs().max().item())
            rest = torch.ones(got.shape[dim], dtype=torch.bool)
            rest[idx] = False
            assert not got.index_select(dim, rest.nonzero()[:, 0]).any()  # only the paths get gradients
    ffn = {id(p) for pair in common.ffn_modules(plain) for m in pair for p in (m.dense.weight, m.dense.bias)}
    for (n, p), q in zip(patched.named_parameters(), plain.parameters()):
        if id(q) not in ffn and q.grad is not None:  # attention, embeddings, LayerNorms: plain autograd's
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2 * q.grad.abs().max().item())
    router.detach()


# ----------------------------------------------------------------------------- fused AdamW

def adamw_as_before(params, o):
    """make_optimizer before fused AdamW: the CPU reference."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=o.lr, betas=(0.9, 0.98), eps=1e-6)


def stepped(make, device, steps=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).to(device)
    opt = make(net.parameters(), config.from_argv([]).optim)
    for s in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(s)).to(device)
        net(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, [p.detach().cpu() for p in net.parameters()]


def test_make_optimizer_on_cpu_is_unfused_and_unchanged():
    opt, got = stepped(optim.make_optimizer, "cpu")
    assert not any(g.get("fused") for g in opt.param_groups)
    _, want = stepped(adamw_as_before, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # bitwise the optimizer of before


@pytest.mark.skipif(not CUDA, reason="fused AdamW is CUDA-only; no CUDA device here")
def test_make_optimizer_is_fused_on_cuda_only():
    opt, got = stepped(optim.make_optimizer, "cuda")
    assert all(g["fused"] for g in opt.param_groups)
    _, want = stepped(adamw_as_before, "cuda")
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
    mixed = [torch.nn.Parameter(torch.ones(2, 2, device="cuda")), torch.nn.Parameter(torch.ones(2))]
    assert not any(g.get("fused") for g in optim.make_optimizer(mixed, config.from_argv([]).optim).param_groups)


# ----------------------------------------------------------------------------- DataLoader workers

def train(model_dir, out, *extra, steps=6):
    pretrain.main(["--method", "trelm", "--model", model_dir, "--data", FIX, "--output-dir", str(out),
                   "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32",
                   "--log-every", "1", "--seed", "3", "--route-every", "2", "--route-warmup", "3",
                   "--ig-form", "first-order", *extra])


def final(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


def test_loader_workers_train_bitwise_as_the_training_thread_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    """6 TRELM steps (2 micro-batches each, CKA negatives drawn after collation, routing from step 3) with
    --loader-workers 2 give bitwise the weights and losses of --loader-workers 0; so does a run killed
    during step 5 and resumed from its step-3 checkpoint. Each run starts its loader once: routing
    starting changes nothing about batches."""
    starts = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *a, **kw):
            starts.append((kw["sampler"].start, kw["num_workers"], kw["multiprocessing_context"]))
            super().__init__(*a, **kw)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    train(tiny_model_dir, tmp_path / "thread")
    assert starts == []
    train(tiny_model_dir, tmp_path / "workers", "--loader-workers", "2")
    assert starts == [(0, 2, "spawn")]
    a, b = final(tmp_path / "thread"), final(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "thread") == losses(tmp_path / "workers")

    orig = pretrain.Trainer.train_step

    def interrupted(self):  # dies during step 5, after the step-3 checkpoint
        if self.step == 4:
            raise KeyboardInterrupt
        return orig(self)
    monkeypatch.setattr(pretrain.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, tmp_path / "split", "--loader-workers", "2", "--save-every", "3")
    monkeypatch.setattr(pretrain.Trainer, "train_step", orig)
    starts.clear()
    train(tiny_model_dir, tmp_path / "split", "--loader-workers", "2", "--save-every", "3", "--resume")
    assert starts == [(3 * 2, 2, "spawn")]  # k = step 3 x --grad-accum 2
    c = final(tmp_path / "split")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert losses(tmp_path / "split") == losses(tmp_path / "thread")


def test_loader_workers_flag_checked(tiny_model_dir):
    with pytest.raises(SystemExit, match=r"--loader-workers: expected an integer >= 0, got -1"):
        config.from_argv(["--model", tiny_model_dir, "--loader-workers", "-1"])


# ----------------------------------------------------------------------------- torch.compile

COMPILE_MISSING = config.compile_missing("cpu")


def test_compile_refused_without_a_compiler(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SystemExit, match=r"--compile: torch.compile on CPU needs a C\+\+ compiler"):
        config.from_argv(["--model", tiny_model_dir, "--device", "cpu", "--compile"])


def test_compiled_model_reads_the_paths_at_backward_time(tmp_path):
    """Under torch.compile (backend aot_eager: the graph capture and compiled autograd of --compile, without
    Inductor's C++ kernels) the routed backward trains the paths set after compilation, not those seen when
    it compiled, and a loss-grad arm chooses the paths eager autograd chooses."""
    tok = make_bert_tokenizer(tmp_path)
    ids, attn, labels = padded_batch(tok)
    eager, compiled = make_model("bert", tok).train(), make_model("bert", tok).train()
    routers = [routing.Router(m, "ffn") for m in (eager, compiled)]
    nets = [KnowledgeMLM(eager), torch.compile(KnowledgeMLM(compiled), backend="aot_eager")]
    for paths in ([torch.tensor([1, 3]), torch.tensor([2, 5])], [torch.tensor([7, 9, 11]), torch.tensor([0])]):
        routers[1].set_paths(paths)
        compiled.zero_grad()
        nets[1](ids, attn, labels)["loss"].backward()
        for l, (inter, out) in enumerate(common.ffn_modules(compiled)):
            assert inter.dense.weight.grad.abs().sum(1).nonzero()[:, 0].tolist() == paths[l].tolist()
            assert out.dense.weight.grad.abs().sum(0).nonzero()[:, 0].tolist() == paths[l].tolist()
    chosen = []
    for r, net in zip(routers, nets):
        r.arm(3)
        net(ids, attn, labels)["loss"].backward()
        chosen.append([p.tolist() for p in r.paths])
    assert chosen[0] == chosen[1]


@pytest.mark.slow  # Inductor compiles C++ kernels: about 85 s per case on 2 cores
@pytest.mark.skipif(COMPILE_MISSING is not None, reason=f"--compile on CPU: {COMPILE_MISSING}")
@pytest.mark.parametrize("method,extra", [("mlm", ()),
                                          ("trelm", ("--route-every", "1", "--route-warmup", "2",
                                                     "--ig-form", "first-order"))])
def test_compile_trains_as_eager(tiny_model_dir, tmp_path, method, extra):
    """--compile: a few steps compile and train with the losses and weights of the uncompiled run (Inductor
    fuses and reorders float ops: within tolerance, not bitwise); routed steps included (trelm)."""
    def run(out, *flags):
        pretrain.main(["--method", method, "--model", tiny_model_dir, "--data", FIX, "--output-dir", str(out),
                       "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--log-every", "1", "--seed", "3",
                       "--device", "cpu", *extra, *flags])
    run(tmp_path / "eager")
    run(tmp_path / "compiled", "--compile")
    want, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(got) == 4
    assert got == pytest.approx(want, rel=1e-3, abs=1e-4)
    a, b = final(tmp_path / "eager"), final(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
