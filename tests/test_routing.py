"""Tests for routing.py (TRELM Sec. 3.3, Eq. 9-12) on tiny random BERT and RoBERTa models.

Run: python -m pytest tests/test_routing.py
This file is also the torchrun worker of test_ddp_paths_identical (the __main__ block).
"""
import copy
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import routing  # noqa: E402
from common import ffn_modules, head_decoder  # noqa: E402

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


@pytest.mark.parametrize("form", routing.FORMS)
def test_ig_chunked_equals_sequential_and_leaves_model_untouched(tiny_mlm, form):
    model, tok = tiny_mlm
    model.train()
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())
    run = make_run(make_batch(tok))
    seq = routing.ffn_attributions(model, run, steps=7, chunk=1, form=form)
    for chunk in (3, 7, 0):
        torch.testing.assert_close(routing.ffn_attributions(model, run, steps=7, chunk=chunk, form=form), seq,
                                   rtol=1e-4, atol=1e-7)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in vars(m) for m in model.modules())  # the cached-layer patches are gone
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


@pytest.mark.parametrize("form", routing.FORMS)
def test_ig_chunk_without_tiled_run_fails(tiny_mlm, form):
    model, tok = tiny_mlm
    batch = make_batch(tok)
    with pytest.raises(ValueError, match="tile"):
        routing.ffn_attributions(model, lambda m, repeat=1: make_run(batch)(m), steps=4, chunk=2, form=form)
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


def slice_apply(linear, x, w_sel, b_sel, idx, rows):
    """_SliceLinear with the slices written into a fresh copy of the full weight (out of place, so
    gradcheck may perturb w_sel between forward and backward)."""
    w = linear.weight.detach().index_copy(0 if rows else 1, idx, w_sel.detach())
    b = linear.bias
    if b is not None and b_sel is not None:
        b = b.detach().index_copy(0, idx, b_sel.detach())
    return routing._SliceLinear.apply(x, w, b, w_sel, b_sel, idx, rows)


@pytest.mark.parametrize("rows,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_slice_linear_gradcheck(rows, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 4, bias=bias).double().requires_grad_(False)
    idx = torch.tensor([0, 3])
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    w_sel = (linear.weight[idx] if rows else linear.weight[:, idx]).clone().requires_grad_()
    b_sel = linear.bias[idx].clone().requires_grad_() if (rows and bias) else None
    inputs = (x, w_sel) if b_sel is None else (x, w_sel, b_sel)
    fn = lambda x, w, b=None: slice_apply(linear, x, w, b, idx, rows)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("rows,bias", [(True, True), (True, False), (False, True)])
def test_slice_linear_matches_nn_linear(rows, bias):
    # Through the Router's patch (slices copied into the frozen weight): input and slice gradients equal autograd's
    # full gradients of nn.Linear, only the slices get any, and an update of the slice reaches
    # the next forward.
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 8, bias=bias)
    frozen = copy.deepcopy(ref).requires_grad_(False)
    idx = torch.tensor([1, 4, 5])
    x = torch.randn(3, 2, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(3, 2, 8)
    ref(x1).backward(gy)
    w_sel = torch.nn.Parameter(frozen.weight[idx] if rows else frozen.weight[:, idx])
    b_sel = torch.nn.Parameter(frozen.bias[idx]) if (rows and bias) else None
    patch = routing._SlicePatch(frozen, w_sel, b_sel, idx, rows)
    y = patch.forward(x2)
    torch.testing.assert_close(y, ref(x))
    with torch.no_grad():  # an extra forward between forward and backward must not break backward
        patch.forward(x)
    y.backward(gy)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(w_sel.grad, ref.weight.grad[idx] if rows else ref.weight.grad[:, idx])
    if b_sel is not None:
        torch.testing.assert_close(b_sel.grad, ref.bias.grad[idx])
    assert frozen.weight.grad is None and (not bias or frozen.bias.grad is None)
    torch.optim.SGD([p for p in (w_sel, b_sel) if p is not None], lr=0.1).step()
    with torch.no_grad():
        if rows:
            ref.weight[idx] -= 0.1 * w_sel.grad
            if bias:
                ref.bias[idx] -= 0.1 * b_sel.grad
        else:
            ref.weight[:, idx] -= 0.1 * w_sel.grad
    torch.testing.assert_close(patch.forward(x), ref(x))


@pytest.mark.parametrize("opt_kwargs", [{}, {"foreach": True}, {"fused": True}])
def test_optimizer_update_reaches_next_forward(opt_kwargs):
    # The slice updates of every AdamW implementation (for-loop, foreach, fused; fused does not
    # bump the version counter) reach the next forward.
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6).requires_grad_(False)
    idx = torch.tensor([2, 5])
    w_sel, b_sel = torch.nn.Parameter(linear.weight[idx]), torch.nn.Parameter(linear.bias[idx])
    patch = routing._SlicePatch(linear, w_sel, b_sel, idx, rows=True)
    x = torch.randn(3, 4)
    y0 = patch.forward(x)  # (3, 6)
    y0.sum().backward()
    torch.optim.AdamW([w_sel, b_sel], lr=0.1, **opt_kwargs).step()
    y = patch.forward(x)
    torch.testing.assert_close(y[:, idx], x @ w_sel.detach().t() + b_sel.detach())
    assert (y[:, idx] - y0[:, idx]).abs().min() > 1e-3  # the step did change the output


def random_paths(model, k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(inter.dense.out_features, generator=g)[:k].sort().values
            for inter, _ in ffn_modules(model)]


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_router_gradients_equal_full_backward(tiny_mlm, flags):
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    ref = copy.deepcopy(model)
    loss_fn(ref).backward()
    ref_grads = dict(ref.named_parameters())
    paths = random_paths(model)
    router = routing.Router().attach(model, paths, train_layernorm=flags[0], train_head_bias=flags[1])
    loss_fn(model).backward()
    params = router.parameters()
    for l, ((inter, out), idx) in enumerate(zip(ffn_modules(model), paths)):
        w_in, b_in, w_out = params[3 * l: 3 * l + 3]
        pre = f"{model.base_model_prefix}.encoder.layer.{l}."
        torch.testing.assert_close(w_in.grad, ref_grads[pre + "intermediate.dense.weight"].grad[idx])
        torch.testing.assert_close(b_in.grad, ref_grads[pre + "intermediate.dense.bias"].grad[idx])
        torch.testing.assert_close(w_out.grad, ref_grads[pre + "output.dense.weight"].grad[:, idx])
    named = {id(p): n for n, p in model.named_parameters()}
    for p in params[6:]:  # LayerNorms and the head bias when the flags are on
        torch.testing.assert_close(p.grad, ref_grads[named[id(p)]].grad)
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert len(params) == 6 + flags[0] * 2 * n_ln + flags[1]
    trainable = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    router.detach()


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_routed_step_updates_only_paths(tiny_mlm, flags, tmp_path):
    # Eq. (12) as built: a step moves exactly row j of W_in, b_in[j] and column j of W_out for each
    # selected j (every input neuron -> j -> every output neuron), and nothing else (b_out, other
    # rows/columns, attention, embeddings stay bitwise). One AdamW step through the router equals a
    # full AdamW step whose gradients outside the paths (and the optional LayerNorms / head bias)
    # are zeroed.
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    original = copy.deepcopy(model.state_dict())
    keys = list(original)
    paths = random_paths(model)

    ref = copy.deepcopy(model)
    loss_fn(ref).backward()
    keep = {}
    for l, idx in enumerate(paths):
        pre = f"{model.base_model_prefix}.encoder.layer.{l}."
        m_in = torch.zeros(64, dtype=torch.bool)
        m_in[idx] = True
        keep[pre + "intermediate.dense.weight"] = m_in[:, None].expand(64, 32)
        keep[pre + "intermediate.dense.bias"] = m_in
        keep[pre + "output.dense.weight"] = m_in[None, :].expand(32, 64)
    head_bias_names = {n for n, p in ref.state_dict(keep_vars=True).items() if p is head_decoder(ref)[1]}
    ln_names = {f"{mn}.{pn}" for mn, m in ref.named_modules() if isinstance(m, torch.nn.LayerNorm)
                for pn, _ in m.named_parameters()}
    for name, p in ref.named_parameters():
        if (flags[0] and name in ln_names) or (flags[1] and name in head_bias_names):
            continue
        p.grad *= keep[name] if name in keep else 0
    torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0).step()

    router = routing.Router().attach(model, paths, train_layernorm=flags[0], train_head_bias=flags[1])
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2, weight_decay=0.0)
    loss_fn(model).backward()
    opt.step()
    b = make_batch(tok)
    with torch.no_grad():  # the attached forward sees the updated slices
        attached_logits = model(input_ids=b["input_ids"]).logits
    # saving while attached: same keys, and the values include the step (state_dict pre-hook)
    attached_sd = model.state_dict()
    assert list(attached_sd) == keys
    model.save_pretrained(tmp_path / "attached")
    router.detach()

    assert all("forward" not in vars(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(sd) == keys
    moved = 0
    for k in keys:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attached_sd[k], sd[k], rtol=0, atol=0)
        unchanged = ~keep[k] if k in keep else torch.ones_like(sd[k], dtype=torch.bool)
        if (flags[0] and k in ln_names) or (flags[1] and k in head_bias_names):
            unchanged = torch.zeros_like(unchanged)
        assert torch.equal(sd[k][unchanged], original[k][unchanged]), k  # bitwise unchanged
        if k in keep:  # every entry of every path moved (Adam's first step moves each by ~lr)
            assert torch.all(sd[k][keep[k]] != original[k][keep[k]]), k
        moved += int((sd[k][~unchanged] != original[k][~unchanged]).sum())
    n_path = 2 * (6 * 32 + 6 + 32 * 6)
    assert moved >= n_path  # every path entry moved (Adam's first step moves each by ~lr)

    reloaded = type(model).from_pretrained(tmp_path / "attached")
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    with torch.no_grad():  # detached forward is the plain model again, equal to the attached one
        torch.testing.assert_close(model(input_ids=b["input_ids"]).logits, attached_logits)
        torch.testing.assert_close(reloaded(input_ids=b["input_ids"]).logits, attached_logits)


def test_router_empty_path_freezes_layer_and_bad_paths_fail(tiny_mlm):
    model, tok = tiny_mlm
    paths = [torch.tensor([], dtype=torch.long), torch.tensor([0, 5])]
    router = routing.Router().attach(model, paths)
    assert len(router.parameters()) == 3
    assert "forward" not in vars(ffn_modules(model)[0][0].dense)
    with pytest.raises(RuntimeError, match="already attached"):
        router.attach(model, paths)
    router.detach()
    with pytest.raises(ValueError, match="distinct neuron indices"):
        routing.Router().attach(model, [torch.tensor([0, 0]), torch.tensor([64])])
    assert all(p.requires_grad for p in model.parameters())  # a failed attach changes nothing


# ----------------------------------------------------------------------------- Adam state across re-routings

def view_of(router, param):
    """The router's (tensor, idx) cut from model parameter `param`."""
    hit = [(t, idx) for t, full, dim, idx in router.views() if full is param]
    assert len(hit) == 1
    return hit[0]


def test_adam_moments_kept_for_slices_that_stay_and_zero_for_new(tiny_mlm):
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    (inter0, out0), (inter1, _) = ffn_modules(model)
    W_in, b_in, W_out = inter0.dense.weight, inter0.dense.bias, out0.dense.weight
    # full-parameter training first (the fresh-head warm-up), then the first routing
    full_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss_fn(model).backward()
        full_opt.step()
        full_opt.zero_grad()
    r1 = routing.Router().attach(model, [torch.tensor([0, 1, 2]), torch.tensor([3, 4])])
    opt1 = torch.optim.AdamW(r1.parameters(), lr=1e-3)
    routing.carry_adam_state(full_opt, [(p, p, None, None) for p in model.parameters()], opt1, r1.views())
    w, _ = view_of(r1, W_in)
    assert torch.equal(opt1.state[w]["exp_avg"], full_opt.state[W_in]["exp_avg"][[0, 1, 2]])
    w, _ = view_of(r1, W_out)
    assert torch.equal(opt1.state[w]["exp_avg_sq"], full_opt.state[W_out]["exp_avg_sq"][:, [0, 1, 2]])
    assert float(opt1.state[w]["step"]) == 2
    loss_fn(model).backward()
    opt1.step()
    old = {name: {k: opt1.state[view_of(r1, P)[0]][k].clone() for k in ("exp_avg", "exp_avg_sq")}
           for name, P in (("W_in", W_in), ("b_in", b_in), ("W_out", W_out))}
    old_views = r1.views()
    r1.detach()
    # re-route: neurons 1 and 2 stay, 5 is new (layer 0); layer 1 keeps 4, gains 7
    r2 = routing.Router().attach(model, [torch.tensor([1, 2, 5]), torch.tensor([4, 7])])
    opt2 = torch.optim.AdamW(r2.parameters(), lr=1e-3)
    routing.carry_adam_state(opt1, old_views, opt2, r2.views())
    for name, P in (("W_in", W_in), ("b_in", b_in), ("W_out", W_out)):
        st = opt2.state[view_of(r2, P)[0]]
        assert float(st["step"]) == 3
        for k in ("exp_avg", "exp_avg_sq"):
            col = P is W_out
            got, ref = (st[k].t(), old[name][k].t()) if col else (st[k], old[name][k])
            assert torch.equal(got[0], ref[1]) and torch.equal(got[1], ref[2]), (name, k)  # kept
            assert torch.count_nonzero(got[2]) == 0, (name, k)  # neuron 5: new, zero moments
            assert torch.count_nonzero(ref[0]) > 0  # neuron 0 had moments (and is dropped)
    st = opt2.state[view_of(r2, inter1.dense.weight)[0]]["exp_avg"]
    assert torch.count_nonzero(st[0]) > 0 and torch.count_nonzero(st[1]) == 0  # 4 kept, 7 new
    r2.detach()


def test_rerouting_to_the_same_paths_continues_adam_exactly(tiny_mlm):
    # With unchanged paths, detach + attach + carry_adam_state must be invisible: the next step
    # equals the step of a router that was never re-attached (a reset would move every slice by ~lr).
    model, tok = tiny_mlm
    loss_fn = mlm_loss(make_batch(tok))
    paths = random_paths(model)
    twin = copy.deepcopy(model)
    states = []
    for m, reroute in ((model, True), (twin, False)):
        r = routing.Router().attach(m, paths)
        opt = torch.optim.AdamW(r.parameters(), lr=1e-2)
        loss_fn(m).backward()
        opt.step()
        opt.zero_grad()
        if reroute:
            views = r.views()
            r.detach()
            r = routing.Router().attach(m, paths)
            new = torch.optim.AdamW(r.parameters(), lr=1e-2)
            routing.carry_adam_state(opt, views, new, r.views())
            opt = new
        loss_fn(m).backward()
        opt.step()
        r.detach()
        states.append(m.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


# ----------------------------------------------------------------------------- pretrain.Trainer's routing

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_data")


def trainer(model_dir, out, *extra):
    import pretrain
    argv = ["--method", "trelm", "--model", model_dir, "--data", FIX, "--output-dir", str(out), "--batch-size", "4",
            "--seq-len", "32", "--ig-steps", "3", "--route-every", "3", "--max-steps", "8", "--seed", "1", *extra]
    return pretrain.Trainer(pretrain.resolve_config(pretrain.get_parser().parse_args(argv)))


def routing_log(out):
    import json
    return [json.loads(l) for l in open(os.path.join(out, "routing.jsonl"))]


def test_trained_head_routes_from_step_zero(tiny_model_dir, tmp_path, capsys):
    t = trainer(tiny_model_dir, tmp_path)
    assert t.args.route_warmup == 0 and "--route-warmup" not in capsys.readouterr().out
    head_bias = head_decoder(t.net.mlm)[1].detach().clone()
    t.train_step()
    assert t.router is not None  # routed at step 0
    assert torch.equal(head_decoder(t.net.mlm)[1], head_bias)  # the head is frozen from the first step
    log = routing_log(tmp_path)
    assert [r["step"] for r in log] == [0] and "warmup" not in log[0] and log[0]["jaccard_prev"] is None


def test_fresh_head_warmup_is_logged_and_trains_everything(tiny_model_dir, tmp_path, capsys):
    from transformers import BertModel
    from conftest import make_bert_tokenizer, make_model
    tok = make_bert_tokenizer(tmp_path)
    encoder_only = str(tmp_path / "encoder_only")
    BertModel(make_model("bert", tok).config).save_pretrained(encoder_only)
    tok.save_pretrained(encoder_only)
    t = trainer(encoder_only, tmp_path / "run")
    assert t.args.route_warmup == 3
    assert "freshly initialised" in capsys.readouterr().out
    assert routing_log(tmp_path / "run") == [{"step": 0, "warmup": 3, "reason": "fresh MLM head"}]
    for _ in range(3):
        t.train_step()
        assert t.router is None  # full-parameter warm-up
    t.train_step()
    assert t.router is not None
    assert [r.get("step") for r in routing_log(tmp_path / "run")] == [0, 3]


def test_trainer_rerouting_keeps_adam_moments(tiny_model_dir, tmp_path):
    t = trainer(tiny_model_dir, tmp_path, "--route-every", "2")
    for _ in range(2):
        t.train_step()  # routes at 0, one routed step
    moments = {}  # (id(model weight), dim, neuron) -> exp_avg slice before re-routing
    for tensor, param, dim, idx in t.router.views():
        if idx is not None:
            for pos, j in enumerate(idx.tolist()):
                moments[id(param), dim, j] = t.optimizer.state[tensor]["exp_avg"].select(dim, pos).clone()
    t.reroute(t.get_batch(0))
    kept = new = 0
    for tensor, param, dim, idx in t.router.views():
        if idx is None:
            continue
        st = t.optimizer.state[tensor]
        assert float(st["step"]) == 2
        for pos, j in enumerate(idx.tolist()):
            got = st["exp_avg"].select(dim, pos)
            if (id(param), dim, j) in moments:
                assert torch.equal(got, moments[id(param), dim, j])
                kept += 1
            else:
                assert torch.count_nonzero(got) == 0
                new += 1
    assert kept > 0
    log = routing_log(tmp_path)
    assert [r["step"] for r in log] == [0, 2] and 0 <= log[1]["jaccard_prev"] <= 1


@pytest.mark.parametrize("argv,msg", [(["--ig-chunk", "-1"], "--ig-chunk"), (["--ig-memory-mb", "0"], "--ig-memory-mb")])
def test_bad_ig_flags_name_the_flag(argv, msg):
    import pretrain
    with pytest.raises(SystemExit, match=msg):
        pretrain.resolve_config(pretrain.get_parser().parse_args(argv))


def test_path_jaccard_by_hand():
    import pretrain
    a = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([5])]
    b = [torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.long), torch.tensor([6])]
    assert pretrain.path_jaccard(a, b) == pytest.approx((2 / 4 + 1 + 0) / 3)


# ----------------------------------------------------------------------------- bench.py's memory helper

def test_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(2_000_000)  # 8 MB
        b = torch.ones(4_000_000)  # 16 MB, while a is alive
        del a, b
        c = torch.ones(1_000_000)  # 4 MB, after both are freed
        del c
    peak = routing.peak_memory(fn)
    assert 24_000_000 <= peak < 24_100_000


# ----------------------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_paths_identical(tmp_path):
    # Two gloo ranks see different sentences, so their attributions and local paths differ; after
    # the all-reduce of the attributions (as pretrain.Trainer.reroute does, on the compute device)
    # both select the same paths, and after a routed step with all_reduce_grads both models are identical.
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
    assert any(not torch.equal(v, r0["initial"][k]) for k, v in r0["state"].items())


def test_process_group_serves_cpu_and_cuda_tensors():
    # On GPU the group must carry CUDA tensors (attributions, gradients) over nccl and CPU tensors
    # (the memory bank's gathers, --memory-device cpu) over gloo: nccl alone, as before, has no CPU backend.
    import pretrain
    from torch.distributed.distributed_c10d import BackendConfig
    assert BackendConfig(pretrain.process_group_backend(True)).get_device_backend_map() == \
        {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in BackendConfig("nccl").get_device_backend_map()  # what the old code used
    assert BackendConfig(pretrain.process_group_backend(False)).get_device_backend_map()["cpu"] == "gloo"


def test_attributions_live_on_the_model_device(tiny_mlm):
    # reroute all-reduces them where they are: they must be on the compute device (not built on the CPU)
    model, tok = tiny_mlm
    attr = routing.ffn_attributions(model, make_run(make_batch(tok)), steps=2)
    assert attr.device == next(model.parameters()).device and attr.dtype == torch.float32


def _ddp_worker(out_dir):
    import torch.distributed as dist
    import pretrain
    from conftest import make_bert_tokenizer, make_model
    dist.init_process_group(pretrain.process_group_backend(use_cuda=False))
    rank = dist.get_rank()
    tok = make_bert_tokenizer(out_dir)
    model = make_model("bert", tok)  # same seed: identical on both ranks
    initial = copy.deepcopy(model.state_dict())
    batch = make_batch(tok, SENTENCES[rank:rank + 2])  # different data per rank
    attr = routing.ffn_attributions(model, make_run(batch), steps=4)
    local = routing.select_paths(attr, ratio=0.1)
    reduced = attr.clone()
    dist.all_reduce(reduced)
    paths = routing.select_paths(reduced, ratio=0.1)
    router = routing.Router().attach(model, paths)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2)
    mlm_loss(batch)(model).backward()
    router.all_reduce_grads()
    opt.step()
    router.detach()
    torch.save(dict(attr=attr, local_paths=local, paths=paths, reduced=reduced, state=model.state_dict(),
                    initial=initial), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
