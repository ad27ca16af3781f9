"""The instruments bench.py measures with: a torch-profiler table of where a step's time goes, the peak
tensor memory of a call, and the matmul FLOPs of a call (the work a step does, whatever the machine).

    with labelled(PROFILE_SPANS), torch.profiler.profile() as prof: ...   # record_function per span
    rows = profile_tree(prof.events(), labels)                             # {row path: [us, us in ops]}
    peak_memory(fn), step_flops(fn)

Not a script: `python bench.py --profile` prints the table (bench.profile_step).
"""
import contextlib
import functools
import importlib
import os

import torch
from torch.profiler import record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# (row label, "module:attribute path") wrapped in record_function while profiling; the table nests a
# row under the nearest labelled caller, so the order here does not matter
PROFILE_SPANS = [
    ("get_batch", "pretrain:Trainer.get_batch"),
    ("collate (masking)", "data:MLMCollator.__call__"),
    ("knowledge plan", "knowledge:Knowledge.plan"),
    ("negative sampling (Q)", "cka:NegativeSampler.sample"),
    ("bank ensure", "memory_bank:MemoryBank.ensure"),
    ("bank read", "memory_bank:MemoryBank.read"),
    ("forward", "model:KnowledgeMLM.forward"),
    ("h_e embed", "entity_importance:KnowledgeInjector.embed"),
    ("bank mix (Eq. 7)", "memory_bank:span_input"),
    ("MLM head", "common:mlm_logits"),
    ("CKA loss (Eq. 2)", "model:cka_loss"),
    ("CKA gathers", "cka:sampled_logits"),
    ("bank observe (Eq. 4-6)", "knowledge:Knowledge.observe"),
    ("grad clip", "torch.nn.utils:clip_grad_norm_"),
]
STEP, IG, BACKWARD = "TRELM step (routed)", "re-routing (IG, Eq. 9-11)", "backward"
SLICE_OPS = ("_SliceLinear", "_SliceLinearBackward")  # routing's custom Function: rows per aten op inside
MIN_ROW_PCT = 0.5  # backward nodes below this share of the step go to their parent's (rest)


def _resolve(target):
    """'module:A.b' -> (owner object, attribute name), or None when it does not exist (any more)."""
    mod, path = target.split(":")
    try:
        owner = importlib.import_module(mod)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        getattr(owner, attr)
    except (ImportError, AttributeError):
        return None
    return owner, attr


@contextlib.contextmanager
def labelled(spans):
    """Wrap each span's function in torch.profiler.record_function(label). A span whose function no
    longer exists (renamed or removed) stops the profile with its name: a row must not vanish silently."""
    missing = [f"{label} ({target})" for label, target in spans if _resolve(target) is None]
    if missing:
        raise SystemExit("bench.py: PROFILE_SPANS names functions that no longer exist (renamed or removed; "
                         "give their new names there): " + ", ".join(missing))
    saved = []
    for label, target in spans:
        owner, attr = _resolve(target)
        own = attr in vars(owner)  # False: inherited (a class) -- restored by deleting the wrapper
        orig = getattr(owner, attr)

        def wrapped(*a, _orig=orig, _label=label, **kw):
            with record_function(_label):
                return _orig(*a, **kw)
        saved.append((owner, attr, vars(owner)[attr] if own else None))
        setattr(owner, attr, functools.wraps(orig)(wrapped))
    try:
        yield
    finally:
        for owner, attr, orig in reversed(saved):
            if orig is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, orig)


def _label(e, labels):
    """The table label(s) of a profiler event, or None for an unlabelled event."""
    if e.name in labels or e.name.startswith("Optimizer."):
        return (e.name,)
    if e.name.startswith("autograd::engine::evaluate_function: "):
        return (BACKWARD, e.name.split(": ", 1)[1])
    return None


def profile_tree(events, labels, detail=()):
    """Profiler events -> {row path (tuple of labels): [inclusive us, us inside torch ops]}. A row's
    path is the labels of its labelled ancestors; 'inside torch ops' sums its outermost aten:: ops.
    Rows labelled in `detail` get one child row per outermost aten:: op name."""
    rows = {}

    def path_of(e):
        p = []
        while e is not None:
            lab = _label(e, labels)
            if lab is not None:
                p[:0] = lab
            e = e.cpu_parent
        return tuple(p)

    for e in events:
        lab = _label(e, labels)
        if lab is not None:
            p = path_of(e)
            for i in range(len(lab)):  # (backward, node): the backward row gets the node's time too
                r = rows.setdefault(p[:len(p) - len(lab) + i + 1], [0.0, 0.0])
                r[0] += e.cpu_time_total
        elif e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")):
            p = path_of(e)
            for i in range(1, len(p) + 1):  # counted in every enclosing row
                rows.setdefault(p[:i], [0.0, 0.0])[1] += e.cpu_time_total
            if p and p[-1] in detail:
                r = rows.setdefault(p + (e.name,), [0.0, 0.0])
                r[0] += e.cpu_time_total
                r[1] += e.cpu_time_total
    return rows


def format_profile(name, args, prof):
    """A markdown table of profile_step's result."""
    lines = [f"### {name}: batch {args.batch} x {args.seq}, route-every {args.route_every}, "
             f"{torch.get_num_threads()} threads, {prof['steps']} steps profiled, load average {os.getloadavg()[0]:.1f} "
             f"(on a loaded machine compare shares, not ms)",
             "", f"amortised TRELM step {prof['amortised_ms']:.1f} ms; plain MLM step {prof['mlm_ms']:.1f} ms "
             f"(ratio {prof['amortised_ms'] / prof['mlm_ms']:.3f} under the profiler); one re-routing {prof['ig_ms']:.1f} ms",
             "", "| part | ms / step | % of step | outside torch ops (ms) |", "|---|---:|---:|---:|"]
    for depth, label, ms, pct, py in prof["rows"]:
        ms, pct, py = (max(0.0, x) for x in (ms, pct, py))  # a (rest) of ~0 can come out at -0.0
        lines.append(f"| {'&nbsp;&nbsp;' * depth}{label} | {ms:.1f} | {pct:.1f} | {py:.1f} |")
    return "\n".join(lines)



class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every op torch's flop_counter has a formula for (matmuls, convolutions,
    attention) in its block; unlike FlopCounterMode it tracks no modules, whose backward hooks
    autograd.grad (an attribution) does not support."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(fn):
    """Matmul FLOPs of fn() (MatmulFlops: the routed backward's skipped weight gradients and an
    attribution's passes included): the analytic cross-check of a measured time."""
    with MatmulFlops() as counter:
        fn()
    return counter.total



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
