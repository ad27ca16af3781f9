"""Tests for routing.py (TRELM Sec. 3.3, Eq. 9-12) on tiny random BERT and RoBERTa models.

Run: python -m pytest tests/test_routing.py
This file is also the torchrun worker of test_ddp_routed_step_identical (the __main__ block).
"""
import copy
import io
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optim  # noqa: E402
import routing  # noqa: E402
from common import ffn_modules  # noqa: E402

SENTENCES = ["the capital of france is paris .", "rome is the capital of italy .",
             "tokyo is located in japan ."]
POS = 2  # the token at this position is masked and its probability is P_x


def make_batch(tok, sentences=SENTENCES):
    enc = tok(sentences, padding=True, return_tensors="pt")
    ids = enc["input_ids"].clone()  # (B, T)
    target = ids[:, POS].clone()  # (B,)
    ids[:, POS] = tok.mask_token_id
    labels = torch.full_like(ids, -100)
    labels[:, POS] = target
    return dict(input_ids=ids, attention_mask=enc["attention_mask"], mlm_labels=labels)


def make_run(batch):
    """run(model, repeat=1) -> (repeat*B,) probability of the masked token, as routing expects."""
    def run(model, repeat=1):
        b = {k: v.repeat(repeat, 1) for k, v in batch.items()}  # (repeat*B, T)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (rB, T, V)
        rows = torch.arange(logits.shape[0])
        target = b["mlm_labels"][:, POS]  # (rB,)
        return logits[rows, POS].softmax(-1)[rows, target]
    return run


def mlm_loss(batch):
    def loss_fn(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["mlm_labels"]).loss
    return loss_fn


def strong_ffn(model, scale=10.0):
    """Scale the FFN weights of a random tiny model (init std 0.02) so that zeroing an FFN changes
    P_x by ~1e-3 instead of ~1e-6 and the completeness checks below have something to measure."""
    with torch.no_grad():
        for inter, out in ffn_modules(model):
            inter.dense.weight.mul_(scale)
            out.dense.weight.mul_(scale)
    return model


def prob_with_zeroed(model, run, layers):
    """S = sum(run(model)) with the FFN intermediate outputs of `layers` set to 0 (the IG baseline)."""
    handles = [ffn_modules(model)[l][0].register_forward_hook(lambda m, i, u: u * 0) for l in layers]
    try:
        with torch.no_grad():
            return run(model).sum().item()
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- Eq. (9)-(11)

def test_ig_completeness_per_layer(tiny_mlm):
    # Completeness of IG: sum_j Attr(a_j) over layer l = S(real) - S(layer l zeroed), up to the
    # right-Riemann error O(1/m). Tolerance: 1% of the difference; observed at m = 200: <= 0.3%
    # (at m = 20: up to 3%, so the tolerance does resolve the integral).
    model, tok = tiny_mlm
    model = strong_ffn(model)
    run = make_run(make_batch(tok))
    attr = routing.ffn_attributions(model, run, steps=200, chunk=200, form="layer")
    assert attr.shape == (2, 64)
    with torch.no_grad():
        s_real = run(model).sum().item()
    for layer in range(2):
        diff = s_real - prob_with_zeroed(model, run, [layer])
        assert abs(diff) > 1e-4  # the check below would be vacuous otherwise
        assert attr[layer].sum().item() == pytest.approx(diff, rel=1e-2, abs=1e-7)


def test_ig_completeness_all_layers(tiny_mlm):
    # Joint form (all layers scaled together): the sum over all layers' neurons equals
    # S(real) - S(every FFN output zeroed). Same tolerance; observed <= 0.2%. Using the real
    # activation a_j instead of the scaled pass's u_j(alpha) for layers > 1 misses by 4% (BERT)
    # and 31% (RoBERTa) here, so this test catches that error.
    model, tok = tiny_mlm
    model = strong_ffn(model)
    run = make_run(make_batch(tok))
    attr = routing.ffn_attributions(model, run, steps=200, chunk=200, form="joint")
    with torch.no_grad():
        s_real = run(model).sum().item()
    diff = s_real - prob_with_zeroed(model, run, [0, 1])
    assert abs(diff) > 1e-4
    assert attr.sum().item() == pytest.approx(diff, rel=1e-2, abs=1e-7)


def test_ig_single_layer_modes_agree_and_dead_neurons_get_zero(bert_tok):
    # With one layer both modes are the same integral; a neuron whose W_out column is 0 cannot
    # change the output and must get exactly 0 (catches attributing along the wrong axis).
    from conftest import make_model
    model = make_model("bert", bert_tok, layers=1)
    dead = torch.tensor([3, 17, 40])
    with torch.no_grad():
        ffn_modules(model)[0][1].dense.weight[:, dead] = 0
    run = make_run(make_batch(bert_tok))
    a = routing.ffn_attributions(model, run, steps=10, form="joint")
    b = routing.ffn_attributions(model, run, steps=10, form="layer")
    torch.testing.assert_close(a, b)
    assert torch.all(a[0, dead] == 0)
    assert (a[0] != 0).sum() > 40


def target_positions(batch):
    """(rows, cols) of the masked positions, where P_x is defined."""
    B = batch["input_ids"].shape[0]
    return torch.arange(B), torch.full((B,), POS)


@pytest.mark.parametrize("form", routing.IG_FORMS)
def test_ig_chunked_equals_sequential_and_leaves_model_untouched(tiny_mlm, form):
    model, tok = tiny_mlm
    model.train()
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())
    batch = make_batch(tok)
    run = make_run(batch)
    kw = dict(positions=target_positions(batch)) if form == "target" else {}
    seq = routing.ffn_attributions(model, run, steps=7, chunk=1, form=form, **kw)
    assert seq.abs().max() > 0
    for chunk in (3, 7, 0):
        torch.testing.assert_close(routing.ffn_attributions(model, run, steps=7, chunk=chunk, form=form, **kw), seq,
                                   rtol=1e-4, atol=1e-7)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in vars(m) for m in model.modules())  # the cached-layer patches are gone
    assert all(not m._forward_hooks for m in model.modules())  # and the hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def naive_eq11(model, run, steps):
    """Eq. (11) by the book: for each layer l and k = 1..m a full forward with only layer l's FFN
    activation scaled by k/m (a forward hook), gradient w.r.t. the scaled value, times v-bar."""
    ffns = ffn_modules(model)
    out = []
    for l in range(len(ffns)):
        total = 0
        for k in range(1, steps + 1):
            seen = {}

            def hook(m, i, u):
                seen["a"] = u.detach()
                seen["z"] = (u.detach() * (k / steps)).requires_grad_()
                return seen["z"]
            h = ffns[l][0].register_forward_hook(hook)
            probs = run(model)
            h.remove()
            g, = torch.autograd.grad(probs.sum(), seen["z"])
            total = total + (seen["a"] * g).reshape(-1, g.shape[-1]).sum(0)
        out.append(total / steps)
    return torch.stack(out)


def test_ig_layer_form_equals_naive_eq11(tiny_mlm):
    # The cached-lower-layer, stacked-alpha form computes exactly Eq. (11) per layer; the joint
    # form does not (it differs on a 2-layer model with strong FFNs).
    model, tok = tiny_mlm
    model = strong_ffn(make_three_layers(model, tok))
    run = make_run(make_batch(tok))
    ref = naive_eq11(model, run, steps=5)
    for chunk in (1, 0, 2):
        torch.testing.assert_close(routing.ffn_attributions(model, run, steps=5, chunk=chunk), ref,
                                   rtol=1e-4, atol=1e-8)
    joint = routing.ffn_attributions(model, run, steps=5, form="joint")
    assert (joint[1:] - ref[1:]).abs().max() > 1e-3 * ref[1:].abs().max()


def make_three_layers(model, tok):
    from conftest import make_model
    kind = "bert" if model.config.model_type == "bert" else "roberta"
    return make_model(kind, tok, layers=3)


def test_chunk_for_memory_bound():
    # hand-computed: per token and layer 4 bytes * (10*32 + 2*64 + 2 heads * 8) = 1856 bytes;
    # 2 x 8 tokens x 2 layers = 59392 bytes per stacked alpha copy
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    assert routing._chunk_for(10 * 59392, (2, 8), 2, cfg, steps=20) == 10
    assert routing._chunk_for(10 * 59392 - 1, (2, 8), 2, cfg, steps=20) == 9
    assert routing._chunk_for(10 * 59392, (2, 8), 1, cfg, steps=20) == 20  # one layer: everything fits
    assert routing._chunk_for(1, (2, 8), 2, cfg, steps=20) == 1  # never below one copy


@pytest.mark.parametrize("form", ["layer", "joint", "target"])
def test_ig_chunk_without_tiled_run_fails(tiny_mlm, form):
    model, tok = tiny_mlm
    batch = make_batch(tok)
    kw = dict(positions=target_positions(batch)) if form == "target" else {}
    with pytest.raises(ValueError, match="tile"):
        routing.ffn_attributions(model, lambda m, repeat=1: make_run(batch)(m), steps=4, chunk=2, form=form, **kw)
    assert all("forward" not in vars(m) for m in model.modules())


def test_select_paths_ratio_and_threshold():
    attr = torch.tensor([[0.1, 0.5, -0.2, 0.3, 0.0],
                         [1.0, 0.9, 0.05, -1.0, 0.2],
                         [-0.1, -0.2, -0.3, -0.4, -0.5]])
    assert [p.tolist() for p in routing.select_paths(attr, ratio=0.4)] == [[1, 3], [0, 1], [0, 1]]
    assert [p.tolist() for p in routing.select_paths(attr, ratio=0.01)] == [[1], [0], [0]]
    assert [p.tolist() for p in routing.select_paths(attr, threshold=0.5)] == [[1, 3], [0, 1], []]
    assert [p.tolist() for p in routing.select_paths(attr, threshold=0.1)] == [[0, 1, 3], [0, 1, 4], []]
    assert all(p.dtype == torch.long for p in routing.select_paths(attr))
    with pytest.raises(ValueError, match="route-ratio"):
        routing.select_paths(attr, ratio=0)


def test_attributions_live_on_the_model_device(tiny_mlm):
    # reroute all-reduces them where they are: they must be on the compute device (not built on the CPU)
    model, tok = tiny_mlm
    attr = routing.ffn_attributions(model, make_run(make_batch(tok)), steps=2)
    assert attr.device == next(model.parameters()).device and attr.dtype == torch.float32


def naive_target(model, run, steps, rows, cols):
    """The target form by the book: per alpha one forward whose hooks scale v^(l) by alpha at
    (rows, cols) only, in every layer; gradient w.r.t. each layer's scaled value, times its unscaled
    value u(alpha), summed over the target positions."""
    ffns = ffn_modules(model)
    total = 0
    for k in range(1, steps + 1):
        us, zs = [], []

        def hook(m, i, u):
            z = u.clone()
            z[rows, cols] = u[rows, cols] * (k / steps)
            us.append(u.detach())
            zs.append(z)
            return z
        handles = [inter.register_forward_hook(hook) for inter, _ in ffns]
        probs = run(model)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(probs.sum(), zs)
        total = total + torch.stack([(u[rows, cols] * g[rows, cols]).sum(0) for u, g in zip(us, grads)])
    return total / steps


def test_ig_target_form_equals_naive_loop(tiny_mlm):
    # Only the target positions' activations go from 0 to their real value; summed there only.
    model, tok = tiny_mlm
    model = strong_ffn(model)
    batch = make_batch(tok)
    run = make_run(batch)
    rows, cols = target_positions(batch)
    rows, cols = torch.cat([rows, rows[:1]]), torch.cat([cols, cols[:1] + 1])  # one extra position in row 0
    ref = naive_target(model, run, 4, rows, cols)
    for chunk in (1, 0):
        got = routing.ffn_attributions(model, run, steps=4, chunk=chunk, form="target", positions=(rows, cols))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-8)
    joint = routing.ffn_attributions(model, run, steps=4, form="joint")
    assert (joint - ref).abs().max() > 1e-3 * ref.abs().max()  # not the joint form under another name (~1% here)


def test_ig_target_form_needs_valid_positions(tiny_mlm):
    model, tok = tiny_mlm
    batch = make_batch(tok)
    run = make_run(batch)
    with pytest.raises(ValueError, match="positions"):
        routing.ffn_attributions(model, run, steps=2, form="target")
    with pytest.raises(ValueError, match="positions"):
        routing.ffn_attributions(model, run, steps=2, form="joint", positions=target_positions(batch))
    with pytest.raises(ValueError, match="must index"):
        routing.ffn_attributions(model, run, steps=2, form="target", positions=(torch.tensor([3]), torch.tensor([0])))
    assert all(not m._forward_hooks for m in model.modules())


def test_first_order_equals_finite_differences(tiny_mlm):
    # sum_t v_tj * dS/dv_tj is the derivative of S when neuron j's activation is scaled by (1 + e)
    # at every token: a central difference in float64 checks it without autograd.
    model, tok = tiny_mlm
    model = strong_ffn(model).double()
    run = make_run(make_batch(tok))
    with routing.capture_ffn_acts(model) as acts:
        S = run(model).sum()
    attr = routing.first_order_attributions(acts, S)
    assert attr.shape == (2, 64) and attr.dtype == torch.float32
    e = 1e-6

    def s_scaled(l, j, factor):
        scale = torch.ones(64, dtype=torch.float64)
        scale[j] = factor
        h = ffn_modules(model)[l][0].register_forward_hook(lambda m, i, u: u * scale)
        with torch.no_grad():
            s = run(model).sum().item()
        h.remove()
        return s
    for l in range(2):
        for j in [*attr[l].abs().topk(3).indices.tolist(), 7]:
            fd = (s_scaled(l, j, 1 + e) - s_scaled(l, j, 1 - e)) / (2 * e)
            assert abs(fd) > 1e-9
            assert attr[l, j].item() == pytest.approx(fd, rel=1e-4)


def test_first_order_on_the_training_forward(tiny_mlm):
    # On a routed training forward: equal to the joint form with m = 1 (and to form="first-order"),
    # no parameter gradient is computed (the patched backward would ask for the paths, which are not
    # set yet), and the training backward still runs on the retained graph afterwards.
    model, tok = tiny_mlm
    batch = make_batch(tok)
    run = make_run(batch)
    joint1 = routing.ffn_attributions(model, run, steps=1, form="joint")
    router = routing.Router(model, "blocks")
    torch.testing.assert_close(routing.ffn_attributions(model, run, form="first-order"), joint1)
    model.train()
    with routing.capture_ffn_acts(model) as acts:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["mlm_labels"])
    rows = torch.arange(out.logits.shape[0])
    S = out.logits[rows, POS].softmax(-1)[rows, batch["mlm_labels"][:, POS]].sum()
    attr = routing.first_order_attributions(acts, S)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(attr, joint1)
    assert attr.abs().max() > 0
    router.set_paths(routing.select_paths(attr, ratio=0.1))
    out.loss.backward()
    assert ffn_modules(model)[0][0].dense.weight.grad.count_nonzero() == 6 * 32  # the 6 selected rows
    router.detach()
    with pytest.raises(RuntimeError, match="capture_ffn_acts"):
        routing.first_order_attributions([None, None], S)


def test_loss_grad_chooses_each_layers_paths_inside_the_backward(tiny_mlm):
    # --ig-form loss-grad: an armed router picks, at each layer's W_out backward, the k neurons with the
    # largest -(v . dL/dv) summed over tokens (checked against autograd.grad of the same loss), and that
    # same backward forms the weight gradients of exactly those neurons (and equals a full backward there).
    model, tok = tiny_mlm
    batch = make_batch(tok)
    ref = copy.deepcopy(model)
    ref.train()
    with routing.capture_ffn_acts(ref) as acts:
        loss = mlm_loss(batch)(ref)
    grads = torch.autograd.grad(loss, acts, retain_graph=True)
    want = [torch.topk(-(a * g).reshape(-1, a.shape[-1]).sum(0), 6).indices.sort().values for a, g in zip(acts, grads)]
    loss.backward()
    model.train()
    router = routing.Router(model, "ffn")
    reduced = []
    router.arm(6, reduce=lambda s: reduced.append(s.shape))
    mlm_loss(batch)(model).backward()
    assert router.armed is None and reduced == [torch.Size([64])] * 2
    for got, w in zip(router.paths, want):
        assert torch.equal(got, w)
    for l, (inter, out) in enumerate(ffn_modules(model)):
        ref_inter, ref_out = ffn_modules(ref)[l]
        idx = router.paths[l]
        torch.testing.assert_close(inter.dense.weight.grad[idx], ref_inter.dense.weight.grad[idx])
        torch.testing.assert_close(out.dense.weight.grad[:, idx], ref_out.dense.weight.grad[:, idx])
        assert inter.dense.weight.grad.count_nonzero() == 6 * inter.dense.weight.shape[1]
    router.detach()


def test_first_order_subset_is_first_order_on_its_own_pass(tiny_mlm):
    model, tok = tiny_mlm
    run = make_run(make_batch(tok))
    got = routing.Attribution("first-order-subset")(model, run)
    torch.testing.assert_close(got, routing.ffn_attributions(model, run, form="first-order"))
    with pytest.raises(RuntimeError, match="inside the backward"):
        routing.Attribution("loss-grad")(model, run)
    assert routing.Attribution("loss-grad").in_backward and not routing.Attribution("first-order").in_backward


# ----------------------------------------------------------------------------- random selection control

def test_random_paths_reproducible_by_seed_and_step():
    rng = torch.get_rng_state()
    a = routing.random_paths(3, 50, 5, seed=7, step=11)
    assert torch.equal(torch.get_rng_state(), rng)  # no global RNG state consumed: nothing to save for --resume
    assert [p.numel() for p in a] == [5, 5, 5]
    for p in a:
        assert p.dtype == torch.long and torch.equal(p, p.sort().values) and p.unique().numel() == 5
        assert 0 <= p.min() and p.max() < 50
    assert all(torch.equal(x, y) for x, y in zip(a, routing.random_paths(3, 50, 5, seed=7, step=11)))
    for other in (routing.random_paths(3, 50, 5, seed=7, step=12), routing.random_paths(3, 50, 5, seed=8, step=11)):
        assert any(not torch.equal(x, y) for x, y in zip(a, other))
    assert not torch.equal(a[0], a[1])  # layers are separate draws
    b = routing.random_paths(3, 50, [0, 3, 50], seed=7, step=11)
    assert [p.numel() for p in b] == [0, 3, 50] and torch.equal(b[2], torch.arange(50))
    with pytest.raises(ValueError, match="k must be"):
        routing.random_paths(3, 50, 51, seed=7, step=11)
    with pytest.raises(ValueError, match="k must be"):
        routing.random_paths(3, 50, [1, 2], seed=7, step=11)


# ----------------------------------------------------------------------------- Eq. (12): Router

class FixedPaths:
    """What _SliceLinear asks its router at backward time: its paths, and whether it chooses them (armed)."""
    armed = None

    def __init__(self, idx):
        self.idx = idx

    def paths_of(self, layer):
        return self.idx


@pytest.mark.parametrize("rows,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_slice_linear_gradients_are_the_full_ones_restricted(rows, bias):
    # rows=True (W_in): rows idx of W and b[idx]; rows=False (W_out): columns idx of W, b (b_out) in full.
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 8, bias=bias).double()
    W, b = lin.weight, lin.bias
    idx = torch.tensor([1, 4, 5])
    x = torch.randn(3, 2, 6, dtype=torch.double, requires_grad=True)
    gy = torch.randn(3, 2, 8, dtype=torch.double)
    ref = torch.autograd.grad(F.linear(x, W, b), [x, W] + ([b] if bias else []), gy)
    x2 = x.detach().clone().requires_grad_()
    y = routing._SliceLinear.apply(x2, W, b, FixedPaths(idx), 0, rows)
    torch.testing.assert_close(y, F.linear(x, W, b), rtol=0, atol=0)
    y.backward(gy)
    torch.testing.assert_close(x2.grad, ref[0])
    dim = 0 if rows else 1
    rest = torch.tensor([j for j in range(W.shape[dim]) if j not in idx])
    torch.testing.assert_close(W.grad.index_select(dim, idx), ref[1].index_select(dim, idx))
    assert W.grad.index_select(dim, rest).count_nonzero() == 0
    if bias and rows:
        torch.testing.assert_close(b.grad[idx], ref[2][idx])
        assert b.grad[rest].count_nonzero() == 0
    elif bias:
        torch.testing.assert_close(b.grad, ref[2])


def ffn_param_names(model):
    """{name: (neuron dim, layer)} of W_in, b_in and W_out, written from the HF names."""
    pre = f"{model.base_model_prefix}.encoder.layer."
    out = {}
    for l in range(model.config.num_hidden_layers):
        out.update({f"{pre}{l}.intermediate.dense.weight": (0, l), f"{pre}{l}.intermediate.dense.bias": (0, l),
                    f"{pre}{l}.output.dense.weight": (1, l)})
    return out


def trains_under(name, scope, ln, head_bias, ffn):
    """The scope definitions of routing's docstring, by parameter name."""
    if scope == "ffn" or name in ffn:
        return True
    if ln and ("LayerNorm" in name or "layer_norm" in name):
        return True
    if scope == "blocks":
        return ".encoder.layer." not in name
    return head_bias and name in ("cls.predictions.bias", "lm_head.bias")


def others(n, idx):
    return torch.tensor([j for j in range(n) if j not in set(idx.tolist())], dtype=torch.long)


SCOPE_CASES = [("strict", False, False), ("strict", True, True), ("blocks", False, False), ("blocks", True, False),
               ("ffn", False, False)]


@pytest.mark.parametrize("scope,ln,hb", SCOPE_CASES)
def test_router_step_equals_full_backward_restricted(tiny_mlm, scope, ln, hb):
    # The gradients of what trains equal a full backward (no router) restricted to it: the selected
    # rows of W_in / b_in and columns of W_out (zero elsewhere), whole tensors for the rest of the
    # scope, None for the frozen. The paths are set after the forward (per-batch routing). After one
    # NeuronAdamW step (weight decay on) every frozen element is bitwise unchanged and every path
    # element moved.
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    ref = copy.deepcopy(model)
    loss_fn(ref).backward()
    ref_grad = {n: p.grad for n, p in ref.named_parameters()}
    original = copy.deepcopy(model.state_dict())
    model.base_model.embeddings.position_embeddings.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]

    router = routing.Router(model, scope, train_layernorm=ln, train_head_bias=hb)
    assert list(model.state_dict()) == list(original)  # the patch changes no state_dict key
    loss = loss_fn(model)
    paths = routing.random_paths(2, 64, 6, seed=1, step=0)
    router.set_paths(paths)
    loss.backward()
    ffn = ffn_param_names(model)
    trainable = {id(p) for p in router.trainable()}
    named = dict(model.named_parameters())
    assert len(ffn) == 6 and set(ffn) <= set(named)
    for n, p in named.items():
        expect = trains_under(n, scope, ln, hb, ffn)
        assert (id(p) in trainable) == expect == p.requires_grad, n
        if not expect:
            assert p.grad is None, n
        elif n in ffn:
            dim, l = ffn[n]
            torch.testing.assert_close(p.grad.index_select(dim, paths[l]), ref_grad[n].index_select(dim, paths[l]))
            assert p.grad.index_select(dim, others(p.shape[dim], paths[l])).count_nonzero() == 0, n
        else:
            torch.testing.assert_close(p.grad, ref_grad[n])

    optim.NeuronAdamW(router.trainable(), router, lr=1e-2, weight_decay=0.1).step()
    for n, p in named.items():
        before = original[n]
        if not trains_under(n, scope, ln, hb, ffn):
            assert torch.equal(p, before), n
        elif n in ffn:
            dim, l = ffn[n]
            rest = others(p.shape[dim], paths[l])
            assert torch.equal(p.index_select(dim, rest), before.index_select(dim, rest)), n
            assert torch.all(p.index_select(dim, paths[l]) != before.index_select(dim, paths[l])), n
        else:
            assert not torch.equal(p, before), n
    router.detach()
    assert all("forward" not in vars(m) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_routed_backward_skips_the_frozen_weight_gradient_flops(tiny_mlm):
    # Scope ffn differs from a full backward only in the FFN weight gradients: exactly the W_in and
    # W_out weight-gradient matmuls of the I - k unselected neurons, 2 N H (I - k) FLOPs each, per
    # layer, are skipped. Freezing more (blocks, strict) skips more.
    model, tok = tiny_mlm
    batch = make_batch(tok)
    loss_fn = mlm_loss(batch)
    N, (L, H, I, k) = batch["input_ids"].numel(), (2, 32, 64, 6)

    def backward_flops():
        loss = loss_fn(model)
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        model.zero_grad(set_to_none=True)
        return fc.get_total_flops()
    full = backward_flops()
    flops = {}
    for scope in routing.SCOPES:
        router = routing.Router(model, scope)
        router.set_paths(routing.random_paths(L, I, k, seed=0, step=0))
        flops[scope] = backward_flops()
        router.detach()
    assert full - flops["ffn"] == L * 2 * (2 * N * H * (I - k))
    assert flops["strict"] < flops["blocks"] < flops["ffn"] < full


def test_router_bad_input_and_missing_paths(tiny_mlm):
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    with pytest.raises(ValueError, match="--route-scope"):
        routing.Router(model, "all")
    router = routing.Router(model, "strict")
    with pytest.raises(RuntimeError, match="already patched"):
        routing.Router(model, "ffn")
    with pytest.raises(RuntimeError, match="set_paths"):
        loss_fn(model).backward()
    with pytest.raises(ValueError, match="2 layers"):
        router.set_paths([torch.tensor([0])])
    for bad in ([torch.tensor([0, 0]), torch.tensor([1])], [torch.tensor([64]), torch.tensor([1])],
                [torch.tensor([0.5]), torch.tensor([1])], [torch.tensor([[1]]), torch.tensor([1])]):
        with pytest.raises(ValueError, match="distinct neuron indices"):
            router.set_paths(bad)
    router.set_paths([torch.tensor([], dtype=torch.long), [0, 5]])  # an empty path: zero gradient there
    loss_fn(model).backward()
    (inter0, out0), (inter1, _) = ffn_modules(model)
    assert inter0.dense.weight.grad.count_nonzero() == 0 and out0.dense.weight.grad.count_nonzero() == 0
    assert inter1.dense.weight.grad[[0, 5]].count_nonzero() > 0
    router.detach()
    with pytest.raises(RuntimeError, match="detached"):
        router.detach()
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- NeuronAdamW

HP = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)


class Neurons:
    """NeuronAdamW's view of the selection (a Router's neuron_dim / selected) for bare parameters."""

    def __init__(self, dims):
        self.dims, self.idx = dims, {}

    def neuron_dim(self, p):
        return self.dims.get(id(p))

    def selected(self, p):
        return self.idx[id(p)]


def ffn_like(seed=0):
    """W_in (6, 4), b_in (6,), W_out (4, 6) with neuron axes 0, 0, 1; a plain vector and matrix."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (4, 6), (4,), (3, 4)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    return ps, {id(ps[0]): 0, id(ps[1]): 0, id(ps[2]): 1}


def adamw_like(params):
    """torch.optim.AdamW with optim.make_optimizer's two weight-decay groups."""
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": HP["weight_decay"]},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    return grads


def test_neuron_adamw_with_every_neuron_selected_is_adamw():
    ps, dims = ffn_like()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    neurons = Neurons(dims)
    neurons.idx = {i: torch.arange(6) for i in dims}
    opt, ref = optim.NeuronAdamW(ps, neurons, **HP), adamw_like(twins)
    for step in range(5):
        grads = set_grads(ps, step)
        for t, gr in zip(twins, grads):
            t.grad = gr.clone()
        opt.step()
        ref.step()
    for p, t in zip(ps, twins):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[t]["exp_avg_sq"], rtol=1e-6, atol=0)
        assert torch.all(opt.state[p]["step"] == 5)
    assert opt.state[ps[0]]["step"].shape == (6,) and opt.state[ps[3]]["step"].shape == ()


def test_neuron_adamw_steps_only_the_selected_neurons_like_adamw_on_each_slice():
    # Reference: one torch.optim.AdamW per neuron on that neuron's slice alone, stepped only when the
    # neuron is selected (so with the slice's own step count); plain parameters: one AdamW.
    ps, dims = ffn_like()
    neurons = Neurons(dims)
    opt = optim.NeuronAdamW(ps, neurons, **HP)
    refs = {}
    for i, p in enumerate(ps[:3]):
        for j in range(6):
            s = torch.nn.Parameter(p.detach().select(dims[id(p)], j).clone())
            refs[i, j] = s, torch.optim.AdamW([s], lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                                              weight_decay=HP["weight_decay"] if p.ndim >= 2 else 0.0)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ps[3:]]
    plain_opt = adamw_like(plain)
    selections = [[0, 2, 5], [2, 3], [], [0, 1, 2, 3, 4, 5], [5], [1, 2]]
    for step, sel in enumerate(selections):
        idx = torch.tensor(sel, dtype=torch.long)
        neurons.idx = {i: idx for i in dims}
        grads = set_grads(ps, step)
        before = {i: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for i, p in enumerate(ps[:3])}
        opt.step()
        for (i, j), (s, o) in refs.items():
            if j in sel:
                s.grad = grads[i].select(dims[id(ps[i])], j).clone()
                o.step()
        for p, gr in zip(plain, grads[3:]):
            p.grad = gr.clone()
        plain_opt.step()
        for (i, j), (s, o) in refs.items():
            dim = dims[id(ps[i])]
            torch.testing.assert_close(ps[i].detach().select(dim, j), s.detach(), rtol=1e-6, atol=1e-8)
            if o.state:
                torch.testing.assert_close(opt.state[ps[i]]["exp_avg"].select(dim, j), o.state[s]["exp_avg"],
                                           rtol=1e-6, atol=1e-9)
                assert opt.state[ps[i]]["step"][j] == o.state[s]["step"]
        for i, (w, st) in before.items():
            dim, rest = dims[id(ps[i])], others(6, idx)
            assert torch.equal(ps[i].detach().index_select(dim, rest), w.index_select(dim, rest))
            for k, v in st.items():  # bitwise: weights, moments and step counts of the unselected
                assert torch.equal(opt.state[ps[i]][k].index_select(0 if k == "step" else dim, rest),
                                   v.index_select(0 if k == "step" else dim, rest)), k
        for p, q in zip(ps[3:], plain):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    assert opt.state[ps[0]]["step"].tolist() == [2, 2, 4, 2, 1, 3]  # times each neuron was selected


def test_neuron_adamw_state_dict_round_trip_is_exact():
    ps, dims = ffn_like()
    neurons = Neurons(dims)
    opt = optim.NeuronAdamW(ps, neurons, **HP)
    for step, sel in enumerate([[0, 2, 5], [2, 3]]):
        neurons.idx = {i: torch.tensor(sel) for i in dims}
        set_grads(ps, step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    neurons2 = Neurons({id(t): dims[id(p)] for p, t in zip(ps, twins) if id(p) in dims})
    opt2 = optim.NeuronAdamW(twins, neurons2, **HP)
    opt2.load_state_dict(torch.load(buf))
    for o, params, n in ((opt, ps, neurons), (opt2, twins, neurons2)):
        n.idx = {id(p): torch.tensor([3, 5]) for p in params if id(p) in n.dims}
        set_grads(params, 9)
        o.step()
    for p, t in zip(ps, twins):
        assert torch.equal(p, t)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[t][k]) and v.dtype == opt2.state[t][k].dtype, k


def test_from_adamw_carries_moments_and_continues_adamw(tiny_mlm):
    # Full-parameter AdamW for 2 steps, then routing (scope ffn) with every neuron selected: the
    # carried state makes the routed step the third AdamW step of the twin that never routed.
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    twin = copy.deepcopy(model)
    full, twin_opt = adamw_like(model.parameters()), adamw_like(twin.parameters())
    for _ in range(2):
        for m, o in ((model, full), (twin, twin_opt)):
            loss_fn(m).backward()
            o.step()
            o.zero_grad()
    router = routing.Router(model, "ffn")
    opt = optim.from_adamw(full, router)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == \
        [(HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]), (HP["lr"], HP["betas"], HP["eps"], 0.0)]
    W_in = ffn_modules(model)[0][0].dense.weight
    assert torch.equal(opt.state[W_in]["exp_avg"], full.state[W_in]["exp_avg"])
    assert opt.state[W_in]["exp_avg"] is not full.state[W_in]["exp_avg"]
    assert opt.state[W_in]["step"].tolist() == [2.0] * 64
    router.set_paths([torch.arange(64)] * 2)
    for m, o in ((model, opt), (twin, twin_opt)):
        loss_fn(m).backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
    router.detach()
    with pytest.raises(ValueError, match="make_optimizer"):
        optim.from_adamw(torch.optim.AdamW(model.parameters(), weight_decay=0.01), routing.Router(model, "ffn"))


# ----------------------------------------------------------------------------- bench.py's memory helper

# ----------------------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_routed_step_identical(tmp_path):
    # Two gloo ranks see different sentences, so their first-order attributions and local paths
    # differ; after the all-reduce of the attributions both select the same paths, and after a routed
    # step (Router before DDP, NeuronAdamW, paths set between forward and backward) both models are
    # identical: DDP all-reduced the full-shaped FFN gradients with no help from the router.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.abspath(__file__), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.allclose(r0["attr"], r1["attr"])
    assert any(not torch.equal(a, b) for a, b in zip(r0["local_paths"], r1["local_paths"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["paths"], r1["paths"]))
    torch.testing.assert_close(r0["reduced"], r0["attr"] + r1["attr"])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    moved = {k for k, v in r0["state"].items() if not torch.equal(v, r0["initial"][k])}
    assert "bert.encoder.layer.0.intermediate.dense.weight" in moved and "bert.embeddings.word_embeddings.weight" in moved
    assert "bert.encoder.layer.0.attention.self.query.weight" not in moved  # frozen under "blocks"


def _ddp_worker(out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from conftest import make_bert_tokenizer, make_model
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = make_bert_tokenizer(out_dir)
    model = make_model("bert", tok)  # same seed: identical on both ranks
    initial = copy.deepcopy(model.state_dict())
    batch = make_batch(tok, SENTENCES[rank:rank + 2])  # different data per rank
    router = routing.Router(model, "blocks")
    ddp = DDP(model)
    opt = optim.NeuronAdamW(router.trainable(), router, lr=1e-2)
    with routing.capture_ffn_acts(model) as acts:
        out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["mlm_labels"])
    rows = torch.arange(out.logits.shape[0])
    S = out.logits[rows, POS].softmax(-1)[rows, batch["mlm_labels"][:, POS]].sum()
    attr = routing.first_order_attributions(acts, S)
    local = routing.select_paths(attr, ratio=0.1)
    reduced = attr.clone()
    dist.all_reduce(reduced)
    paths = routing.select_paths(reduced, ratio=0.1)
    router.set_paths(paths)
    out.loss.backward()
    opt.step()
    router.detach()
    torch.save(dict(attr=attr, local_paths=local, paths=paths, reduced=reduced, state=model.state_dict(),
                    initial=initial), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
