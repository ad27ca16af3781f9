"""Dynamic Knowledge Routing (TRELM Sec. 3.3, Eq. 9-12).

Every route-every steps TRELM asks which FFN neurons carry the knowledge the current batch needs,
and then trains only their "knowledge paths" until the next routing:

  1. attribution (Eq. 9-11): integrated gradients (IG) of the summed probability of the correct
     answer, S = sum_x P_x, with respect to the post-activation value v of every FFN intermediate
     neuron, baseline 0:  ffn_attributions(model, run, steps=m)  -> (L, I)
         Eq. (11):  Attr(v_i^(l)) = (v-bar_i^(l) / m) * sum_{k=1..m} dP_x(k/m * v-bar_i^(l)) / dv_i^(l)
  2. selection: the top route-ratio neurons of each layer (or, as in Dai et al. 2022 "Knowledge
     Neurons", those above threshold * the layer's maximum):  select_paths(attr) -> [idx_l]
  3. selective update (Eq. 12):  T_{v_input^(i)} -> T_{v_inter^(j)} -> T_{v_output^(k)}.
     Router.attach(model, paths) freezes everything else and replaces the two FFN Linear forwards
     by a custom autograd Function that computes weight gradients for the selected slices only, so
     the backward pass really skips the frozen weight gradients and the optimizer holds state for
     the slices only. carry_adam_state keeps the Adam moments of slices that stay selected.

Not a script. pretrain.py --method trelm calls it: per routing period router.detach(); attr =
ffn_attributions(...) (all-reduced over DDP ranks on the compute device); paths =
select_paths(attr, ratio); router.attach(model, paths); a new AdamW over router.parameters() whose
state carry_adam_state fills. bench.py measures it (measure_routing). Tests:
    python -m pytest tests/test_routing.py

Paper symbol -> name here:
    P_x              run(model) -> (N,) probability of the correct response for each example
    m                steps (Riemann steps of the IG integral; --ig-steps, default 20)
    alpha = k/m      alphas (right Riemann sum: k = 1..m, the baseline point alpha=0 is never run)
    v-bar_i^(l)      cache["act"][l][..., i]: the neuron's real post-activation value on the batch
    Attr(v_i^(l))    return value of ffn_attributions, one number per (layer, neuron)
    W_in, b_in       intermediate.dense.weight (I, H), .bias (I,)  -> slices w_in (k, H), b_in (k,)
    W_out            output.dense.weight (H, I)                    -> slice w_out (H, k)
    route ratio      ratio (--route-ratio, default 0.1), k = round(ratio * I) neurons per layer

Eq. (12) as built: the paper attributes only intermediate neurons (Eq. 9-11 define no score for an
input or output neuron), so a path T_{v_input^(i)} -> T_{v_inter^(j)} -> T_{v_output^(k)} runs
through every input neuron i and every output neuron k of selected j: the trainable weights are
row j of W_in and b_in[j] (all i -> j) and column j of W_out (j -> all k). Nothing else of the FFN
moves (b_out belongs to no single j); tests/test_routing.py checks exactly which entries move.

Decisions (the paper does not say):
- Eq. (11) per layer is the default (form="layer"): for layer l only v^(l) is scaled and the layers
  above see the consequences, exactly as printed, L * m gradient evaluations. It is made cheap:
  (a) one clean forward caches every layer's output, attention output and v-bar; the steps of
  layer l then start at layer l: layers < l and layer l's attention return their cached outputs
  (tiled over the stacked alpha copies; instance `forward` attributes, removed afterwards), layer
  l's intermediate returns alpha * v-bar, so the forward runs L - l FFN-out + (L - l - 1) full
  layers and the backward stops at layer l; (b) the alpha steps of a layer are stacked along the
  batch, as many as the memory bound allows (chunk=0: _chunk_for's activation estimate against
  memory_mb, --ig-memory-mb; more copies for the upper layers, whose forward is shorter).
  Total cost is about m * (L+1)/2 layer passes instead of m * L * L. Every layer is attributed:
  routing trains the FFN of every layer (a layer with an empty path stays frozen, but which layers
  those are is only known after attribution).
- form="joint" (--ig-form joint) scales all L layers in the same pass (m passes, about (L+1)/2
  times cheaper). A later layer's unscaled activation u(alpha) then depends on alpha, and the
  attribution is Attr_j = (1/m) sum_k u_j(alpha_k) * dS/dz_j(alpha_k) (z = alpha * u), the IG of
  the gates; not Eq. 11. bench.py reports how often it picks the same neurons
  (ig_topk_jaccard_vs_exact). Both forms satisfy completeness: the attributions of the scaled
  neurons sum to S(real) - S(scaled neurons zeroed), up to the O(1/m) Riemann error (tests).
- Attributions are summed over every token position and example of the batch (padding gets 0
  gradient); the model runs in eval mode (no dropout) during attribution; parameters are frozen
  meanwhile so no weight gradient is computed and no .grad accumulates. The result lives on the
  model's device (float32): a DDP all-reduce under nccl needs it there.
- run(model, c) for c > 1 must run the batch tiled c times along dim 0 and return the
  probabilities of all c copies (pretrain.py tiles its batch and injection plan); a run that does
  not tile is caught (the encoder's batch is checked against c * B).
- select_paths ranks by the signed attribution (neurons that raise P_x); threshold mode keeps
  attr >= threshold * max(attr of the layer) and selects nothing in a layer whose max is <= 0.
- How the selective update saves compute: frozen tensors have requires_grad False, so autograd
  computes no gradient for attention or embedding weights (and none at all below the lowest
  trainable tensor); the patched FFN Linears (an instance `forward` attribute, so module names and
  state_dict keys do not change) run the full matmul forward with the frozen weight, into which
  the trainable slices are copied before every forward (k rows/columns), and their backward
  computes grad_x in full plus weight gradients of the k selected rows/columns only.
- Frozen while routed: attention, embeddings (and the tied decoder), the FFN output bias b_out
  (not part of any neuron's path), the MLM-head transform. LayerNorms and the MLM-head bias may
  train (train_layernorm, train_head_bias).
- Adam state when paths change (carry_adam_state): the moments of slices that stay selected are
  kept, new slices start at zero moments with the old step count (per-tensor in torch's AdamW).
  Resetting everything instead made the first routed step move every selected weight by about lr
  (Adam's bias-corrected first step); the first routing after the full-parameter warm-up carries
  the full optimizer's moments of the selected rows/columns.
- DDP: ranks see different batches; pretrain.py all-reduces the attributions (on the compute
  device) so every rank selects the same paths. In a routed period forward/backward run on the
  unwrapped module and router.all_reduce_grads() averages the slices' gradients before
  optimizer.step() (a DDP wrapper built over the full model would wait for gradients of the frozen
  parameters).
- peak_memory (bench.py) is the peak of live tensor bytes from the torch profiler's memory events
  on CPU (tracemalloc does not see torch's allocations; ru_maxrss only grows, so consecutive
  measurements in one process cannot be separated), torch.cuda.max_memory_allocated on GPU.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import ffn_modules, head_decoder


# ----------------------------------------------------------------------------- Eq. (9)-(11)

FORMS = ("layer", "joint")
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


def ffn_attributions(model, run, steps=20, chunk=1, form="layer", memory_mb=1024.0):
    """Integrated gradients of S = sum(run(model)) w.r.t. every FFN intermediate neuron, baseline 0.

    run(model) -> (N,) probabilities P_x on a fixed batch; run(model, c) -> (c*N,) on the batch
    tiled c times (c alpha steps stacked in one forward). Returns float32 (L, I) on the model's
    device, summed over tokens and examples.
      form="layer": Eq. (11) as printed, layer by layer (exact); the forward of layer l's steps starts
                    at layer l from cached lower-layer outputs (see the module docstring)
      form="joint": all layers scaled together, m passes (about (L+1)/2 times cheaper, not Eq. 11)
    chunk: alpha steps per forward (1: run(model) only, no tiling needed); 0 = as many as fit in
    memory_mb (estimate, _chunk_for).
    """
    if form not in FORMS:
        raise ValueError(f"routing.ffn_attributions: form (--ig-form) must be one of {FORMS}, got {form!r}")
    if steps < 1:
        raise ValueError(f"routing.ffn_attributions: steps (--ig-steps) must be >= 1, got {steps}")
    if chunk < 0:
        raise ValueError(f"routing.ffn_attributions: chunk (--ig-chunk) must be 0 (automatic) or >= 1, got {chunk}")
    if memory_mb <= 0:
        raise ValueError(f"routing.ffn_attributions: memory_mb (--ig-memory-mb) must be > 0, got {memory_mb}")
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
        cache = _clean_pass(model, run, layers)  # layer outputs, attention outputs, a^(l), all (B, T, .)
        bound = memory_mb * 2 ** 20
        if form == "joint":
            c = chunk or _chunk_for(bound, cache["act"][0].shape[:2], L, model.config, steps)
            for s0 in range(0, steps, c):
                attr += _ig_joint(model, run, layers, alphas[s0:s0 + c])
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


def _ig_joint(model, run, layers, alphas):
    """The joint form: every layer's FFN output u scaled by alpha in the same pass. Returns (L, I):
    sum over copies, examples and tokens of u(alpha) * dS/dz, z = alpha * u."""
    c = len(alphas)
    acts, scaled = [], []

    def hook(module, inputs, u):  # u (c*B, T, I) unscaled post-activation
        if u.shape[0] % c:
            raise ValueError(f"routing.ffn_attributions: chunk={c} but the FFN input has batch "
                             f"{u.shape[0]}; run(model, {c}) must tile its batch {c} times")
        scale = alphas.to(u.dtype).repeat_interleave(u.shape[0] // c)  # (c*B,)
        z = u * scale.view(-1, *[1] * (u.dim() - 1))  # (c*B, T, I)
        if not z.requires_grad:  # first hooked layer: nothing before it requires grad
            z.requires_grad_()
        acts.append(u.detach())
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


# ----------------------------------------------------------------------------- Eq. (12)

class _SliceLinear(torch.autograd.Function):
    """y = x W^T + b with W, b frozen full tensors (their selected slices already hold the values of
    the trainable slices). Backward: the full input gradient, and weight gradients for the
    selected slice only. rows=True: slice = rows idx of W (and b[idx]): W_in of the FFN.
    rows=False: slice = columns idx of W: W_out (b is then not part of the slice)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, w_sel, b_sel, idx, rows):
        ctx.rows, ctx.has_bias = rows, b_sel is not None
        # W_out's gradient only needs x[..., idx]: keep (.., k) instead of (.., I) alive
        ctx.save_for_backward(x if rows else x.index_select(-1, idx), weight, idx)
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):  # gy (..., out)
        xs, weight, idx = ctx.saved_tensors
        gx = gy.matmul(weight) if ctx.needs_input_grad[0] else None  # (..., in)
        gy2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
        xs2 = xs.reshape(-1, xs.shape[-1])  # (N, in) or (N, k)
        gb = None
        if ctx.rows:
            gys = gy2.index_select(1, idx)  # (N, k)
            gw = gys.t().matmul(xs2)  # (k, in)
            if ctx.has_bias:
                gb = gys.sum(0)  # (k,)
        else:
            gw = gy2.t().matmul(xs2)  # (out, k)
        return gx, None, None, gw, gb, None, None


class _SlicePatch:
    """One FFN Linear whose slice (rows or columns idx) trains as the Parameter w_sel (and b_sel).

    Every forward first copies the slices into the frozen full weight (k rows or columns: cheap).
    The copy goes through .data, so it does not bump the weight's autograd version counter: an
    extra forward (evaluation, a no_grad pass) between a forward and its backward writes the same
    values and is harmless. Changing the slices between a forward and its backward (an optimizer
    step before backward) is not detected, exactly as autograd could not tell either way.
    The optimizer's version counter cannot be used to skip the copy: fused AdamW does not bump it.
    """

    def __init__(self, linear, w_sel, b_sel, idx, rows):
        self.linear, self.w_sel, self.b_sel, self.idx, self.rows = linear, w_sel, b_sel, idx, rows

    def sync(self):
        """Write the trainable slices into the frozen full weight (and bias)."""
        self.linear.weight.data.index_copy_(0 if self.rows else 1, self.idx, self.w_sel.detach())
        if self.b_sel is not None:
            self.linear.bias.data.index_copy_(0, self.idx, self.b_sel.detach())

    def forward(self, x):
        self.sync()
        return _SliceLinear.apply(x, self.linear.weight, self.linear.bias, self.w_sel, self.b_sel,
                                  self.idx, self.rows)


class Router:
    """Selective update of knowledge paths (Eq. 12).

        router = Router()
        router.attach(model, paths)              # only the path slices train from here on
        opt = torch.optim.AdamW(router.parameters(), lr=...)
        ... loss.backward(); router.all_reduce_grads(); opt.step() ...
        router.detach()                          # full weights updated, everything trainable again

    router.parameters() order: per layer with a non-empty path, w_in (k, H), b_in (k,), w_out
    (H, k); then the LayerNorm parameters in model order (train_layernorm); then the MLM-head bias
    (train_head_bias). The model's state_dict keeps its keys while attached: a state_dict pre-hook
    on each patched Linear writes the slices into the full weights first (sync_to_model does the
    same by hand). Load checkpoints into the model before attach, not while attached.
    """

    def __init__(self):
        self.model, self.paths = None, None
        self._patched, self._params, self._flags, self._hooks, self._views = [], [], [], [], []

    def attach(self, model, paths, train_layernorm=False, train_head_bias=False):
        if self.model is not None:
            raise RuntimeError("routing.Router.attach: already attached; call detach() first")
        ffns = ffn_modules(model)
        if len(paths) != len(ffns):
            raise ValueError(f"routing.Router.attach: {len(paths)} paths for a model with {len(ffns)} layers")
        paths = [p.detach().cpu().long() for p in paths]
        for l, ((inter, _), idx) in enumerate(zip(ffns, paths)):
            I = inter.dense.out_features
            if idx.numel() and (idx.min() < 0 or idx.max() >= I or idx.unique().numel() != idx.numel()):
                raise ValueError(f"routing.Router.attach: path of layer {l} must hold distinct "
                                 f"neuron indices in [0, {I}), got {idx.tolist()}")
        all_params = list(model.parameters())
        self._flags = [(p, p.requires_grad) for p in all_params]
        for p in all_params:
            p.requires_grad_(False)
        self.model, self.paths = model, paths
        for (inter, out), idx in zip(ffns, paths):
            if idx.numel() == 0:
                continue  # no neuron selected: this layer's FFN stays frozen
            idx = idx.to(inter.dense.weight.device)
            w_in = torch.nn.Parameter(inter.dense.weight.detach()[idx].clone())  # (k, H)
            b_in = (torch.nn.Parameter(inter.dense.bias.detach()[idx].clone())  # (k,)
                    if inter.dense.bias is not None else None)
            w_out = torch.nn.Parameter(out.dense.weight.detach()[:, idx].clone())  # (H, k)
            self._patch(inter.dense, w_in, b_in, idx, rows=True)
            self._patch(out.dense, w_out, None, idx, rows=False)
            self._params += [p for p in (w_in, b_in, w_out) if p is not None]
            self._views += [(w_in, inter.dense.weight, 0, idx), (w_out, out.dense.weight, 1, idx)]
            if b_in is not None:
                self._views.append((b_in, inter.dense.bias, 0, idx))
        extra = []
        if train_layernorm:
            extra += [p for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
        if train_head_bias:
            extra.append(head_decoder(model)[1])
        for p in dict.fromkeys(extra):  # the head bias may also be reachable twice (tied)
            p.requires_grad_(True)
            self._params.append(p)
            self._views.append((p, p, None, None))
        return self

    def _patch(self, linear, w_sel, b_sel, idx, rows):
        patch = _SlicePatch(linear, w_sel, b_sel, idx, rows)
        linear.forward = patch.forward  # an instance attribute: state_dict names are unchanged
        self._hooks.append(linear.register_state_dict_pre_hook(lambda module, prefix, keep_vars: patch.sync()))
        self._patched.append(patch)

    def parameters(self):
        """The trainable parameters only (slices, then optional LayerNorms and head bias)."""
        return list(self._params)

    def views(self):
        """[(trainable tensor, model parameter it is a slice of, dim, idx)] for carry_adam_state;
        dim and idx are None for a whole parameter (LayerNorm, head bias)."""
        return list(self._views)

    def sync_to_model(self):
        """Write the trained slices into the model's full FFN weights."""
        for patch in self._patched:
            patch.sync()

    def all_reduce_grads(self):
        """Average the gradients of router.parameters() over DDP ranks (no-op without DDP)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for p in self._params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def detach(self):
        """Sync the slices back, restore the Linear forwards and every requires_grad flag."""
        if self.model is None:
            raise RuntimeError("routing.Router.detach: not attached")
        self.sync_to_model()
        for patch in self._patched:
            del patch.linear.forward  # back to nn.Linear.forward
        for h in self._hooks:
            h.remove()
        for p, f in self._flags:
            p.requires_grad_(f)
        self.__init__()


def carry_adam_state(old_opt, old_views, new_opt, new_views):
    """Adam state across a re-routing: a neuron's slice that stays selected keeps its moments
    (exp_avg, exp_avg_sq), a newly selected one starts from zero moments; every new tensor takes the
    step count of the parameter it is cut from (so kept slices continue exactly; bias correction of
    new slices is that of the old step, i.e. about 1 after warm-up). views: [(tensor, model
    parameter, dim, idx)] as Router.views(); full-parameter training is [(p, p, None, None)].
    A parameter without state in old_opt (never stepped, or frozen before) gets none: Adam starts it."""
    full = {}  # id(model parameter) -> (exp_avg, exp_avg_sq, step), model-parameter shaped
    for t, param, dim, idx in old_views:
        st = old_opt.state.get(t)
        if not st:
            continue
        if idx is None:
            full[id(param)] = (st["exp_avg"], st["exp_avg_sq"], st["step"])
            continue
        m, v, _ = full.setdefault(id(param), (torch.zeros_like(param), torch.zeros_like(param), st["step"]))
        m.index_copy_(dim, idx, st["exp_avg"])  # (I, H) rows or (H, I) columns idx
        v.index_copy_(dim, idx, st["exp_avg_sq"])
    for t, param, dim, idx in new_views:
        if id(param) not in full:
            continue
        m, v, step = full[id(param)]
        cut = (lambda x: x.clone()) if idx is None else (lambda x: x.index_select(dim, idx))
        new_opt.state[t] = {"step": step.clone(), "exp_avg": cut(m), "exp_avg_sq": cut(v)}


# ----------------------------------------------------------------------------- memory for bench.py

def peak_memory(fn):
    """Peak bytes of tensor memory that fn() allocates above what was live before it.
    CUDA: the caching allocator's max_memory_allocated. CPU: the torch profiler's memory events
    (each op's allocations minus frees in time order; intra-op temporaries are not seen).
    tracemalloc does not see torch's allocations, and ru_maxrss never goes down, so neither is used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
