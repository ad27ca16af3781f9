"""The optimisation of a run: the learning-rate schedule, AdamW, and the AdamW whose FFN parameters step
per neuron while routed (TRELM Sec. 3.3, Eq. 12: only the knowledge paths are updated).

    opt = make_optimizer(net.parameters(), cfg.optim)       # before routing: torch.optim.AdamW
    opt = from_adamw(opt, router)                           # from the first routing on: NeuronAdamW
    for group in opt.param_groups: group["lr"] = lr_at(step, cfg.optim)

NeuronAdamW keeps AdamW's moments and a step count per FFN neuron and steps only the selected neurons:
a neuron's moments survive the steps it is not selected, and when it comes back Adam continues it with
its own bias correction (docs/departures.md, "Routing: Eq. 9-12").

Tests: python -m pytest -q tests/test_routing.py
"""
import torch


def lr_at(step, optim):
    """Linear warm-up to --lr, then linear decay to 0 at --max-steps (optim: config.Optim)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr * max(0.0, (optim.max_steps - step) / max(1, optim.max_steps - optim.warmup_steps))


def make_optimizer(params, optim):
    """AdamW over the parameters that train: weight decay on matrices, none on biases and LayerNorms.
    Fused (one CUDA kernel over every parameter) when all of them are on CUDA; elsewhere torch's default
    implementation."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = True if params and all(p.is_cuda for p in params) else None  # None: torch's default (CPU as before)
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused)



def _adamw_(ws, gs, ms, vs, ts, lr, b1, b2, eps, wd):
    """torch.optim.AdamW's update of the tensors ws in place (moments ms, vs in place), all lists at once
    (torch._foreach_*: one kernel launch per op over the list on GPU, no Python loop per tensor); ts: the
    step counts after this step, per tensor a scalar tensor or one per neuron broadcastable against it."""
    if not ws:
        return
    torch._foreach_mul_(ws, 1 - lr * wd)  # decoupled weight decay
    torch._foreach_lerp_(ms, gs, 1 - b1)  # m = b1 m + (1 - b1) g
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)  # v = b2 v + (1 - b2) g^2
    dtype = torch.promote_types(ws[0].dtype, torch.float32)
    ts = [t.double() for t in ts]
    step_size = [(lr / (1 - b1 ** t)).to(dtype) for t in ts]  # lr / (1 - b1^t)
    bc2_sqrt = [((1 - b2 ** t) ** 0.5).to(dtype) for t in ts]
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(ms, denom)
    torch._foreach_mul_(update, step_size)
    torch._foreach_sub_(ws, update)  # w -= lr m-hat / (sqrt(v-hat) + eps)


class NeuronAdamW(torch.optim.Optimizer):
    """AdamW whose FFN parameters keep moments and a step count per neuron and step only the
    selected neurons: every other element of weight and state stays bitwise unchanged, so a
    neuron's moments survive the steps it is not selected. Other parameters: plain AdamW with a
    scalar step. Same formula as torch.optim.AdamW (decoupled weight decay; two groups like
    make_optimizer: weight_decay for ndim >= 2, 0 otherwise).

    neurons: an object with neuron_dim(p) -> int or None and selected(p) -> LongTensor of the
    indices along that axis that step now; a Router. None: every parameter is plain AdamW.
    State per FFN parameter: exp_avg, exp_avg_sq (p's shape), step (I,) float32 on p's device.
    """

    def __init__(self, params, neurons=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1 and lr >= 0 and eps >= 0):
            raise ValueError(f"optim.NeuronAdamW: need lr >= 0, eps >= 0, betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}")
        params = list(params)
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.neurons = neurons

    def _dim(self, p):
        return None if self.neurons is None else self.neurons.neuron_dim(p)

    @torch.no_grad()
    def step(self, closure=None):
        """Every parameter of a group in one _adamw_ call: the plain ones whole, the FFN ones as the slices of
        their selected neurons (index_select, update, index_copy back)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            whole, sliced = [[], [], [], [], []], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                dim, st = self._dim(p), self.state[p]
                if not st:
                    st["step"] = (torch.zeros((), dtype=torch.float32) if dim is None else
                                  torch.zeros(p.shape[dim], dtype=torch.float32, device=p.device))  # () or (I,)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if dim is None:
                    st["step"] += 1
                    for part, x in zip(whole, (p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                        part.append(x)
                    continue
                idx = self.neurons.selected(p)  # (k,)
                if idx.numel() == 0:
                    continue
                t = st["step"].index_select(0, idx).add_(1)  # (k,) each neuron's own step count
                st["step"].index_copy_(0, idx, t)
                shape = [1] * p.dim()
                shape[dim] = -1  # t broadcast along the neuron axis: (k, 1), (1, k) or (k,)
                sliced.append((p, st, dim, idx, [x.index_select(dim, idx) for x in (p, p.grad, st["exp_avg"],
                                                                                    st["exp_avg_sq"])] + [t.view(shape)]))
            parts = [whole[i] + [s[4][i] for s in sliced] for i in range(5)]  # w, g, m, v, t: k rows / columns
            _adamw_(*parts, *hp)
            for p, st, dim, idx, (w, _, m, v, _) in sliced:
                for full, part in ((p, w), (st["exp_avg"], m), (st["exp_avg_sq"], v)):
                    full.index_copy_(dim, idx, part)
        return loss

    def load_state_dict(self, state_dict):
        """The base class's, plus: per-neuron step counts go to their parameter's device (the base
        class leaves "step" where the checkpoint was mapped, fine for a scalar step only)."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            if "step" in st and st["step"].dim():
                st["step"] = st["step"].to(p.device)


def from_adamw(adamw, router):
    """NeuronAdamW over router.trainable() that continues the full-parameter torch.optim.AdamW that
    trained before routing started: its lr, betas, eps and weight decay; every parameter it holds
    state for keeps exp_avg and exp_avg_sq, and an FFN parameter's step count becomes the step
    count of each of its neurons (a parameter it never stepped starts fresh)."""
    hp = {(g["lr"], tuple(g["betas"]), g["eps"]) for g in adamw.param_groups if g["params"]}
    decay = {g["weight_decay"] for g in adamw.param_groups for p in g["params"] if p.ndim >= 2}
    no_decay = {g["weight_decay"] for g in adamw.param_groups for p in g["params"] if p.ndim < 2}
    if len(hp) != 1 or len(decay) > 1 or no_decay - {0.0}:
        raise ValueError("optim.from_adamw: expected one lr/betas/eps, one weight decay for ndim >= 2 and 0 for "
                         f"the rest (make_optimizer's groups), got {hp}, {decay}, {no_decay}")
    lr, betas, eps = hp.pop()
    opt = NeuronAdamW(router.trainable(), router, lr=lr, betas=betas, eps=eps, weight_decay=decay.pop() if decay else 0.0)
    for p in router.trainable():
        old = adamw.state.get(p)
        if not old:
            continue
        dim = router.neuron_dim(p)
        step = old["step"].detach().float().cpu()
        opt.state[p] = {"step": step.clone() if dim is None else step.to(p.device).expand(p.shape[dim]).clone(),
                        "exp_avg": old["exp_avg"].clone(), "exp_avg_sq": old["exp_avg_sq"].clone()}
    return opt
