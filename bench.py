"""Speed measurements (TRELM Sec. 4.4, 4.7), printed as one JSON object, with a verdict on whether
the machine was quiet enough for the numbers to mean anything.

    python bench.py                          # MiniLM-L6-H384, batch 16 x 128, route-every 100, CPU
    python bench.py --config study           # also the study's shape (evaluate.py --task reproduce)
    python bench.py --config paper           # BERT-base's shape alone (random weights), with FLOP floors
    python bench.py --profile                # where a TRELM step's time goes (torch profiler), a table
    python bench.py --layers 4 --hidden 256 --batch 16 --seq 128 --repeats 5 --only plain

How a number is made (the harness):
- Every measurement group (MEASUREMENTS below) times its variants round-robin, the start of the
  round rotating, with a matmul-peak probe as one more member of every round, so that load hits
  the steps and the peak that divides them alike. A group returns {key: [one value per repeat]};
  each ratio is taken inside one round (numerator and denominator measured seconds apart).
- Reported value: the median over repeats; matmul_gflops: the best repeat (a peak can only be
  measured too low, never too high). "spread": {key: [min, max]} over repeats.
- Reliability: a ratio (any key not ending in _s, _per_s or _bytes) whose spread (max - min), or
  the matmul peak whose best-minus-median, exceeds --max-spread (default 25%, MAX_SPREAD) of its value says the machine's load
  changed during the run: a warning is printed and "reliable" is false. Invariants (BOUNDS): mfu
  <= 1 in every repeat (a step cannot beat the best measured matmul peak); a step with more work is
  not faster than one with less (median ratio >= 1 - TIE). A key that breaks its bound is reported
  as null (its spread too; the warning carries the measured numbers) and "reliable" is false.
- --config study adds the study's own shape (batch, sequence length and pretrain flags read from
  study_variants.py: 16 x 64, pretrain.py's --route-every 100) as "study": {...} beside the default's keys.

Keys (the ratios below run pretrain.Trainer on the embedded default: real batches, mentions, SI):
  matmul_gflops          fp32 matmul peak, best round (the best of the probe shapes in a round)
  mlm_step_s             one plain MLM training step (forward, backward, AdamW) of a random BERT
                         of the --layers/--hidden/--vocab shape
  mlm_tokens_per_s       batch * seq / mlm_step_s
  mfu_plain              model FLOP/s of that step / matmul_gflops, with model FLOPs per step =
                         6 * tokens * N_enc + 12 * L * T * H * tokens (attention scores and values)
                         + 6 * masked_tokens * (H * H + H * V) (the MLM head on masked positions)
  <variant>_s            seconds of one step of each Trainer variant (mlm, trelm_full_no_bank,
                         trelm_full, trelm_routed) and of one re-routing on a built batch (ig)
  routed_step_over_full  routed TRELM step (scope strict, route-ratio 0.1) / the same step with all parameters training
  ig_over_step           one attribution pass (m = --ig-steps) / one full training step
  bank_step_over_no_bank training step with memory bank read/mix/update / the same without
  trelm_step_over_mlm    amortised TRELM step (injection + SI + CKA + memory bank + routed update +
                         IG every --route-every steps) / plain MLM step, same model and batch
  trelm_full_step_over_mlm  the same TRELM step without routing / plain MLM step
  ig_peak_bytes, step_peak_bytes, ig_peak_rss_over_step  peak tensor memory of one attribution and
                         of one training step (torch profiler memory events above the live
                         baseline; RSS never goes down, so it cannot separate two phases), and
                         their ratio (one measurement, no spread)
  routing group (measure_routing), every attribution over the whole micro-batch (--ig-batch 0):
  ig_topk_jaccard_vs_exact  per-layer Jaccard of the top --route-ratio FFN neurons picked by the joint IG
                         form (all layers scaled together) and by Eq. 11 (one layer at a time, the
                         default), mean over layers, same micro-batch (one value)
  ig_joint_over_layer    the joint form's attribution time / Eq. 11's
  attr_<form>_over_step  one attribution of --ig-form <form> (joint, target, first_order) / one full
                         training step; first_order reuses the step's forward: its cost is the
                         gradient of P_x to the FFN activations alone (readings group)
  attr_<form>_topk_jaccard_vs_exact  Jaccard of its top --route-ratio neurons with Eq. 11's, same
                         batch and weights (first_order: on the training forward, dropout on)
  readings group (measure_readings), the readings of routing (--route-scope, per-batch routing):
  routed_ffn_step_over_full, routed_blocks_step_over_full  a step routed under scope ffn / blocks
                         (paths fixed) / the same step with every parameter training
  trelm_step_over_mlm_every1  a TRELM step with per-batch routing (--route-every 1, first-order
                         attribution included, scope ffn) / a plain MLM step
  injection group (measure_injection):
  si_length_corr         Pearson r of corpus-level SI(e) (Eq. 1) and span length over scored mentions
  mix_norm_over_embedding_norm  median |I_p| (Eq. 7) / |E_p| over injected span positions after
                         --inj-steps steps (memory rescaled to |h_e|); _raw: memory mixed as stored
  trelm_norouting_step_over_mlm  TRELM step without routing / plain MLM step (both pretrain.Trainer)

Adding a measurement, and what --profile's table shows: docs/measurements.md, "Speed".
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import BertConfig, BertForMaskedLM

import common
import config
import optim
import pretrain
import routing
import study_variants
from bench_profile import IG, MIN_ROW_PCT, PROFILE_SPANS, SLICE_OPS, STEP, format_profile, labelled, peak_memory, \
    profile_tree, step_flops
from memory_bank import span_input
from model import KnowledgeMLM, KnowledgeProb

# Calibrated on a quiet 2-core machine (2026-12-01, d99ab94, --repeats 5): ratio spreads up to 18% of
# their value, the memory bank's ~3% of extra work measured 0.96-1.07; under load (load average
# 9-18) spreads were 33-180%. Hence:
TIE = 0.05  # two steps whose work differs by less than this can measure either way on a quiet machine
MAX_SPREAD = 0.25  # --max-spread default
# key -> (lo, hi, every_repeat, why): the bound holds for the median (with TIE slack) or, when
# every_repeat, for every repeat with no slack (a physical limit, not an ordering of two noisy times)
BOUNDS = {
    "mfu_plain": (0.0, 1.0, True, "model FLOP/s above the measured matmul peak"),
    "routed_step_over_full": (None, 1.0, False, "the routed step skips work the full step does"),
    "ig_over_step": (1.0, None, False, "m IG passes are more work than one training step"),
    "bank_step_over_no_bank": (1.0, None, False, "the memory bank adds work to a step"),
    "trelm_full_step_over_mlm": (1.0, None, False, "an unrouted TRELM step does an MLM step and more"),
    "ig_topk_jaccard_vs_exact": (0.0, 1.0, True, "a Jaccard index lies in [0, 1]"),
    "routed_ffn_step_over_full": (None, 1.0, False, "the routed step skips work the full step does"),
    "routed_blocks_step_over_full": (None, 1.0, False, "the routed step skips work the full step does"),
    **{f"attr_{f}_topk_jaccard_vs_exact": (0.0, 1.0, True, "a Jaccard index lies in [0, 1]")
       for f in ("joint", "target", "first_order")},
}
BEST_OF = {"matmul_gflops"}  # reported as the best repeat, not the median
UNCHECKED_SUFFIXES = ("_s", "_per_s", "_bytes")  # absolute times drift with load; only ratios must agree


# ----------------------------------------------------------------------------- the harness

def matmul_probe(shapes, tries=3):
    """() -> GFLOP/s of the best of `tries` fp32 matmuls over the (m, k, n) shapes."""
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]

    def probe():
        best = 0.0
        for a, b in mats:
            for _ in range(tries):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9)
        return best
    return probe


def interleaved(fns, repeats, peak_shapes, warmup=1):
    """Seconds of each fn per repeat, timed round-robin (start rotating by one each round) together
    with a matmul probe. -> {name: [seconds] * repeats, "matmul_gflops": [GFLOP/s] * repeats}. A fn that
    must set up work untimed first (a forward before the attribution that reuses it) returns the
    seconds of its timed part itself."""
    probe = matmul_probe(peak_shapes)
    for f in fns.values():
        for _ in range(warmup):
            f()
    probe()
    order = ["matmul_gflops", *fns]
    out = {k: [] for k in order}
    for r in range(repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:
            if k == "matmul_gflops":
                out[k].append(probe())
                continue
            t0 = time.perf_counter()
            own = fns[k]()
            out[k].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return out


def model_shapes(args):
    """Probe shapes: a square 1024 matmul and the step's own largest one (tokens x H x 4H)."""
    return [(1024, 1024, 1024), (args.batch * args.seq, args.hidden, 4 * args.hidden)]


def summarise(samples, max_spread):
    """{key: [values]} -> (values, spread, warnings). Median (BEST_OF: max) per key; a key outside
    its BOUNDS is None; a checked key whose (max - min) / value (BEST_OF: (max - median) / max) >
    max_spread gives a warning."""
    values, spread, warnings = {}, {}, []
    for k, v in samples.items():
        if not v:
            raise ValueError(f"bench.py: measurement {k!r} returned no values")
        val = max(v) if k in BEST_OF else statistics.median(v)
        lo, hi, every, why = BOUNDS.get(k, (None, None, False, ""))
        tested, slack = (v, 0.0) if every else ([val], TIE)
        if any((lo is not None and x < lo - slack) or (hi is not None and x > hi + slack) for x in tested):
            warnings.append(f"{k}: measured {_fmt(val)} (repeats {[_fmt(x) for x in v]}) breaks its bound "
                            f"[{lo}, {hi}] ({why}): reported as null")
            values[k] = None
            continue
        values[k] = val
        if len(v) > 1:
            spread[k] = [min(v), max(v)]
            # a peak (best repeat) shrugs off one slow probe: its spread is best - median, so a low
            # median (load through most of the run) marks the run, a single hiccup does not
            top = statistics.median(v) if k in BEST_OF else min(v)
            rel = (max(v) - top) / abs(val) if val else 0.0
            if not k.endswith(UNCHECKED_SUFFIXES) and rel > max_spread:
                warnings.append(f"{k}: spread [{_fmt(min(v))}, {_fmt(max(v))}] is {rel:.0%} of its value "
                                f"{_fmt(val)} (> --max-spread {max_spread:.0%}): the machine is loaded")
    return values, spread, warnings


def _fmt(x):
    return x if isinstance(x, int) else float(f"{x:.4g}")


def report(samples, max_spread):
    """The JSON object of one config: rounded values, spread, reliable, warnings."""
    values, spread, warnings = summarise(samples, max_spread)
    out = {k: None if v is None else _fmt(v) for k, v in values.items()}
    out["spread"] = {k: [_fmt(a), _fmt(b)] for k, (a, b) in spread.items()}
    out["reliable"] = not warnings
    out["warnings"] = warnings
    return out


# ----------------------------------------------------------------------------- measurements

def make_model(args):
    """A BERT masked LM of the benchmark shape (default: MiniLM-L6-H384's config), random init."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=getattr(args, "heads", None) or max(1, args.hidden // 32),
                     intermediate_size=4 * args.hidden, max_position_embeddings=max(512, args.seq))
    return BertForMaskedLM(cfg)


def make_batch(args, mask_id=103):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, args.vocab - 1), args.vocab, (args.batch, args.seq), generator=g)
    attn = torch.ones_like(ids)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, mask_id % args.vocab), ids)
    return ids, attn, labels


def model_flops(model, args, masked):
    cfg = model.config
    enc = sum(p.numel() for n, p in model.bert.encoder.named_parameters() if p.ndim == 2)
    tokens = args.batch * args.seq
    return (6 * tokens * enc + 12 * cfg.num_hidden_layers * args.seq * cfg.hidden_size * tokens
            + 6 * masked * (cfg.hidden_size ** 2 + cfg.hidden_size * cfg.vocab_size))


def measure_plain(args):
    """A plain MLM step through pretrain.py's own model wrapper and optimizer; its MFU."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the Trainers of the other groups run
    model = make_model(args).to(dev)
    net = KnowledgeMLM(model).train()
    opt = optim.make_optimizer(net.parameters(), argparse.Namespace(lr=1e-4, weight_decay=0.01))
    ids, attn, labels = (x.to(dev) for x in make_batch(args))

    def step():
        net(ids, attn, labels)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ts = interleaved({"mlm_step_s": step}, args.repeats, model_shapes(args))
    peak = max(ts["matmul_gflops"])
    flops = model_flops(model, args, int((labels != -100).sum()))
    return {"matmul_gflops": ts["matmul_gflops"], "mlm_step_s": ts["mlm_step_s"],
            "mlm_tokens_per_s": [args.batch * args.seq / t for t in ts["mlm_step_s"]],
            "mfu_plain": [flops / t / 1e9 / peak for t in ts["mlm_step_s"]]}


def trainer(method_flags, args):
    """A pretrain.Trainer on the embedded default with the benchmark batch shape. All trainers of one
    config share one output dir, so the corpus is linked and tokenized once (nothing else is written)."""
    argv = ["--model", args.model, "--data", args.data, "--batch-size", str(args.batch), "--seq-len", str(args.seq),
            "--output-dir", args.workdir, "--route-every", str(args.route_every), *args.pretrain_flags,
            *method_flags]  # the variant's own flags last: they win (a per-batch variant's --route-every 1)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's start messages: stdout is the JSON
        return pretrain.Trainer(config.from_argv(argv))


def trelm_trainers(args):
    """The four Trainer variants, the routed one already routed."""
    return {"mlm": trainer(["--method", "mlm"], args),
            "trelm_full_no_bank": trainer(["--method", "trelm", "--no-routing", "--no-memory-bank"], args),
            "trelm_full": trainer(["--method", "trelm", "--no-routing"], args),
            "trelm_routed": routed(trainer(["--method", "trelm", "--route-scope", "strict"], args))}


def routed(t):
    """Trainer t routed now, whatever its --route-warmup: its --route-scope trains, its paths chosen on its
    current batch by its --ig-form (or --route-select). Every trainer of a measurement is stepped
    (Trainer.train_step) equally often, so each round trains them all on the same batch; a routed one
    re-routes only where its --route-every says (every step at 1; at its first, untimed step otherwise)."""
    if t.router is None:
        t.start_routing()
    if t.paths is None and not (t.attribution is not None and t.attribution.in_backward):
        t.route(t.get_batch(0))  # (loss-grad chooses its paths in the first step's backward)
        t.routed()
    return t


def measure_trelm(args):
    """TRELM's step costs against plain MLM on the real pipeline (pretrain.Trainer, embedded data):
    every variant trains on the same batch (step index fixed)."""
    ts = trelm_trainers(args)
    fns = {f"{k}_s": t.train_step for k, t in ts.items()}
    fns["ig_s"] = functools.partial(ts["trelm_routed"].route, ts["trelm_routed"].get_batch(0))
    s = interleaved(fns, args.repeats, model_shapes(args))
    rounds = list(zip(*(s[k] for k in ("mlm_s", "trelm_full_no_bank_s", "trelm_full_s", "trelm_routed_s", "ig_s"))))
    out = dict(s)
    out["routed_step_over_full"] = [routed / full for _, _, full, routed, _ in rounds]
    out["ig_over_step"] = [ig / full for _, _, full, _, ig in rounds]
    out["bank_step_over_no_bank"] = [full / no_bank for _, no_bank, full, _, _ in rounds]
    out["trelm_step_over_mlm"] = [(routed + ig / args.route_every) / mlm for mlm, _, _, routed, ig in rounds]
    out["trelm_full_step_over_mlm"] = [full / mlm for mlm, _, full, _, _ in rounds]
    step_peak = peak_memory(ts["trelm_full"].train_step)
    ig_peak = peak_memory(fns["ig_s"])
    out["ig_peak_bytes"], out["step_peak_bytes"] = [ig_peak], [step_peak]
    out["ig_peak_rss_over_step"] = [ig_peak / step_peak]
    return out


def measure_routing(args):
    """The attribution forms (--ig-form) on one micro-batch of the embedded default, all over its
    every sequence (--ig-batch 0): their time over a full training step, and the Jaccard of their top
    --route-ratio neuron sets with Eq. 11's (random sets: about ratio / (2 - ratio))."""
    full = trainer(["--method", "trelm", "--no-routing"], args)
    t = trainer(["--method", "trelm", "--ig-batch", "0"], args)
    r, batch, attr = t.cfg.routing, t.get_batch(0), {}
    px = t.knowledge_prob(batch)
    form = {f: routing.Attribution(f, r.ig_steps, r.ig_chunk, r.ig_memory_mb) for f in routing.FORMS}

    def ig(f):
        return lambda: attr.__setitem__(f, form[f](t.net.mlm, px))
    forms = ("layer", "joint", "target")
    s = interleaved({"full_step_s": full.train_step, **{f"ig_{f}_s": ig(f) for f in forms}}, args.repeats,
                    model_shapes(args))
    t.net.train()  # the training forward (dropout on) that first-order routing reads
    attr["first_order"] = form["first-order"](t.net.mlm, px, t.forward(batch, 0, form["first-order"]))
    paths = {f: routing.select_paths(a, ratio=r.route_ratio) for f, a in attr.items()}
    res = {**s, "ig_joint_over_layer": [j / l for l, j in zip(s["ig_layer_s"], s["ig_joint_s"])],
           "ig_topk_jaccard_vs_exact": [routing.path_jaccard(paths["joint"], paths["layer"])]}
    for f in ("joint", "target", "first_order"):
        res[f"attr_{f}_topk_jaccard_vs_exact"] = [routing.path_jaccard(paths[f], paths["layer"])]
        if f != "first_order":
            res[f"attr_{f}_over_step"] = [a / b for a, b in zip(s[f"ig_{f}_s"], s["full_step_s"])]
    return res


# the per-batch readings (scope ffn, --route-every 1), one per attribution form cheap enough to run every step:
# key suffix -> the --ig-form flags (first-order: on the training forward; first-order-subset: a pass of its own
# over one sequence; loss-grad: inside the training backward)
EVERY1 = {"": ["--ig-form", "first-order"], "_fo_subset": ["--ig-form", "first-order-subset", "--ig-batch", "1"],
          "_loss_grad": ["--ig-form", "loss-grad"]}


def measure_readings(args):
    """The readings of routing against plain MLM and full-parameter TRELM, one interleaved run: routed steps
    under scope strict / blocks / ffn with fixed paths (routed once), and the per-batch steps (scope ffn,
    --route-every 1, EVERY1's attribution forms, each step including its attribution). Beside each ratio its
    FLOP floor (<key>_floor: the same ratio of counted matmul FLOPs, step_flops on the same step), and the
    top --route-ratio Jaccard of the cheap forms' paths with Eq. 11's and first-order's on one batch."""
    ts = {"mlm": trainer(["--method", "mlm"], args), "full": trainer(["--method", "trelm", "--no-routing"], args)}
    for scope in routing.SCOPES:
        ts[f"routed_{scope}"] = routed(trainer(["--method", "trelm", "--route-scope", scope], args))
    for suffix, form in EVERY1.items():
        ts["every1" + suffix] = routed(trainer(["--method", "trelm", "--route-scope", "ffn", "--route-every", "1",
                                                *form], args))
    e1, fos = ts["every1"], ts["every1_fo_subset"]
    batch = e1.get_batch(0)

    def attribution(t):  # the attribution alone (first-order: on the training forward it reuses, untimed)
        def f():
            out = t.forward(batch, 0, t.attribution)
            t0 = time.perf_counter()
            t.attribution(t.net.mlm, t.knowledge_prob(batch), out)
            return time.perf_counter() - t0
        return f
    s = interleaved({**{f"{k}_step_s": t.train_step for k, t in ts.items()}, "attr_first_order_s": attribution(e1),
                     "attr_fo_subset_s": attribution(fos)}, args.repeats, model_shapes(args))
    flops = {k: step_flops(t.train_step) for k, t in ts.items()}
    flops["attr_first_order"] = step_flops(attribution(e1))
    flops["attr_fo_subset"] = step_flops(attribution(fos))
    rounds = [dict(zip(s, r)) for r in zip(*s.values())]
    out = dict(s)

    def ratio(key, num, den):
        out[key] = [r[f"{num}_s"] / r[f"{den}_s"] for r in rounds]
        out[key + "_floor"] = [flops[num.removesuffix("_step")] / flops[den.removesuffix("_step")]]
    for scope in routing.SCOPES:
        ratio(f"routed_{scope}_step_over_full", f"routed_{scope}_step", "full_step")
    for suffix in EVERY1:
        ratio(f"trelm_step_over_mlm_every1{suffix}", f"every1{suffix}_step", "mlm_step")
    ratio("attr_first_order_over_step", "attr_first_order", "full_step")
    ratio("attr_fo_subset_over_step", "attr_fo_subset", "full_step")
    out["attr_loss_grad_over_step"] = [(r["every1_loss_grad_step_s"] - r["routed_ffn_step_s"]) / r["full_step_s"]
                                       for r in rounds]  # the in-backward selection's extra time over fixed paths
    out.update(path_jaccards(ts, batch))
    return out


def path_jaccards(ts, batch):
    """Top --route-ratio Jaccard of the cheap forms' paths with Eq. 11's (the layer form) and first-order's,
    all on one batch at the same weights (a fresh trainer's: no step taken): first-order on the training
    forward, first-order-subset on its own pass, loss-grad from a training backward (not stepped)."""
    t, r = ts["every1"], ts["every1"].cfg.routing
    px = t.knowledge_prob(batch)
    paths = {"eq11": routing.select_paths(routing.Attribution("layer", r.ig_steps, r.ig_chunk, r.ig_memory_mb)(
        t.net.mlm, px), ratio=r.route_ratio)}
    t.net.train()
    fo = routing.Attribution("first-order")
    paths["first_order"] = routing.select_paths(fo(t.net.mlm, px, t.forward(batch, 0, fo)), ratio=r.route_ratio)
    subset = routing.Attribution("first-order-subset")(t.net.mlm, KnowledgeProb(t.net, batch, 1))  # as EVERY1's
    paths["fo_subset"] = routing.select_paths(subset, ratio=r.route_ratio)
    k = max(1, round(r.route_ratio * t.router.sizes[0]))
    t.router.arm(k)
    t.forward(batch, 0)["loss"].backward()
    paths["loss_grad"] = [p.cpu() for p in t.router.paths]
    t.optimizer.zero_grad(set_to_none=True)
    out = {}
    for f in ("first_order", "fo_subset", "loss_grad"):
        out[f"paths_{f}_jaccard_vs_eq11"] = [routing.path_jaccard(paths[f], paths["eq11"])]
        if f != "first_order":
            out[f"paths_{f}_jaccard_vs_first_order"] = [routing.path_jaccard(paths[f], paths["first_order"])]
    return out


def measure_injection(args):
    """Injection checks on the embedded default:
      si_length_corr                 Pearson r of corpus-level SI(e) and span length (tokens) over the
                                     scored mentions (long-tail, with a triple)
      mix_norm_over_embedding_norm   median over injected span positions of |I_p| (Eq. 7, memory
                                     rescaled to |h_e|) / |E_p| after --inj-steps steps fill the memory;
                                     ..._raw: the same with the memory mixed as stored
      trelm_norouting_step_over_mlm  a TRELM step without routing / a plain MLM step (Trainer, same batch)"""
    mlm, trelm = trainer(["--method", "mlm"], args), trainer(["--method", "trelm", "--no-routing"], args)
    length = trelm.store.flat("ent_end") - trelm.store.flat("ent_start")
    si = trelm.know.si.values.astype(np.float64)
    scored = ~np.isnan(si)  # SI is computed for the candidate mentions (long-tail, with a triple)
    out = {"si_length_corr": [float(np.corrcoef(si[scored], length[scored])[0, 1])], "si_mentions": [int(scored.sum())]}
    for _ in range(args.inj_steps):  # fill the memory with last-layer outputs
        trelm.train_step()
    W = trelm.net.mlm.get_input_embeddings().weight.detach()
    ratios = {True: [], False: []}
    for _ in range(4):  # the plans of the next four steps
        b = trelm.get_batch(0)
        trelm.train_step()
        p = b["plan"]
        if p is None:
            continue
        with torch.no_grad():
            h_e = trelm.know.injector.embed(W, p.ent_id)
            for match in (True, False):
                x = span_input(W[b["input_ids"]], p.rows, p.cols, p.mention, h_e, p.mem, p.lam, match)
                ratios[match] += (x[p.rows, p.cols].norm(dim=1) / W[b["orig_ids"][p.rows, p.cols]].norm(dim=1)).tolist()
    out["mix_norm_over_embedding_norm"] = [statistics.median(ratios[True])]  # one value: a median over spans
    out["mix_norm_over_embedding_norm_raw"] = [statistics.median(ratios[False])]
    s = interleaved({"mlm_trainer_step_s": mlm.train_step, "trelm_norouting_step_s": trelm.train_step},
                    args.repeats, model_shapes(args))
    out.update(s)
    out["trelm_norouting_step_over_mlm"] = [t / m for m, t in zip(s["mlm_trainer_step_s"], s["trelm_norouting_step_s"])]
    return out


def trainable_share(t):
    """Fraction of the model's parameters a step of trainer t updates: everything without routing; under
    routing the scope's parameters, FFN weights counted at their selected neurons only."""
    params = list(t.net.mlm.parameters())
    total = sum(p.numel() for p in params)
    if t.router is None:
        return sum(p.numel() for p in params if p.requires_grad) / total
    n = 0
    for p in t.router.trainable():
        dim = t.router.neuron_dim(p)
        n += p.numel() if dim is None else p.numel() // p.shape[dim] * len(t.router.selected(p))
    return n / total


def measure_costs(args, variants):
    """The study's cost axis: per variant (name, pretrain flags), the seconds of one training step over a
    plain MLM step's, interleaved in one process (cost_over_mlm), plus, for variants that route every N > 1
    steps, one attribution's seconds over N (amortised; the per-batch variants' steps include theirs);
    the same from counted matmul FLOPs (flops_over_mlm); the trainable share of parameters. Routed
    variants are routed once before timing (a trained-head model routes from step 0)."""
    ts, every = {}, {}
    for name, flags in variants:
        t = trainer(flags, args)
        if t.cfg.routing.routing:
            routed(t)
            every[name] = t.cfg.routing.route_every
        ts[name] = t
    fns = {f"{n}_step_s": t.train_step for n, t in ts.items()}
    # the variants that attribute every N > 1 steps (not --route-select random: it draws, nothing to time)
    amortised = [n for n in every if every[n] > 1 and ts[n].attribution is not None]
    if amortised:
        t = ts[amortised[0]]  # every variant attributes the same way (--ig-form of the study): timed once
        px = t.knowledge_prob(t.get_batch(0))
        fns["attribution_s"] = lambda: t.attribution(t.net.mlm, px)
    s = interleaved(fns, args.repeats, model_shapes(args))
    mlm = next(n for n, f in variants if f[f.index("--method") + 1] == "mlm")
    out = {"costs": {}}
    flops = {n: step_flops(t.train_step) for n, t in ts.items()}
    if amortised:
        attr_flops = step_flops(fns["attribution_s"])
    for n, t in ts.items():
        extra = s["attribution_s"] if n in amortised else [0.0] * args.repeats
        ratios = [(st + a / every.get(n, 1)) / m for st, a, m in zip(s[f"{n}_step_s"], extra, s[f"{mlm}_step_s"])]
        f = flops[n] + (attr_flops / every[n] if n in amortised else 0)
        out["costs"][n] = {"cost_over_mlm": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
                           "repeats": ratios, "flops_over_mlm": f / flops[mlm],
                           "trainable_share": trainable_share(t), "route_every": every.get(n)}
    out["seconds"] = {k: statistics.median(v) for k, v in s.items()}
    return out


# name -> measure(args) -> {key: [values]}; the order is the run order
MEASUREMENTS = {"plain": measure_plain, "trelm": measure_trelm, "routing": measure_routing,
                "readings": measure_readings, "injection": measure_injection}


# ----------------------------------------------------------------------------- profile

def profile_step(args, steps=3):
    """Where a routed TRELM step's time goes: [(indent, label, ms per step, % of the amortised TRELM
    step, ms outside torch ops)], plus the plain MLM step's ms under the same profiler."""
    ts = trelm_trainers(args)
    routed, mlm = ts["trelm_routed"], ts["mlm"]
    routed.train_step()  # warm-up (allocator, first-call caches)
    mlm.train_step()
    named = {label for label, _ in PROFILE_SPANS} | set(SLICE_OPS)  # rows shown even when small
    labels = {STEP, IG, "MLM step", SLICE_OPS[0]} | {label for label, _ in PROFILE_SPANS}  # the backward
    # node is labelled through its autograd::engine::evaluate_function event, not a second time
    with labelled(PROFILE_SPANS), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            with record_function(STEP):
                routed.train_step()
            with record_function("MLM step"):
                mlm.train_step()
        batch = routed.get_batch(0)
        with record_function(IG):
            routed.route(batch)
    tree = profile_tree(prof.events(), labels, detail=SLICE_OPS)
    per = {p: (v[0] / 1e3 / steps, v[1] / 1e3 / steps) for p, v in tree.items()}
    ig_ms = tree[(IG,)][0] / 1e3
    ig_ops = tree[(IG,)][1] / 1e3
    amortised = per[(STEP,)][0] + ig_ms / args.route_every
    table = []

    def add(path, depth):
        ms, ops = per[path]
        table.append((depth, path[-1], ms, 100 * ms / amortised, ms - ops))
        kids = sorted((p for p in per if len(p) == len(path) + 1 and p[:len(path)] == path and
                       (p[-1] in named or path[-1] in SLICE_OPS or 100 * per[p][0] / amortised >= MIN_ROW_PCT)),
                      key=lambda p: -per[p][0])
        if kids:
            for k in kids:
                add(k, depth + 1)
            rest = ms - sum(per[k][0] for k in kids)
            rest_ops = ops - sum(per[k][1] for k in kids)
            table.append((depth + 1, "(rest)", rest, 100 * rest / amortised, rest - rest_ops))
    add((STEP,), 0)
    table.append((0, f"{IG} / {args.route_every}", ig_ms / args.route_every,
                  100 * ig_ms / args.route_every / amortised, (ig_ms - ig_ops) / args.route_every))
    return {"rows": table, "amortised_ms": amortised, "mlm_ms": per[("MLM step",)][0], "ig_ms": ig_ms,
            "steps": steps}


# ----------------------------------------------------------------------------- main

def paper_model(workdir):
    """BERT-base (BertConfig()'s 12 x 768, 12 heads, 3072 FFN) with random weights and the shipped tokenizer's
    30,522 tokens, saved once under workdir: the paper's model shape, no download."""
    d = os.path.join(workdir, "bert-base-random")
    if not os.path.exists(os.path.join(d, "config.json")):
        tok = common.load_tokenizer(common.DEFAULT_MODEL)
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=len(tok))).save_pretrained(d)
        tok.save_pretrained(d)
    return d


def configs(args):
    """[(name, args)]: the default shape, with --config study the study's too (study_variants.py); with
    --config paper BERT-base's alone (paper_model; --paper-batch x --paper-seq)."""
    if args.config == "paper":
        paper = copy.copy(args)
        paper.layers, paper.hidden, paper.heads, paper.vocab = 12, 768, 12, 30522
        paper.batch, paper.seq = args.paper_batch, args.paper_seq
        paper.model = paper_model(os.path.join(args.workdir, "paper"))
        paper.workdir = os.path.join(args.workdir, "paper")
        return [("paper", paper)]
    out = [("default", args)]
    if args.config == "study":
        flags = study_variants.PRETRAIN_ARGS.split()
        study = copy.copy(args)
        study.batch, study.seq = study_variants.BATCH_SIZE, study_variants.SEQ_LEN
        study.route_every = config.get_parser().parse_args(flags).route_every
        study.pretrain_flags = flags
        study.workdir = os.path.join(args.workdir, "study")
        out.append(("study", study))
    return out


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="plain group: random BERT shape")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="rounds of the interleaved timing (>= 2 for a spread)")
    p.add_argument("--only", default=None, help=f"comma list of measurement groups: {','.join(MEASUREMENTS)}")
    p.add_argument("--config", default="default", choices=("default", "study", "paper"),
                   help="study: also time the study's shape (batch 16 x 64, its --route-every) beside the default; "
                        "paper: BERT-base's shape alone (groups plain and readings unless --only says otherwise)")
    p.add_argument("--paper-batch", type=int, default=4, help="--config paper: sequences per step")
    p.add_argument("--paper-seq", type=int, default=256, help="--config paper: tokens per sequence")
    p.add_argument("--max-spread", type=float, default=MAX_SPREAD,
                   help="a ratio whose (max - min) over repeats exceeds this fraction of its value marks the run unreliable")
    p.add_argument("--profile", action="store_true", help="print the torch-profiler table of a TRELM step instead")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="trelm group: the model (default MiniLM-L6-H384)")
    p.add_argument("--data", default="mini", help="trelm group: pre-training data")
    p.add_argument("--route-every", type=int, default=100, help="IG amortised over this many steps")
    p.add_argument("--inj-steps", type=int, default=20, help="injection group: steps that fill the memory bank first")
    p.add_argument("--workdir", default="runs/bench")
    p.add_argument("--costs", default=None, metavar="PATH",
                   help="instead: the study's cost axis (measure_costs of study_variants.COSTED: the frontier and "
                        "efficiency variants, at the study's batch x sequence length) written to PATH "
                        "(results/costs.json); with --data DIR, the second scale's variants (VARIANTS['scale'])")
    return p


def write_costs(args):
    """bench.py --costs PATH: measure_costs at the study's shape, with the commit and the machine's load.
    An existing PATH keeps its variants; only the ones it lacks are measured (each against a plain MLM step
    timed beside it again), so adding a variant leaves the others' costs, and the verdicts read off them,
    as they were. Each variant records the commit and load it was measured at."""
    _, study = configs(argparse.Namespace(**{**vars(args), "config": "study"}))[1]
    old = json.load(open(args.costs)) if os.path.exists(args.costs) else {"costs": {}}
    # the first scale's axis (--data mini): every costed variant; a second scale's (--data DIR): its five
    costed = study_variants.COSTED if args.data == "mini" else study_variants.VARIANTS["scale"]
    todo = [v for v in costed if v[0] not in old["costs"]]
    if not todo:
        print(f"{args.costs}: every variant to cost on --data {args.data} has its cost; "
              "delete the file to measure all again")
        return old
    mlm = next(v for v in costed if v[0] == "mlm")
    new = measure_costs(study, [mlm, *[v for v in todo if v[0] != "mlm"]])
    at = dict(commit=common.git_commit(), threads=torch.get_num_threads(), repeats=args.repeats,
              loadavg_1min=round(os.getloadavg()[0], 2), shape=[study.batch, study.seq], model=args.model)
    for n, c in new["costs"].items():
        if n not in old["costs"]:
            old["costs"][n] = {**c, "measured": at}
    if "seconds" not in old:  # a first measurement: its run-level record
        old.update(seconds=new["seconds"], **at)
    else:
        old.setdefault("added", []).append({"seconds": new["seconds"], **at})
    common.atomic_write_json(args.costs, old)
    print(json.dumps({n: round(c["cost_over_mlm"], 3) for n, c in old["costs"].items()}, indent=1))
    return old


def main(argv=None):
    args = get_parser().parse_args(argv)
    groups = (args.only or ("plain,readings" if args.config == "paper" else ",".join(MEASUREMENTS))).split(",")
    for g in groups:
        if g not in MEASUREMENTS:
            raise SystemExit(f"bench.py: --only {args.only}: unknown group {g!r}; expected some of {','.join(MEASUREMENTS)}")
    if args.repeats < 1 or args.profile_steps < 1:
        raise SystemExit(f"bench.py: --repeats and --profile-steps must be >= 1, got {args.repeats}, {args.profile_steps}")
    if not 0 < args.max_spread < 1:
        raise SystemExit(f"bench.py: --max-spread: expected a fraction in (0, 1), got {args.max_spread}")
    for flag in ("layers", "hidden", "vocab", "batch", "route_every", "inj_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"bench.py: --{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    if args.hidden % max(1, args.hidden // 32):
        raise SystemExit(f"bench.py: --hidden: expected a size divisible by its {args.hidden // 32} attention heads "
                         f"(hidden // 32), e.g. a multiple of 32, got {args.hidden}")
    if not 8 <= args.seq <= 512:
        raise SystemExit(f"bench.py: --seq: expected 8..512 (the models' position embeddings), got {args.seq}")
    if args.costs:
        try:  # checked before measuring
            common.writable_dir(os.path.dirname(os.path.abspath(args.costs)), "--costs")
        except SystemExit as e:
            raise SystemExit(f"bench.py: --costs {args.costs}: cannot create its folder or write there ({e})") from None
    args.pretrain_flags = []
    if args.costs:
        return write_costs(args)
    if args.profile:
        for name, a in configs(args):
            print(format_profile(name, a, profile_step(a, args.profile_steps)), end="\n\n", flush=True)
        return None
    runs = configs(args)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "commit": common.git_commit(),
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    for name, a in runs:
        samples = {}
        for g in groups:
            for k, v in MEASUREMENTS[g](a).items():
                samples.setdefault(k, []).extend(v)
        out = {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "vocab", "batch", "seq", "route_every")},
               **report(samples, args.max_spread)}
        for w in out["warnings"]:
            print(f"bench.py [{name}] WARNING: {w}", file=sys.stderr)
        if name in ("default", "paper"):
            res.update(out)
        else:
            res[name] = out
    res["reliable"] = res["reliable"] and all(res[n]["reliable"] for n, _ in runs[1:])  # every config's verdict
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
