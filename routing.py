"""Dynamic Knowledge Routing (TRELM Sec. 3.3, Eq. 9-12).

TRELM asks, for a batch, which FFN neurons carry the knowledge it needs, and trains only their
"knowledge paths" ("we efficiently identify knowledge paths for each batch in parallel", Sec. 3.3):

  1. attribution (Eq. 9-11): how much each FFN intermediate neuron v_i^(l) (post-activation) adds to
     S = sum_x P_x, the summed probability of the correct answer; baseline 0. Four forms (IG_FORMS) and
     two cheap ones for per-batch routing (FORMS: first-order-subset, loss-grad; Attribution):
       layer        Eq. (11) as printed: integrated gradients (IG), one layer scaled at a time, m steps
       joint        IG with all layers scaled together in the same pass (about (L+1)/2 times cheaper)
       target       joint, but only the activations at the positions where P_x is defined (the CKA
                    targets) are scaled; every other position keeps its real value
       first-order  v * dS/dv at alpha = 1 (one Riemann step), on the graph of the training forward
                    that already ran: capture_ffn_acts + first_order_attributions, no extra forward
         Eq. (11):  Attr(v_i^(l)) = (v-bar_i^(l) / m) * sum_{k=1..m} dP_x(k/m * v-bar_i^(l)) / dv_i^(l)
  2. selection: the top route-ratio neurons of each layer (or, as in Dai et al. 2022 "Knowledge
     Neurons", those above threshold * the layer's maximum): select_paths(attr) -> [idx_l]; the
     control: random_paths(L, I, k, seed, step), the same counts drawn at random
  3. selective update (Eq. 12): T_{v_input^(i)} -> T_{v_inter^(j)} -> T_{v_output^(k)}. Router(model,
     scope) patches the FFN Linears with a custom autograd Function whose backward computes weight
     gradients for the selected neurons only (read at backward time: router.set_paths may come after
     the forward), and optim.NeuronAdamW steps only those neurons.

Not a script. pretrain.py --method trelm calls it; per-batch first-order routing, one process or DDP:

    router = Router(mlm, scope)                  # before DDP(...) is built: requires_grad is fixed
    opt = optim.from_adamw(full_adamw, router)   # or optim.NeuronAdamW(router.trainable(), router, lr=...)
    for each step:
        with capture_ffn_acts(mlm) as acts:
            out = model(batch)                   # the training forward (DDP or not)
        attr = first_order_attributions(acts, S) # S = sum P_x of this forward, (L, I)
        dist.all_reduce(attr)                    # DDP: every rank selects the same paths
        router.set_paths(select_paths(attr, ratio))
        loss.backward(); opt.step(); opt.zero_grad()
    router.detach()

The other forms run their own forwards: attr = ffn_attributions(mlm, run, steps=m, form=...) every
route-every steps. With gradient accumulation set the paths once per optimizer step, before the
first backward: every micro-batch's backward and the step read the same paths. bench.py measures it
(measure_routing). Tests: python -m pytest tests/test_routing.py

Paper symbol -> name here:
    P_x              run(model) -> (N,) probability of the correct response for each example
    S                sum_x P_x, the quantity attributed (Eq. 9 summed over the batch)
    m                steps (Riemann steps of the IG integral; --ig-steps, default 20)
    alpha = k/m      alphas (right Riemann sum: k = 1..m, the baseline point alpha=0 is never run)
    v-bar_i^(l)      cache["act"][l][..., i]: the neuron's real post-activation value on the batch
    Attr(v_i^(l))    return value of ffn_attributions / first_order_attributions, (L, I)
    W_in, b_in       intermediate.dense.weight (I, H), .bias (I,): neuron j = row j, entry j
    W_out            output.dense.weight (H, I): neuron j = column j
    knowledge path   router.paths[l]: sorted LongTensor of the selected neurons j of layer l
    route ratio      ratio (--route-ratio, default 0.1), k = round(ratio * I) neurons per layer

Eq. (12) as built: the paper attributes only intermediate neurons (Eq. 9-11 define no score for an
input or output neuron), so a path T_{v_input^(i)} -> T_{v_inter^(j)} -> T_{v_output^(k)} runs
through every input neuron i and every output neuron k of selected j: the trainable weights are
row j of W_in and b_in[j] (all i -> j) and column j of W_out (j -> all k). b_out belongs to no single
j: it is frozen under the scopes that freeze the Transformer blocks, trained under "ffn".

What trains besides the paths is a reading, not a fact of the paper (SCOPES, --route-scope):
    strict  only the paths (optional train_layernorm, train_head_bias). "By selectively updating the
            model parameters based on the gradients of these knowledge paths" (Sec. 3.3); "updating
            only the knowledge paths associated with factual knowledge" (Sec. 6).
    blocks  inside the Transformer blocks only the paths (attention, LayerNorms, b_out frozen); the
            word/position/type embeddings (so the tied decoder) and the MLM head train. "We only need
            to update partial FFN parameters in Transformer blocks" (Fig. 1).
    ffn     only the FFN neurons outside the paths are frozen (their rows of W_in and b_in, their
            columns of W_out); attention, embeddings, LayerNorms, b_out and the MLM head train.
            "We enable partial updates of model parameters, focusing on the FFNs" (Sec. 1).
The first study found that strict stops fact learning (docs/study.md), hence the three.

Decisions (the paper does not say), each with its reason and measurement in docs/departures.md,
"Routing: Eq. 9-12": Eq. 11 per layer made cheap (cached lower layers, alpha steps stacked within
--ig-memory-mb); how the joint, target and first-order forms differ from it; attributions summed over
positions and examples; ranking by the signed attribution; how the selective update saves compute
(frozen parameters get no gradient; the FFN weights keep their full shape); per-neuron Adam state;
identical paths on every DDP rank.
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from common import ffn_modules, head_decoder


# ----------------------------------------------------------------------------- Eq. (9)-(11)

IG_FORMS = ("layer", "joint", "target", "first-order")  # what ffn_attributions computes (module docstring)
FORMS = (*IG_FORMS, "first-order-subset", "loss-grad")  # --ig-form: Attribution
_ACT_BYTES = 4  # fp32 activations (bf16 autocast halves them: the bound is then conservative)


def _tile(obj, c):
    """A module output (tensor, or tuple of tensors / None) repeated c times along dim 0."""
    if c == 1 or obj is None:
        return obj
    if torch.is_tensor(obj):
        return obj.repeat(c, *[1] * (obj.dim() - 1))  # (c*B, ...)
    return type(obj)(_tile(x, c) for x in obj)


def _chunk_for(memory_bytes, tokens, layers, cfg, steps):
    """Alpha steps stacked per forward so that the activations autograd keeps for `layers`
    Transformer layers stay within memory_bytes. Estimate per token and layer (fp32):
    10 H (q, k, v, context, residuals, LayerNorm inputs/outputs) + 2 I (W_in output, activation)
    + heads * T (attention probabilities)."""
    T = tokens[1]
    per_copy = _ACT_BYTES * tokens[0] * T * layers * (10 * cfg.hidden_size + 2 * cfg.intermediate_size
                                                      + cfg.num_attention_heads * T)
    return max(1, min(steps, int(memory_bytes // max(1, per_copy))))


def ffn_attributions(model, run, steps=20, chunk=1, form="layer", memory_mb=1024.0, positions=None):
    """Attribution of S = sum(run(model)) to every FFN intermediate neuron, baseline 0.

    run(model) -> (N,) probabilities P_x on a fixed batch; run(model, c) -> (c*N,) on the batch
    tiled c times (c alpha steps stacked in one forward). Returns float32 (L, I) on the model's
    device, summed over tokens and examples.
      form="layer":       Eq. (11) as printed, layer by layer (exact); the forward of layer l's steps
                          starts at layer l from cached lower-layer outputs (see the module docstring)
      form="joint":       all layers scaled together, m passes (about (L+1)/2 times cheaper, not Eq. 11)
      form="target":      as joint, but only the activations at positions = (rows, cols) (LongTensors
                          indexing the (B, T) batch of run(model): where P_x is defined) are scaled,
                          and the attribution is summed over those positions only
      form="first-order": one forward, v-bar * dS/dv at alpha = 1 (joint with m = 1; steps and chunk
                          do not apply); first_order_attributions does the same on a training forward
    chunk: alpha steps per forward (1: run(model) only, no tiling needed); 0 = as many as fit in
    memory_mb (estimate, _chunk_for).
    """
    if form not in IG_FORMS:
        raise ValueError(f"routing.ffn_attributions: form must be one of {IG_FORMS}, got {form!r}")
    if steps < 1:
        raise ValueError(f"routing.ffn_attributions: steps (--ig-steps) must be >= 1, got {steps}")
    if chunk < 0:
        raise ValueError(f"routing.ffn_attributions: chunk (--ig-chunk) must be 0 (automatic) or >= 1, got {chunk}")
    if memory_mb <= 0:
        raise ValueError(f"routing.ffn_attributions: memory_mb (--ig-memory-mb) must be > 0, got {memory_mb}")
    if (positions is not None) != (form == "target"):
        raise ValueError(f"routing.ffn_attributions: positions=(rows, cols) is required by form='target' and "
                         f"used by no other form; got form={form!r} with positions {'set' if positions else 'None'}")
    if positions is not None and (len(positions) != 2 or positions[0].shape != positions[1].shape
                                  or positions[0].dim() != 1 or positions[0].numel() == 0):
        raise ValueError("routing.ffn_attributions: positions must be (rows, cols), two 1-D LongTensors of the same "
                         f"non-zero length, got shapes {[tuple(p.shape) for p in positions]}")
    layers = list(model.base_model.encoder.layer)
    L, I = len(layers), layers[0].intermediate.dense.out_features
    device = layers[0].intermediate.dense.weight.device
    alphas = torch.arange(1, steps + 1, dtype=torch.float64, device=device) / steps  # Eq. (11): alpha_k = k/m
    attr = torch.zeros(L, I, device=device)  # on the compute device: DDP all-reduces it there
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        if form == "first-order":
            with torch.enable_grad(), capture_ffn_acts(model) as acts:
                S = run(model).sum()
            return first_order_attributions(acts, S)
        cache = _clean_pass(model, run, layers)  # layer outputs, attention outputs, a^(l), all (B, T, .)
        bound = memory_mb * 2 ** 20
        if form in ("joint", "target"):
            c = chunk or _chunk_for(bound, cache["act"][0].shape[:2], L, model.config, steps)
            for s0 in range(0, steps, c):
                attr += _ig_joint(model, run, layers, alphas[s0:s0 + c], positions)
        else:
            for l in range(L):
                c = chunk or _chunk_for(bound, cache["act"][l].shape[:2], L - l, model.config, steps)
                for s0 in range(0, steps, c):
                    attr[l] += _ig_layer(run, model, layers, l, cache, alphas[s0:s0 + c])
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return attr / steps  # Eq. (11): (1/m) sum_k


@torch.no_grad()
def _clean_pass(model, run, layers):
    """One forward of the real batch; keeps each layer's output, each attention block's output and
    each FFN's post-activation a^(l) (the v-bar of Eq. 10)."""
    cache = {"out": [None] * len(layers), "att": [None] * len(layers), "act": [None] * len(layers)}
    handles = []
    for l, layer in enumerate(layers):
        for key, module in (("out", layer), ("att", layer.attention), ("act", layer.intermediate)):
            handles.append(module.register_forward_hook(
                lambda m, i, o, key=key, l=l: cache[key].__setitem__(l, o)))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    if any(a is None for a in cache["act"]):
        raise RuntimeError("routing.ffn_attributions: run(model) must run the model's encoder forward")
    return cache


def _patched(module, fn):
    module.forward = fn  # an instance attribute shadows nn.Module.forward; `del` restores it


def _ig_layer(run, model, layers, l, cache, alphas):
    """Steps alphas of Eq. (11) for layer l in one forward: layers < l and layer l's attention return
    their cached (tiled) outputs, layer l's FFN activation is alpha * a^(l). Returns (I,):
    a^(l) * sum over copies, tokens and examples of dS/dz, z = alpha * a^(l)."""
    c = len(alphas)
    a = cache["act"][l]  # (B, T, I) real post-activation
    B = a.shape[0]
    gates = []

    def check(x):
        if x.shape[0] != c * B:
            raise ValueError(f"routing.ffn_attributions: chunk={c} but the encoder got batch {x.shape[0]}, "
                             f"not {c} x {B}; run(model, {c}) must tile its batch {c} times")

    def cached(key, i):
        def forward(hidden_states, *args, **kwargs):
            check(hidden_states)
            return _tile(cache[key][i], c)
        return forward

    def gate(hidden_states):
        check(hidden_states)
        scale = alphas.float().repeat_interleave(B).view(-1, *[1] * (a.dim() - 1))  # (c*B, 1, 1)
        z = (_tile(a, c) * scale).requires_grad_()  # (c*B, T, I)
        gates.append(z)
        return z

    modules = [*layers[:l], layers[l].attention, layers[l].intermediate]
    for i in range(l):
        _patched(layers[i], cached("out", i))
    _patched(layers[l].attention, cached("att", l))
    _patched(layers[l].intermediate, gate)
    try:
        with torch.enable_grad():
            probs = run(model) if c == 1 else run(model, c)  # (c*N,)
    finally:
        for m in modules:
            del m.forward
    if len(gates) != 1:
        raise RuntimeError(f"routing.ffn_attributions: run(model) must run the model forward exactly "
                           f"once; layer {l}'s FFN ran {len(gates)} times")
    g, = torch.autograd.grad(probs.sum(), gates, allow_unused=True)  # Eq. (11): dP_x/dv at alpha * v-bar
    if g is None:
        return torch.zeros(a.shape[-1], device=a.device)
    g = g.float().view(c, *a.shape).sum(0)  # (B, T, I) summed over the alpha steps
    return (a.float() * g).reshape(-1, a.shape[-1]).sum(0)  # Eq. (11): v-bar * sum_k dP/dv  (I,)


def _ig_joint(model, run, layers, alphas, positions=None):
    """The joint form: every layer's FFN output u scaled by alpha in the same pass (positions=None),
    or only at positions = (rows, cols) of the (B, T) batch (the target form). Returns (L, I): sum
    over copies and scaled positions of u(alpha) * dS/dz, z = alpha * u there, z = u elsewhere."""
    c = len(alphas)
    acts, scaled = [], []

    def hook(module, inputs, u):  # u (c*B, T, I) unscaled post-activation
        if u.shape[0] % c:
            raise ValueError(f"routing.ffn_attributions: chunk={c} but the FFN input has batch "
                             f"{u.shape[0]}; run(model, {c}) must tile its batch {c} times")
        B, T = u.shape[0] // c, u.shape[1]
        scale = alphas.to(u.dtype).repeat_interleave(B).view(-1, 1, 1)  # (c*B, 1, 1)
        if positions is None:
            acts.append(u.detach())
        else:
            target = _tile(_target_mask(positions, B, T, u.device), c)[..., None]  # (c*B, T, 1)
            scale = torch.where(target, scale, 1.0)  # (c*B, T, 1): alpha at the targets, 1 elsewhere
            acts.append(u.detach() * target)  # only the scaled positions are attributed
        z = u * scale  # (c*B, T, I)
        if not z.requires_grad:  # first hooked layer: nothing before it requires grad
            z.requires_grad_()
        scaled.append(z)
        return z

    handles = [layer.intermediate.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            probs = run(model) if c == 1 else run(model, c)  # (c*N,)
    finally:
        for h in handles:
            h.remove()
    if len(scaled) != len(layers):
        raise RuntimeError(f"routing.ffn_attributions: run(model) must run the model forward exactly "
                           f"once; the FFN hooks fired {len(scaled)} times for {len(layers)} layers")
    grads = torch.autograd.grad(probs.sum(), scaled, allow_unused=True)  # dS/dz
    return torch.stack([torch.zeros(u.shape[-1], device=u.device) if g is None else
                        (u.float() * g.float()).reshape(-1, u.shape[-1]).sum(0) for u, g in zip(acts, grads)])


def _target_mask(positions, B, T, device):
    """(B, T) bool, True at positions = (rows, cols)."""
    rows, cols = (p.to(device) for p in positions)
    if rows.min() < 0 or rows.max() >= B or cols.min() < 0 or cols.max() >= T:
        raise ValueError(f"routing.ffn_attributions: positions must index the ({B}, {T}) batch of run(model), got "
                         f"rows in [{int(rows.min())}, {int(rows.max())}], cols in [{int(cols.min())}, {int(cols.max())}]")
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[rows, cols] = True
    return mask


@contextlib.contextmanager
def capture_ffn_acts(model):
    """with capture_ffn_acts(model) as acts: model(...) -> acts[l] = the FFN post-activation v^(l)
    (B, T, I) of layer l in that forward, a graph tensor (first_order_attributions differentiates S
    with respect to it). Exactly one forward per block; the hooks are removed on exit."""
    layers = model.base_model.encoder.layer
    acts = [None] * len(layers)

    def hook(l):
        def fn(module, inputs, u):
            if acts[l] is not None:
                raise RuntimeError(f"routing.capture_ffn_acts: layer {l}'s FFN ran twice; run one forward per block")
            if not u.requires_grad and torch.is_grad_enabled():  # everything below is frozen: u is a leaf
                u.requires_grad_()
            acts[l] = u
        return fn

    handles = [layer.intermediate.register_forward_hook(hook(l)) for l, layer in enumerate(layers)]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def first_order_attributions(acts, S):
    """Eq. (11) with one Riemann step at alpha = 1: Attr(v_i^(l)) = sum over tokens of v * dS/dv.
    acts: the L post-activations capture_ffn_acts collected; S: scalar, sum_x P_x of the same forward.
    Only dS/dacts is computed (autograd.grad with inputs=acts: no weight gradient, no .grad written)
    and the graph is retained for the training backward. Returns float32 (L, I) on the acts' device."""
    if not acts or any(a is None for a in acts):
        raise RuntimeError("routing.first_order_attributions: acts has an empty layer; run the model's forward "
                           "inside `with capture_ffn_acts(model) as acts:`")
    if not S.requires_grad or not all(a.requires_grad for a in acts):
        raise RuntimeError("routing.first_order_attributions: S and acts must be graph tensors; the forward ran "
                           "under torch.no_grad or with nothing requiring grad")
    grads = torch.autograd.grad(S, acts, retain_graph=True, allow_unused=True)  # dS/dv per layer, (B, T, I)
    return torch.stack([torch.zeros(a.shape[-1], device=a.device) if g is None else
                        (a.detach().float() * g.float()).reshape(-1, a.shape[-1]).sum(0) for a, g in zip(acts, grads)])


class Attribution:
    """Eq. (9)-(11) under one form (FORMS, --ig-form): the one entry pretrain.py attributes through.

        attribution = Attribution(form, steps=m, chunk=0, memory_mb=1024)
        with attribution.watch(mlm) as acts:          # around the training forward
            out = net(batch, ...)                     # out["hidden"]: its last hidden states
        attr = attribution(mlm, px, {"acts": acts, "hidden": out["hidden"]})   # (L, I)

    px: P_x of the batch (pretrain.py: model.KnowledgeProb): px.of_forward(hidden) on the training forward,
    px(mlm, c) with a forward of its own on its sequences tiled c times, px.positions() where P_x is
    defined. The first-order form reads the training forward (watch captures its FFN activations,
    first_order_attributions); first-order-subset is the same on a forward of its own over px's
    sequences (--ig-batch: the cost shrinks with them); the integrated-gradient forms run passes of their
    own (ffn_attributions). loss-grad attributes inside the training backward itself (in_backward:
    Router.arm), to the training loss L rather than P_x: -(v . dL/dv) summed over tokens, read from the
    gradient the backward forms anyway, before each layer's weight gradients, so it costs no pass."""

    def __init__(self, form, steps=20, chunk=0, memory_mb=1024.0):
        if form not in FORMS:
            raise ValueError(f"routing.Attribution: form (--ig-form) must be one of {FORMS}, got {form!r}")
        self.form, self.steps, self.chunk, self.memory_mb = form, steps, chunk, memory_mb
        self.in_backward = form == "loss-grad"

    def watch(self, mlm):
        """Context manager around the training forward -> the FFN activations it captures (capture_ffn_acts)
        when this form reads the forward, else None."""
        return capture_ffn_acts(mlm) if self.form == "first-order" else contextlib.nullcontext()

    def __call__(self, mlm, px, forward=None):
        """(L, I) float32 attributions on mlm's device. forward: {"acts", "hidden"} of a watched training
        forward, or None."""
        if self.in_backward:
            raise RuntimeError("routing.Attribution: --ig-form loss-grad attributes inside the backward (Router.arm)")
        if forward is not None and forward.get("acts") is not None:
            return first_order_attributions(forward["acts"], px.of_forward(forward["hidden"]).sum())
        form = "first-order" if self.form == "first-order-subset" else self.form
        return ffn_attributions(mlm, px, steps=self.steps, chunk=self.chunk, form=form, memory_mb=self.memory_mb,
                                positions=px.positions() if form == "target" else None)


def path_jaccard(a, b):
    """Mean over layers of |a_l & b_l| / |a_l | b_l| (path stability between two routings; 1 for two
    empty paths)."""
    scores = []
    for x, y in zip(a, b):
        x, y = set(x.tolist()), set(y.tolist())
        scores.append(len(x & y) / len(x | y) if x | y else 1.0)
    return sum(scores) / len(scores)


def select_paths(attr, ratio=0.1, threshold=None):
    """Knowledge neurons per layer from attributions (L, I): the top round(ratio * I) (at least 1)
    or, with threshold, those with attr >= threshold * max of the layer (none if max <= 0).
    Returns a list of L sorted LongTensors."""
    if attr.dim() != 2:
        raise ValueError(f"routing.select_paths: attr must be (L, I), got shape {tuple(attr.shape)}")
    if threshold is None:
        if not 0 < ratio <= 1:
            raise ValueError(f"routing.select_paths: ratio (--route-ratio) must be in (0, 1], got {ratio}")
        k = max(1, round(ratio * attr.shape[1]))
        return [torch.topk(a, k).indices.sort().values for a in attr]
    if not 0 < threshold <= 1:
        raise ValueError(f"routing.select_paths: threshold must be in (0, 1], got {threshold}")
    return [torch.nonzero((a >= threshold * a.max()) & (a > 0)).flatten() for a in attr]


def random_paths(L, I, k, seed, step):
    """The random-selection control: k neurons per layer (an int, or a list of L ints, e.g. the
    counts select_paths chose) drawn uniformly without replacement. A function of (seed, step)
    only (numpy SeedSequence -> torch.Generator): the same on every DDP rank and after --resume,
    with no state to save. Returns a list of L sorted LongTensors (CPU)."""
    ks = [k] * L if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != L or any(not 0 <= x <= I for x in ks):
        raise ValueError(f"routing.random_paths: k must be an int or {L} ints in [0, {I}], got {k}")
    if seed < 0 or step < 0:
        raise ValueError(f"routing.random_paths: seed (--seed) and step must be >= 0, got {seed}, {step}")
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return [torch.randperm(I, generator=g)[:x].sort().values for x in ks]


# ----------------------------------------------------------------------------- Eq. (12)

SCOPES = ("strict", "blocks", "ffn")  # module docstring: what trains besides the paths


def _engine_needs(ctx, i):
    """True when this backward must produce the gradient of input i: it requires grad and the
    running graph task uses it (autograd.grad(S, acts) needs no weight gradient)."""
    return ctx.needs_input_grad[i] and torch._C._will_engine_execute_node(ctx.next_functions[i][0])


class _SliceLinear(torch.autograd.Function):
    """y = x W^T + b with the model's full W and b (the forward does not depend on the paths).
    Backward: the full input gradient, and the weight gradient of the selected neurons only,
    full-shaped and zero elsewhere. rows=True: W_in (I, H), rows idx, and b_in[idx]. rows=False:
    W_out (H, I), columns idx; b_out (when it trains) gets its full gradient, it belongs to no
    neuron. idx = router.paths[layer], read when the backward runs."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, router, layer, rows):
        ctx.router, ctx.layer, ctx.rows = router, layer, rows
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # gy (..., out)
        x, weight = ctx.saved_tensors
        # matmuls in gy's dtype: under autocast that is the dtype F.linear ran in (bf16), else a no-op
        gx = gy.matmul(weight.to(gy.dtype)) if ctx.needs_input_grad[0] else None  # (..., in)
        if not ctx.rows and ctx.router.armed is not None:  # loss-grad: this layer's paths from v . dL/dv
            ctx.router.select(ctx.layer, x, gx)
        need_w = _engine_needs(ctx, 1)
        need_b = ctx.needs_input_grad[2] and _engine_needs(ctx, 2)
        gw = gb = None
        if need_w or need_b:
            idx = ctx.router.paths_of(ctx.layer)  # (k,)
            gy2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            if ctx.rows:  # W_in, b_in: neuron j = row j
                gys = gy2.index_select(1, idx)  # (N, k)
                if need_w:
                    gwk = gys.t().matmul(x2.to(gy.dtype))  # (k, H)
                    gw = weight.new_zeros(weight.shape).index_copy_(0, idx, gwk.to(weight.dtype))
                if need_b:
                    gb = weight.new_zeros(weight.shape[0]).index_copy_(0, idx, gys.sum(0).to(weight.dtype))
            else:  # W_out: neuron j = column j
                if need_w:
                    gwk = gy2.t().matmul(x2.index_select(1, idx).to(gy.dtype))  # (H, k)
                    gw = weight.new_zeros(weight.shape).index_copy_(1, idx, gwk.to(weight.dtype))
                if need_b:
                    gb = gy2.sum(0).to(weight.dtype)  # (H,)
        return gx, gw, gb, None, None, None


class Router:
    """Selective update of knowledge paths (Eq. 12) under a scope (SCOPES, module docstring).

        router = Router(model, scope)        # requires_grad per scope, FFN Linears patched
        router.set_paths(paths)              # any time before the backward that should use them
        opt = optim.NeuronAdamW(router.trainable(), router, lr=...)
        ... loss.backward(); opt.step() ...
        router.detach()                      # original forwards and requires_grad flags back

    train_layernorm: every LayerNorm also trains (strict, blocks); train_head_bias: the MLM-head
    bias also trains (strict). The set of trainable parameters is fixed from Router(...) to
    detach(): build a DDP wrapper after Router(...). The weights stay the model's own Parameters,
    so state_dict, save_pretrained and checkpoints need nothing from the router.
    """

    def __init__(self, model, scope, train_layernorm=False, train_head_bias=False):
        if scope not in SCOPES:
            raise ValueError(f"routing.Router: scope (--route-scope) must be one of {SCOPES}, got {scope!r}")
        ffns = ffn_modules(model)
        if any("forward" in vars(m.dense) for pair in ffns for m in pair):
            raise RuntimeError("routing.Router: the model's FFN Linears are already patched; detach() the other "
                               "Router first")
        self.model, self.scope, self.paths, self.armed = model, scope, None, None
        self.sizes = [inter.dense.out_features for inter, _ in ffns]  # I per layer
        self._neuron = {}  # id(FFN parameter) -> (neuron dim, layer)
        for l, (inter, out) in enumerate(ffns):
            self._neuron[id(inter.dense.weight)] = (0, l)  # W_in (I, H): rows
            if inter.dense.bias is not None:
                self._neuron[id(inter.dense.bias)] = (0, l)  # b_in (I,)
            self._neuron[id(out.dense.weight)] = (1, l)  # W_out (H, I): columns
        in_blocks = {id(p) for p in model.base_model.encoder.layer.parameters()}
        norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
        head_bias = head_decoder(model)[1]

        def trains(p):
            if id(p) in self._neuron or scope == "ffn":
                return True
            if train_layernorm and id(p) in norms:
                return True
            if scope == "blocks":
                return id(p) not in in_blocks  # embeddings (and the tied decoder), MLM head
            return train_head_bias and p is head_bias  # strict

        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._trainable = [p for p in model.parameters() if trains(p)]
        for p in model.parameters():
            p.requires_grad_(trains(p))
        self._linears = []
        for l, (inter, out) in enumerate(ffns):
            for linear, rows in ((inter.dense, True), (out.dense, False)):
                # an instance attribute shadows nn.Linear.forward: module names and state_dict keys unchanged
                linear.forward = (lambda x, linear=linear, l=l, rows=rows:
                                  _SliceLinear.apply(x, linear.weight, linear.bias, self, l, rows))
                self._linears.append(linear)

    def set_paths(self, paths):
        """The knowledge paths from now on: a list of L LongTensors of distinct neuron indices (one
        per layer; empty: that layer's FFN weights get zero gradient). Read by the next backward
        and optimizer step; may be called between a forward and its backward."""
        if self.model is None:
            raise RuntimeError("routing.Router.set_paths: the router is detached")
        if len(paths) != len(self.sizes):
            raise ValueError(f"routing.Router.set_paths: {len(paths)} paths for a model with {len(self.sizes)} layers")
        device = ffn_modules(self.model)[0][0].dense.weight.device
        paths = [torch.as_tensor(idx) for idx in paths]
        checked, ok = [], []
        for idx, I in zip(paths, self.sizes):
            if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool)):
                ok.append(torch.zeros((), dtype=torch.bool, device=device))
                checked.append(None)
                continue
            idx = idx.to(device=device, dtype=torch.long)
            s = idx.sort().values  # distinct and in range, checked on the device
            ok.append(torch.ones((), dtype=torch.bool, device=device) if not idx.numel() else
                      (s[0] >= 0) & (s[-1] < I) & (s[1:] > s[:-1]).all())
            checked.append(idx)
        bad = [l for l, good in enumerate(torch.stack(ok).tolist()) if not good]  # one device sync per call
        if bad:
            l = bad[0]
            raise ValueError(f"routing.Router.set_paths: path of layer {l} must be a 1-D tensor of distinct "
                             f"neuron indices in [0, {self.sizes[l]}), got {paths[l].tolist()}")
        self.paths = checked

    def arm(self, k, reduce=None):
        """The next backward chooses the paths itself (--ig-form loss-grad): at each layer's W_out, before
        that layer's weight gradients are formed, the k neurons with the largest -(v . dL/dv) summed over
        tokens (v the FFN activation, L the training loss). reduce(scores) (I,), in place: e.g. a DDP
        all-reduce, so every rank selects the same neurons."""
        self.armed = (k, reduce)
        self.paths = [None] * len(self.sizes)

    def select(self, layer, v, grad_v):
        """Inside the backward: layer's paths from its activation v and dL/dv (both (..., I))."""
        k, reduce = self.armed
        scores = -(v.float() * grad_v.float()).reshape(-1, v.shape[-1]).sum(0)  # (I,) first-order, of L
        if reduce is not None:
            reduce(scores)
        self.paths[layer] = torch.topk(scores, k).indices.sort().values
        if all(p is not None for p in self.paths):
            self.armed = None

    def paths_of(self, layer):
        """The selected neurons of layer `layer` (LongTensor on the model's device)."""
        if self.paths is None:
            raise RuntimeError("routing.Router: no knowledge paths; call router.set_paths(paths) before the backward "
                               "and the optimizer step")
        return self.paths[layer]

    def trainable(self):
        """The parameters that train under the scope, in model order (the FFN weights included)."""
        return list(self._trainable)

    def neuron_dim(self, p):
        """The neuron axis of parameter p (0 for W_in and b_in, 1 for W_out), None for any other."""
        hit = self._neuron.get(id(p))
        return None if hit is None else hit[0]

    def selected(self, p):
        """The neurons of FFN parameter p that train now (indices along neuron_dim(p))."""
        return self.paths_of(self._neuron[id(p)][1])

    def detach(self):
        """Restore the Linear forwards and every requires_grad flag."""
        if self.model is None:
            raise RuntimeError("routing.Router.detach: already detached")
        for linear in self._linears:
            del linear.forward  # back to nn.Linear.forward
        for p, f in self._flags:
            p.requires_grad_(f)
        self.model, self.paths, self._linears, self._flags = None, None, [], []
