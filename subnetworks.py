"""Knowledge-critical subnetworks (Bayazit et al. 2023, arXiv 2310.03084) as a check on TRELM's routing.

A knowledge-critical subnetwork is a sparse set of weights whose removal makes a frozen masked LM
lose a chosen set of facts it knows (TargetKG) while it keeps other facts (ControlKG) and its
language modelling (ControlLM). It is found by differentiable weight masking (Sec. 3 of the paper):
every weight theta_i of the masked matrices gets a logit l_i; a Gumbel-sigmoid sample with a
straight-through hard threshold decides whether theta_i belongs to the subnetwork (m_i = 1) and
the *remaining* model runs with (1 - m) * theta, i.e. the removed subnetwork is exactly what the
applied mask turns off. Only the logits train; the model is never copied or changed (the masked
weights are passed to torch.func.functional_call).

We then compare the FFN neurons the subnetwork touches with the knowledge paths of TRELM's routing
(routing.py, integrated gradients, TRELM Eq. 9-12): (a) the paths pre-training last selected
(<run>/checkpoint/training_state.pt, saved at the step of <run>/final/; a step_NNNNNN/ snapshot is
paired with none: paired_training_state) and (b) IG paths of the same TargetKG queries. This file is
the mask learning and the command; subnet_data.py draws and batches TargetKG, ControlKG and ControlLM;
subnet_overlap.py compares neuron sets.

    python subnetworks.py --seeds 0 1 2 --resume      # runs/trelm/final (python pretrain.py), embedded facts
    python subnetworks.py --model runs/trelm/final --facts-dir ../shared/data/lama/TREx_labels \
        --target-relation P36 --steps 300

Results: <output-dir>/subnetworks/seed_<s>.json per seed (reused by --resume when its config
matches) and <output-dir>/subnetworks.json: metrics as means over seeds, metrics.per_seed, the
criteria below, the command and the checkpoint's provenance; paths in them relative to the repository
(common.portable_path), so --resume matches on any machine. Mask training state (logits, Adam,
RNG) is saved every --save-every steps to <work-dir>/seed_<s>.pt (atomic writes), so an interrupted
run resumes mid-seed with --resume and continues exactly (N steps + resume + N steps = 2N steps).
The lower (unmasked) layers run once per fixed batch and are cached, so a training step costs only
the masked top layers' forward and backward.

Paper symbol -> variable (equation markers below read "Bayazit Eq. n", never TRELM's numbers):
    l (mask logits, one per masked weight)   WeightMasks.logits
    m = Gumbel-sigmoid_ST(l, tau)            gumbel_sigmoid_st(...)  (1 = in the removed subnetwork)
    m~ = 1 - m, f(x; m~ * theta)             remaining_params(...)   (the model without the subnetwork)
    tau (temperature, 1)                     --tau
    lambda_1 (suppression, 1.5)              --w-suppress
    lambda_2 (maintenance, paper 1; here 5)  --w-maintain
    lambda_3 (sparsity, 2 held then -> 3)    --w-sparse, --w-sparse-max, --sparse-hold
    U (uniform over the vocabulary)          kl_uniform(...)

Equations (numbered here, after the paper's Sec. 3):
    Bayazit Eq. 1  m_i = 1[s_i > 0.5] + s_i - sg(s_i),  s_i = sigmoid((l_i + log u - log(1 - u)) / tau), u ~ U(0,1)
    Bayazit Eq. 2  L_suppress = KL(U || p(. | x; m~ * theta)) at the object's [MASK] of TargetKG queries
    Bayazit Eq. 3  L_maintain_KG = KL(p(. | x; theta) || p(. | x; m~ * theta)) at ControlKG objects
    Bayazit Eq. 4  L_maintain_LM = the same KL at the masked-LM positions of real text (ControlLM)
    Bayazit Eq. 5  L_sparse = mean_i sigmoid(l_i): the expected density of the *removed* subnetwork, so
                   minimising it keeps the subnetwork small; the paper's sparsity = 1 - density
    Bayazit Eq. 6  L = lambda_1 L_suppress + lambda_2 (L_maintain_KG + L_maintain_LM) + lambda_3(t) L_sparse

Choices (flags where it matters; the measurements behind them, and the results, are in docs/subnetworks.md):
- TargetKG, ControlKG and ControlLM: how each is drawn is in subnet_data.py's docstring.
- Masked weights: the weight matrices of every nn.Linear in the top --top-layers Transformer layers
  (default half, as the paper masks the upper half of GPT-2): attention Q, K, V, output; FFN in, out.
  Biases, LayerNorms, embeddings and the MLM head stay unmasked.
- Schedule. The paper's released code trains with Adam at lr 0.2 after a linear warm-up over 10% of
  the steps, initial removal probability 0.45, lambda_3 = 2 for half the steps then linear to 3, for
  thousands of steps. We keep the warm-up (--warmup) and the lambda_3 schedule but, for a 150-step CPU
  budget, default to --lr 0.1, --init-prob 0.05 and --anneal 0.3 (the paper's lr and initial
  probability hard-remove far too many weights within a 150-step budget). --anneal lowers the Gumbel
  noise linearly to 0 over the last 30% of the steps, so the final steps train, with the
  straight-through gradient, exactly the deterministic mask 1[sigmoid(l) > 0.5] that the evaluation
  removes (a departure: the paper keeps full noise).
  metrics.convergence says how close a full-noise sample is to that mask: the expected removed
  fraction of a sample, the hard removed fraction, and flip_ratio = expected number of weights on
  which a sample differs from the hard mask / number of hard-removed weights.
- The random baseline removes, in every masked matrix, as many uniformly chosen weights as the
  subnetwork does (so its per-matrix and per-layer sizes are equal), averaged over --random-seeds.
- FFN neurons of the subnetwork (for the overlaps): intermediate neuron j of a layer is touched by
  row j of W_in and column j of W_out (2H weights). --neuron-rule top (default): the neurons with the
  most removed weights, as many per layer as the routing set has (only neurons with at least one
  removed weight), so both sets have equal size; any: any weight removed; frac: at least --neuron-frac
  of them. Each layer's Jaccard is compared with its exact random expectation (subnet_overlap.py).
- Done-when criteria (metrics.criteria, on the seed means): kept fraction >= 0.97; TargetKG P@1
  relative drop >= 0.5; ControlKG and ControlLM P@1 and perplexity relative change within 0.1.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
import data
import lama
import routing
from subnet_data import (control_halves, drop_stating, fact_batch, lm_batch, read_facts, read_lm_texts,
                         single_token_facts, split_facts, sub_batch)
from subnet_overlap import layer_of, overlaps, paired_training_state, training_state_paths


# -----------------------------------------------------------------------------
# Masks

def masked_weight_names(model, top_layers):
    """Names (relative to model.base_model) of the nn.Linear weights of the top `top_layers`
    Transformer layers: attention Q/K/V/output and FFN in/out. Biases and LayerNorms excluded."""
    layers = model.base_model.encoder.layer
    if not 1 <= top_layers <= len(layers):
        raise ValueError(f"--top-layers {top_layers}: expected 1..{len(layers)} (the model has {len(layers)} layers)")
    names = []
    for i in range(len(layers) - top_layers, len(layers)):
        for sub, mod in layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                names.append(f"encoder.layer.{i}.{sub}.weight")
    return names


def gumbel_sigmoid_st(logits, tau=1.0, generator=None, noise=1.0):
    """Bayazit Eq. 1: hard 0/1 sample in the forward pass, gradient of the soft sample in the backward.
    logits (...) -> m (...), 1 = weight belongs to the removed subnetwork. noise scales the logistic
    noise (1 = the paper; 0 = the deterministic mask 1[l > 0] with a straight-through gradient)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise * torch.logit(u)) / tau)  # logit(u) = log u - log(1-u): a Gumbel difference
    hard = (soft > 0.5).to(logits.dtype)
    return hard + (soft - soft.detach())  # exactly `hard` in value; d/dlogits = d soft/d logits


class WeightMasks(torch.nn.Module):
    """One logit per masked weight; sigmoid(logit) = probability the weight is in the removed subnetwork."""

    def __init__(self, model, top_layers, init_prob=0.45):
        super().__init__()
        self.names = masked_weight_names(model, top_layers)
        params = dict(model.base_model.named_parameters())
        init = math.log(init_prob / (1 - init_prob))
        self.logits = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full_like(params[n], init)) for n in self.names])

    def sample(self, tau=1.0, generator=None, noise=1.0):
        """Training masks (Bayazit Eq. 1), one per masked matrix, 1 = removed."""
        return [gumbel_sigmoid_st(l, tau, generator, noise) for l in self.logits]

    @torch.no_grad()
    def hard(self):
        """Evaluation / final subnetwork: 1[sigmoid(l) > 0.5], 1 = removed."""
        return [(torch.sigmoid(l) > 0.5).float() for l in self.logits]

    def density(self):
        """Bayazit Eq. 5: mean over all masked weights of sigmoid(l), the expected removed fraction."""
        total = sum(l.numel() for l in self.logits)
        return sum(torch.sigmoid(l).sum() for l in self.logits) / total

    @torch.no_grad()
    def convergence(self):
        """How far a training sample is from the evaluated hard mask. With s = sigmoid(l), a sample
        differs from 1[s > 0.5] on weight i with probability min(s_i, 1 - s_i)."""
        total = sum(l.numel() for l in self.logits)
        s = [torch.sigmoid(l) for l in self.logits]
        hard = sum((x > 0.5).sum().item() for x in s)
        flips = sum(torch.minimum(x, 1 - x).sum().item() for x in s)
        return dict(expected_removed=sum(x.sum().item() for x in s) / total, hard_removed=hard / total,
                    flip_ratio=flips / max(hard, 1))


def remaining_params(model, names, removed):
    """{name: (1 - m) * theta}: the model without the subnetwork, for functional_call on base_model."""
    params = dict(model.base_model.named_parameters())
    return {n: params[n] * (1 - m) for n, m in zip(names, removed)}


def random_removal_like(removed, generator):
    """Random baseline: in every matrix, as many removed weights as `removed` has, uniformly placed."""
    out = []
    for m in removed:
        k = int(m.sum().item())
        r = torch.zeros(m.numel())
        r[torch.randperm(m.numel(), generator=generator)[:k]] = 1.0
        out.append(r.view_as(m))
    return out


# -----------------------------------------------------------------------------
# Forward passes: the MLM head only at the positions that are scored

def position_logits(model, params, batch):
    """Logits (N, V) at batch['pos'] = (row, col) pairs. params=None runs the full model."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if params is None:
        hidden = model.base_model(**kwargs).last_hidden_state  # (B, T, H)
    else:
        hidden = functional_call(model.base_model, params, (), kwargs).last_hidden_state  # (B, T, H)
    rows, cols = batch["pos"]
    return common.mlm_logits(model, hidden[rows, cols])  # (N, V)


@torch.no_grad()
def cache_lower(model, batch, first):
    """Run the frozen full model once on a fixed batch and keep what every training step reuses:
    'hidden' (B, T, H) entering layer `first` (the layers below are never masked, so this is the same
    with or without the subnetwork), 'layer_mask' (the attention-mask argument the encoder passes to
    its layers, whatever form the attention implementation uses) and 'ref' (N, H) the full model's
    final hidden states at the scored positions (the maintenance KL's reference, Eq. 3-4)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0]
        seen["layer_mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    h = model.base_model.encoder.layer[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h.remove()
    rows, cols = batch["pos"]
    return dict(batch, hidden=seen["hidden"], layer_mask=seen["layer_mask"],
                ref=out.last_hidden_state[rows, cols], first=first)


def top_logits(model, params, cached):
    """Logits (N, V) at the scored positions, running only layers >= cached['first'] with `params`
    (names relative to base_model) on the cached hidden states."""
    h = cached["hidden"]  # (B, T, H)
    for i in range(cached["first"], len(model.base_model.encoder.layer)):
        pre = f"encoder.layer.{i}."
        own = {n[len(pre):]: v for n, v in params.items() if n.startswith(pre)}
        h = functional_call(model.base_model.encoder.layer[i], own, (h, cached["layer_mask"]))  # (B, T, H)
    rows, cols = cached["pos"]
    return common.mlm_logits(model, h[rows, cols])  # (N, V)


def kl_uniform(logits):
    """Bayazit Eq. 2: KL(U || softmax(logits)) = -log V - mean_v log p_v, averaged over rows. (N, V) -> ()"""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (-math.log(logits.shape[-1]) - logp.mean(-1)).mean()


def kl_ref(ref_logits, logits):
    """Bayazit Eq. 3/4: KL(p_ref || p) = sum_v p_ref (log p_ref - log p), averaged over rows."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean()


def sparse_weight(step, steps, start=2.0, end=3.0, hold=0.5):
    """lambda_3(t): `start` for the first `hold` fraction of steps, then linear to `end` at the last step."""
    t0 = int(hold * steps)
    if step < t0 or steps - 1 <= t0:
        return start
    return start + (end - start) * (step - t0) / (steps - 1 - t0)


def noise_scale(step, steps, anneal=0.0):
    """Scale of the Gumbel noise at `step`: 1 until the last `anneal` fraction of steps, then linear to
    0 at the last step, so the final steps train the deterministic mask that the evaluation uses."""
    t0 = steps - round(anneal * steps)
    if step < t0:
        return 1.0
    return 1.0 - (step - t0 + 1) / (steps - t0)


def mask_lr(step, steps, lr, warmup=0.1):
    """Adam learning rate of the logits at `step`: linear from lr / n to lr over the first
    n = round(warmup * steps) steps, then constant (the paper's released schedule)."""
    n = round(warmup * steps)
    return lr * min(1.0, (step + 1) / n) if n > 0 else lr


# -----------------------------------------------------------------------------
# Training and evaluation

TRAIN_KEYS = ("steps", "lr", "warmup", "anneal", "tau", "batch_size", "lm_batch_size", "w_suppress", "w_maintain",
              "w_sparse", "w_sparse_max", "sparse_hold")


def train_masks(model, masks, target, control, lm, cfg, seed, state=None, save=None, log=print):
    """Optimise the mask logits (Bayazit Eq. 6) on TargetKG / ControlKG / ControlLM batches for
    cfg.steps steps (cfg: the TRAIN_KEYS of the command line, plus log_every and save_every).
    state: a dict that save(state) received earlier, to continue from; save is called every
    cfg.save_every steps and after the last. Returns the curves."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    first = min(layer_of(n) for n in masks.names)
    target, control, lm = (cache_lower(model, b, first) for b in (target, control, lm))
    opt = torch.optim.Adam(masks.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    curves = {k: [] for k in ("step", "loss", "suppress", "maintain_kg", "maintain_lm", "density",
                              "removed_fraction", "flip_ratio", "lr", "w_sparse", "sec_per_step")}
    start = 0
    if state is not None:
        masks.load_state_dict(state["masks"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        curves, start = state["curves"], state["step"]

    def draw(batch, k):
        n = batch["input_ids"].shape[0]
        return sub_batch(batch, torch.randperm(n, generator=g)[:k].sort().values)

    def snapshot(step):
        return dict(step=step, masks=masks.state_dict(), opt=opt.state_dict(), rng=g.get_state(), curves=curves)

    t0, steps = time.time(), cfg.steps
    for step in range(start, steps):
        lr = mask_lr(step, steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        tb, cb, lb = draw(target, cfg.batch_size), draw(control, cfg.batch_size), draw(lm, cfg.lm_batch_size)
        params = remaining_params(model, masks.names, masks.sample(cfg.tau, g, noise_scale(step, steps, cfg.anneal)))
        with torch.no_grad():
            ref_c, ref_l = common.mlm_logits(model, cb["ref"]), common.mlm_logits(model, lb["ref"])  # (N, V)
        l_sup = kl_uniform(top_logits(model, params, tb))  # Bayazit Eq. 2
        l_kg = kl_ref(ref_c, top_logits(model, params, cb))  # Bayazit Eq. 3
        l_lm = kl_ref(ref_l, top_logits(model, params, lb))  # Bayazit Eq. 4
        dens = masks.density()  # Bayazit Eq. 5
        lam3 = sparse_weight(step, steps, cfg.w_sparse, cfg.w_sparse_max, cfg.sparse_hold)
        loss = cfg.w_suppress * l_sup + cfg.w_maintain * (l_kg + l_lm) + lam3 * dens  # Bayazit Eq. 6
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            conv = masks.convergence()
            sec = (time.time() - t0) / (step + 1 - start)
            for k, v in zip(curves, (step, loss.item(), l_sup.item(), l_kg.item(), l_lm.item(), dens.item(),
                                     conv["hard_removed"], conv["flip_ratio"], lr, lam3, sec)):
                curves[k].append(v)
            log(f"step {step:5d} | loss {loss.item():.4f} | supp {l_sup.item():.4f} | kg {l_kg.item():.4f} "
                f"| lm {l_lm.item():.4f} | density {dens.item():.4f} | removed {conv['hard_removed']:.4f} "
                f"| flips/removed {conv['flip_ratio']:.3f} | {sec:.2f} s/step")
        if save is not None and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step == steps - 1):
            save(snapshot(step + 1))
    return curves


@torch.no_grad()
def label_ranks(model, params, batch, chunk=64):
    """(NLL (N,), rank (N,), 1 = top) of the labels at the scored positions."""
    n = batch["input_ids"].shape[0]
    nll, ranks = [], []
    for s in range(0, n, chunk):
        b = sub_batch(batch, torch.arange(s, min(n, s + chunk)))
        logits = position_logits(model, params, b).float()  # (N, V)
        gold = logits.gather(1, b["labels"][:, None])  # (N, 1)
        nll.append(F.cross_entropy(logits, b["labels"], reduction="none"))
        ranks.append((logits > gold).sum(1) + 1)
    return torch.cat(nll), torch.cat(ranks)


def score(model, params, batch, chunk=64):
    """P@1, mean rank (1 = top) and perplexity exp(mean NLL) of the labels at the scored positions."""
    nll, ranks = label_ranks(model, params, batch, chunk)
    return dict(p_at_1=(ranks == 1).float().mean().item(), mean_rank=ranks.float().mean().item(),
                ppl=math.exp(nll.mean().item()), n=int(nll.numel()))


def evaluate_sets(model, params, sets):
    return {name: score(model, params, b) for name, b in sets.items()}


def deltas(after, before):
    return {s: {k: after[s][k] - before[s][k] for k in ("p_at_1", "mean_rank", "ppl")} for s in before}


def relative(after, before):
    """(after - before) / before per set and metric (None where before is 0)."""
    return {s: {k: (after[s][k] - before[s][k]) / before[s][k] if before[s][k] else None
                for k in ("p_at_1", "mean_rank", "ppl")} for s in before}


def sparsity_report(names, removed):
    """Kept fraction (the paper's 'sparsity') overall, per layer and per matrix."""
    total = sum(m.numel() for m in removed)
    gone = sum(m.sum().item() for m in removed)
    per_layer = {}
    for n, m in zip(names, removed):
        a = per_layer.setdefault(layer_of(n), [0.0, 0])
        a[0] += m.sum().item()
        a[1] += m.numel()
    return dict(kept_fraction=1 - gone / total, removed_weights=int(gone), masked_weights=int(total),
                per_layer={str(l): 1 - g / t for l, (g, t) in sorted(per_layer.items())},
                per_matrix={n: 1 - m.sum().item() / m.numel() for n, m in zip(names, removed)})


# -----------------------------------------------------------------------------
# Overlap with routing's knowledge paths

def routing_paths(model, batch, ratio, ig_steps):
    """routing.py's knowledge paths for the target facts: IG of P(correct object at [MASK])."""
    rows = torch.arange(batch["labels"].shape[0])

    def run(m):
        return torch.softmax(position_logits(m, None, batch).float(), -1)[rows, batch["labels"]]  # (N,)

    attr = routing.ffn_attributions(model, run, steps=ig_steps)  # (L, I)
    return routing.select_paths(attr, ratio=ratio)


# -----------------------------------------------------------------------------
# Seeds: one JSON (and one training state) per seed, means over seeds

def mean_tree(records):
    """Element-wise mean of equally shaped nested dicts / lists; numbers are averaged, None stays None
    if any seed has None, other leaves (strings) are taken from the first record."""
    first = records[0]
    if isinstance(first, dict):
        return {k: mean_tree([r[k] for r in records]) for k in first}
    if isinstance(first, list):
        return [mean_tree(list(xs)) for xs in zip(*records)]
    if isinstance(first, bool) or not isinstance(first, (int, float)) or any(r is None for r in records):
        return first if all(r == first for r in records) else None
    return float(np.mean(records))


def criteria(m, kept=0.97, target_drop=0.5, control_change=0.1):
    """The Done-when criteria on a metrics dict (means over seeds)."""
    rel = m["relative_subnetwork"]
    out = dict(kept_fraction=m["sparsity"]["kept_fraction"] >= kept,
               target_p_at_1_drop=rel["target"]["p_at_1"] is not None and -rel["target"]["p_at_1"] >= target_drop)
    for s in ("control_kg", "control_lm"):
        for k in ("p_at_1", "ppl"):
            out[f"{s}_{k}"] = rel[s][k] is not None and abs(rel[s][k]) <= control_change
    out["random_changes_target_less"] = abs(m["relative_random"]["target"]["p_at_1"] or 0) < abs(rel["target"]["p_at_1"] or 0)
    out["all"] = all(out.values())
    return out


# -----------------------------------------------------------------------------

TRAINED_DEFAULT = os.path.join("runs", "trelm", "final")


SEED_FREE = ("seeds", "resume", "output_dir", "work_dir", "log_every", "save_every", "checkpoint_commit",
             "checkpoint_note")  # not part of a seed's config
# flags recorded as common.recorded_config writes them (relative to the repository or '../shared/data/...';
# 'minilm' or a hub id as given), so --resume matches on any machine
PATH_FLAGS = ("model", "training_state", "facts_dir", "data_dir", "lm_text", "data_root", "output_dir", "work_dir")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="masked-LM id or directory; default: runs/trelm/final (what `python pretrain.py` writes) if "
                        "present, else the packaged MiniLM, whose fresh MLM head knows no facts to find")
    p.add_argument("--training-state", default=None,
                   help="pretrain.py training_state.pt whose saved routing paths are overlap (a); default: the "
                        "run's checkpoint/training_state.pt when the model is its final/ (or checkpoint/), none "
                        "for a step_NNNNNN/ snapshot")
    p.add_argument("--facts-dir", default=None, help="LAMA-format facts: relations.jsonl (here or parent) + P*.jsonl "
                   "or P*/test.jsonl; default: the embedded default's probes/")
    p.add_argument("--data-dir", default=None, help="benchmark data root; ControlLM = its wikitext-2/ when present "
                   "(default: ../shared/data next to this repository, as evaluate.py)")
    p.add_argument("--lm-text", default=None, help="ControlLM text: a WikiText-2 dir (valid.txt/test.txt) or a text "
                   "file; overrides --data-dir")
    p.add_argument("--data-root", default=None, help="where the embedded default is built (default: the cache root, as pretrain.py --cache-dir)")
    p.add_argument("--target-relation", default=None, help="TargetKG = known facts of this relation (e.g. P36); default: any")
    p.add_argument("--known-k", type=int, default=1, help="TargetKG facts have their object at rank <= k under the full model")
    p.add_argument("--target-size", type=int, default=25, help="number of TargetKG facts (fewer if fewer are known)")
    p.add_argument("--control-size", type=int, default=400, help="ControlKG facts (half train, half held out)")
    p.add_argument("--control-known-k", type=int, default=10,
                   help="ControlKG facts have their object at rank <= k under the full model (0: any rank), so "
                        "that keeping them is measurable by P@1")
    p.add_argument("--control-train", choices=["any-rank", "known"], default="any-rank",
                   help="ControlKG facts of Bayazit Eq. 3: every entity-disjoint fact (any rank, up to --control-size) "
                        "outside the held-out half, or the other half of the rank <= --control-known-k facts only")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the TargetKG / ControlKG draw (same for every --seeds)")
    p.add_argument("--lm-seqs", type=int, default=128, help="ControlLM sequences per split")
    p.add_argument("--lm-len", type=int, default=64, help="ControlLM sequence length")
    p.add_argument("--steps", type=int, default=150, help="mask-training steps per seed")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the mask logits (paper's released code: 0.2)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear learning-rate warm-up from 0")
    p.add_argument("--anneal", type=float, default=0.3, help="last fraction of steps over which the Gumbel noise "
                   "falls linearly to 0 (0 = the paper: full noise throughout)")
    p.add_argument("--batch-size", type=int, default=16, help="TargetKG and ControlKG queries per step")
    p.add_argument("--lm-batch-size", type=int, default=4, help="ControlLM sequences per step")
    p.add_argument("--top-layers", type=int, default=None, help="mask the top N layers (default: half of them)")
    p.add_argument("--init-prob", type=float, default=0.05, help="initial sigmoid(l): probability of being removed "
                   "(paper's released code: 0.45)")
    p.add_argument("--tau", type=float, default=1.0, help="Gumbel-sigmoid temperature")
    p.add_argument("--w-suppress", type=float, default=1.5, help="lambda_1")
    p.add_argument("--w-maintain", type=float, default=5.0, help="lambda_2 (paper: 1)")
    p.add_argument("--w-sparse", type=float, default=2.0, help="lambda_3 while held")
    p.add_argument("--w-sparse-max", type=float, default=3.0, help="lambda_3 at the last step")
    p.add_argument("--sparse-hold", type=float, default=0.5, help="fraction of steps lambda_3 is held")
    p.add_argument("--random-seeds", type=int, default=3, help="random subnetworks averaged for the baseline")
    p.add_argument("--routing", choices=["on", "off"], default="on", help="compare with routing.py's knowledge paths")
    p.add_argument("--route-ratio", type=float, default=0.1, help="IG paths (b): top fraction of neurons per layer")
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--neuron-rule", choices=["top", "any", "frac"], default="top")
    p.add_argument("--neuron-frac", type=float, default=0.01, help="--neuron-rule frac: removed fraction of a neuron's 2H weights")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mask-training seeds")
    p.add_argument("--resume", action="store_true", help="reuse <output-dir>/subnetworks/seed_<s>.json when its config "
                   "matches, and continue an interrupted seed from <work-dir>/seed_<s>.pt")
    p.add_argument("--checkpoint-commit", default=None, help="provenance: the commit whose pretrain.py wrote --model "
                   "(default: the commit in --training-state, i.e. the checkout's HEAD when it was saved)")
    p.add_argument("--checkpoint-note", default="", help="provenance: free text on how --model was made")
    p.add_argument("--output-dir", default="results")
    p.add_argument("--work-dir", default=os.path.join("runs", "subnetworks"), help="mask training states")
    p.add_argument("--save-every", type=int, default=50, help="write the training state every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    return p


def check_config(path, stored, config):
    diff = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if diff:
        raise SystemExit(f"--resume: {path} was made with other flags: " +
                         ", ".join(f"--{k.replace('_', '-')} {stored.get(k)} -> {config.get(k)}" for k in diff) +
                         " (use another --output-dir / --work-dir, or delete it)")


def run_seed(model, args, config, seed, sets_train, sets_eval, full, path_sets, log=print):
    """Train (or resume) one seed's masks, evaluate the subnetwork, its random counterpart and the
    overlaps; write <output-dir>/subnetworks/seed_<seed>.json. Returns that record."""
    out = os.path.join(args.output_dir, "subnetworks", f"seed_{seed}.json")
    if args.resume and os.path.exists(out):
        with open(out) as f:
            rec = json.load(f)
        check_config(out, rec["config"], config)
        log(f"seed {seed}: reusing {out}")
        return rec
    t0 = time.time()
    state_path = os.path.join(args.work_dir, f"seed_{seed}.pt")
    state = None
    if args.resume and os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        check_config(state_path, state["config"], config)
        log(f"seed {seed}: resuming from {state_path} at step {state['step']}")
    spent = state["seconds"] if state else 0.0

    def save(snap):
        common.atomic_torch_save(dict(snap, config=config, seconds=spent + time.time() - t0), state_path)

    masks = WeightMasks(model, args.top_layers, args.init_prob)
    curves = train_masks(model, masks, sets_train["target"], sets_train["control_kg"], sets_train["control_lm"],
                         args, seed, state, save, log)
    removed = masks.hard()
    sub = evaluate_sets(model, remaining_params(model, masks.names, removed), sets_eval)
    g = torch.Generator().manual_seed(seed + 1000)
    rand_runs = [evaluate_sets(model, remaining_params(model, masks.names, random_removal_like(removed, g)), sets_eval)
                 for _ in range(args.random_seeds)]
    rand = {s: {k: float(np.mean([r[s][k] for r in rand_runs])) for k in full[s]} for s in full}
    metrics = dict(sparsity=sparsity_report(masks.names, removed), convergence=masks.convergence(), full=full,
                   subnetwork_removed=sub, random_removed=rand, delta_subnetwork=deltas(sub, full),
                   delta_random=deltas(rand, full), relative_subnetwork=relative(sub, full),
                   relative_random=relative(rand, full))
    if path_sets:
        metrics["overlap"] = overlaps(masks.names, removed, path_sets, args.neuron_rule, args.neuron_frac,
                                      model.config.intermediate_size)
    rec = dict(seed=seed, config=config, commit=common.git_commit(), metrics=metrics, curves=curves,
               seconds=spent + time.time() - t0)
    common.atomic_write_json(out, rec)
    log(f"seed {seed}: wrote {out} ({rec['seconds']:.0f} s)")
    return rec


def check(args):
    """Every flag against its range before anything is loaded or written: one line naming the flag."""
    def bad(flag, expected, got):
        raise SystemExit(f"subnetworks.py: {flag}: expected {expected}, got {got}")
    for flag, lo in (("known_k", 1), ("target_size", 1), ("control_size", 2), ("control_known_k", 0), ("split_seed", 0),
                     ("lm_seqs", 1), ("lm_len", 8), ("steps", 1), ("batch_size", 1), ("lm_batch_size", 1),
                     ("random_seeds", 1), ("ig_steps", 1), ("save_every", 0), ("log_every", 1)):
        if getattr(args, flag) < lo:
            bad("--" + flag.replace("_", "-"), f"an integer >= {lo}", getattr(args, flag))
    if args.top_layers is not None and args.top_layers < 1:
        bad("--top-layers", "an integer >= 1 (or leave it out: half of the layers)", args.top_layers)
    if any(not 0 <= s < 2 ** 32 for s in args.seeds):
        bad("--seeds", "integers in [0, 2**32)", args.seeds)
    for flag in ("lr", "warmup", "anneal", "init_prob", "tau", "w_suppress", "w_maintain", "w_sparse", "w_sparse_max",
                 "sparse_hold", "route_ratio", "neuron_frac"):
        if not math.isfinite(getattr(args, flag)):
            bad("--" + flag.replace("_", "-"), "a finite number", getattr(args, flag))
    for flag in ("warmup", "anneal", "sparse_hold"):
        if not 0 <= getattr(args, flag) <= 1:
            bad("--" + flag.replace("_", "-"), "a fraction of the steps in [0, 1]", getattr(args, flag))
    if not 0 < args.init_prob < 1:
        bad("--init-prob", "a probability in (0, 1)", args.init_prob)
    for flag in ("route_ratio", "neuron_frac"):
        if not 0 < getattr(args, flag) <= 1:
            bad("--" + flag.replace("_", "-"), "a fraction in (0, 1]", getattr(args, flag))
    for flag in ("lr", "tau"):
        if getattr(args, flag) <= 0:
            bad("--" + flag.replace("_", "-"), "a value > 0", getattr(args, flag))
    for flag in ("w_suppress", "w_maintain", "w_sparse", "w_sparse_max"):
        if getattr(args, flag) < 0:
            bad("--" + flag.replace("_", "-"), "a weight >= 0", getattr(args, flag))


def main(argv=None):
    """The CLI: flags checked (check), then the run holds <output-dir>/.subnetworks.lock and
    <work-dir>/.subnetworks.lock (common.output_lock) until it ends."""
    args = build_parser().parse_args(argv)
    check(args)
    command = "python subnetworks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with common.output_lock(args.output_dir, "subnetworks", "subnetworks.py: --output-dir"), \
            common.output_lock(args.work_dir, "subnetworks", "subnetworks.py: --work-dir"):
        run(args, command)


def run(args, command):
    """Masks for every --seeds (run_seed), their means and the overlaps; <output-dir>/subnetworks.json."""
    if args.model is None:
        args.model = TRAINED_DEFAULT if os.path.isdir(TRAINED_DEFAULT) else common.DEFAULT_MODEL
        if args.model == common.DEFAULT_MODEL:
            print(f"note: {TRAINED_DEFAULT} not found; using the packaged MiniLM, whose MLM head is untrained: "
                  "its fact numbers are meaningless (run `python pretrain.py` first)")
    if args.data_dir is None:
        args.data_dir = lama.default_data_dir()
    model_dir = common.resolve_model(args.model)
    if args.training_state is None:
        args.training_state = paired_training_state(model_dir)
        if args.training_state is None:
            print(f"note: no training state is paired with {model_dir} (only a pretrain.py run's final/ or "
                  "checkpoint/ is paired automatically); overlap (a) is skipped (pass --training-state)")
    common.seed_everything(args.split_seed)
    model, tok = common.load_mlm(args.model)
    model.eval()
    args.top_layers = args.top_layers or max(1, model.config.num_hidden_layers // 2)
    if args.top_layers > model.config.num_hidden_layers:
        raise SystemExit(f"subnetworks.py: --top-layers: expected at most the {model.config.num_hidden_layers} "
                         f"layers of --model {args.model}, got {args.top_layers}")

    facts_dir = args.facts_dir
    if facts_dir is None:
        kg_dir, _ = data.resolve_data("mini", args.data_root)
        facts_dir = os.path.join(os.path.dirname(kg_dir), "probes")
    facts = single_token_facts(read_facts(facts_dir), tok)
    _, ranks = label_ranks(model, None, fact_batch(tok, facts))  # full model, every fact
    target, control = split_facts(facts, ranks.tolist(), args.split_seed, args.target_relation, args.target_size,
                                  args.control_size, args.known_k, args.control_known_k or None)
    anyrank = None
    if args.control_train == "any-rank":
        anyrank = split_facts(facts, ranks.tolist(), args.split_seed, args.target_relation, args.target_size,
                              args.control_size, args.known_k, None)[1]
    control_train, control_eval = control_halves(control, anyrank)
    lm_train_txt, lm_eval_txt, lm_source = read_lm_texts(args.lm_text, args.data_dir, args.data_root)
    lm_train, lm_eval = drop_stating(lm_train_txt, target), drop_stating(lm_eval_txt, target)
    sets_train = dict(target=fact_batch(tok, target), control_kg=fact_batch(tok, control_train),
                      control_lm=lm_batch(tok, lm_train, args.lm_len, args.lm_seqs, 0.15, args.split_seed))
    sets_eval = dict(target=sets_train["target"], control_kg=fact_batch(tok, control_eval),
                     control_lm=lm_batch(tok, lm_eval, args.lm_len, args.lm_seqs, 0.15, args.split_seed + 1))
    sizes = {k: int(v["labels"].numel()) for k, v in sets_eval.items()}
    sizes.update(facts=len(facts), known_facts=int((ranks <= args.known_k).sum()),
                 control_kg_train=int(sets_train["control_kg"]["labels"].numel()),
                 control_lm_lines_dropped=len(lm_train_txt) + len(lm_eval_txt) - len(lm_train) - len(lm_eval))
    print(f"{len(facts)} single-token facts, {sizes['known_facts']} at rank <= {args.known_k} | TargetKG {len(target)} | "
          f"ControlKG {len(control_train)} train / {len(control_eval)} eval | ControlLM ({lm_source}) "
          f"{sizes['control_lm']} eval positions, {sizes['control_lm_lines_dropped']} lines dropped as stating a target "
          f"| top {args.top_layers} layers masked")

    full = evaluate_sets(model, None, sets_eval)
    path_sets, provenance = {}, dict(model_dir=common.portable_path(model_dir), command=command,
                                     checkpoint_note=args.checkpoint_note)
    if args.training_state is not None:
        paths, provenance["training_state"] = training_state_paths(args.training_state)
        provenance["checkpoint_commit"] = args.checkpoint_commit or provenance["training_state"]["commit"]
        if paths is not None and args.routing == "on":
            path_sets["trelm_paths"] = paths
    if args.routing == "on":
        path_sets["ig_paths"] = routing_paths(model, sets_eval["target"], args.route_ratio, args.ig_steps)

    recorded = common.recorded_config(args, PATH_FLAGS)
    config = common.recorded_config(args, PATH_FLAGS, drop=SEED_FREE)
    records = [run_seed(model, args, config, s, sets_train, sets_eval, full, path_sets) for s in args.seeds]
    per_seed = [dict(r["metrics"], seed=r["seed"], seconds=r["seconds"]) for r in records]
    metrics = mean_tree([r["metrics"] for r in records])
    metrics["per_seed"] = per_seed
    metrics["criteria"] = criteria(metrics)
    metrics["seconds_per_seed"] = float(np.mean([r["seconds"] for r in records]))

    for s in ("target", "control_kg", "control_lm"):
        sub, rand = metrics["subnetwork_removed"][s], metrics["random_removed"][s]
        print(f"{s:10s} P@1 full {full[s]['p_at_1']:.3f} -> removed {sub['p_at_1']:.3f} (random {rand['p_at_1']:.3f}) "
              f"| PPL {full[s]['ppl']:.2f} -> {sub['ppl']:.2f} (random {rand['ppl']:.2f})")
    print(f"kept fraction {metrics['sparsity']['kept_fraction']:.4f} | flips/removed "
          f"{metrics['convergence']['flip_ratio']:.4f} | criteria {metrics['criteria']}")
    for name, o in metrics.get("overlap", {}).items():
        print(f"FFN neuron overlap with {name}: Jaccard {o['overall']['jaccard']:.4f} "
              f"(random {o['overall']['expected_jaccard']:.4f})")
    path = common.write_result(args.output_dir, "subnetworks", provenance["model_dir"], recorded, args.seeds, metrics,
                               provenance=provenance, sizes=sizes, curves={str(r["seed"]): r["curves"] for r in records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
