"""Knowledge-enhanced continued pre-training: TRELM (arXiv 2403.11203) and its baselines.

    python pretrain.py                                   # TRELM on the embedded default, 1 process
    torchrun --nproc_per_node=2 pretrain.py --max-steps 4  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 pretrain.py --model roberta-base --data DIR --batch-size 64

Methods (--method; METHOD_TABLE is the one place where they differ):
  mlm    plain continued MLM pre-training (the paper's RoBERTa / BERT rows)
  dkplm  DKPLM (alibaba/EasyNLP's released code): long-tail mentions by KLT = long-tail * SI * KG
         degree, pseudo token E(t) - E(r), relation-conditioned full-softmax decoding of the entity's
         tokens, L_MLM + L_dec, all parameters train
  trelm  noise-aware injection of important entities + Contrastive Knowledge Assessing (Sec. 3.1),
         Knowledge-augmented Memory Bank (Sec. 3.2), Dynamic Knowledge Routing (Sec. 3.3);
         ablations --no-injection, --no-memory-bank, --no-routing (Table 6)

One optimizer step (Sec. 3.4), Trainer.train_step:
  0. once, before training: SI(e) (Eq. 1) of every corpus mention with the initial model (a dataset
     column) and the corpus-level threshold of "important" (Knowledge.__init__)
  1. a micro-batch: dynamic 15% MLM masking (80/10/10) and its linked entity mentions (get_batch)
  2. its knowledge plan (Knowledge.plan): the mentions to inject (--injection; "important" = long-tail
     mentions above the threshold), their span positions, CKA targets and negatives from Q, and the
     memory read for them (Eq. 7-8 inputs); built complete, never changed afterwards
  3. forward: input embedding of each injected span = h_e mixed with memory (Eq. 7);
     L = theta * L_MLM + (1 - theta) * L_CKA (Eq. 2-3); the MLM head only at masked positions
  4. routing (Sec. 3.3, Trainer.route), from --route-warmup on: every --route-every steps attribute
     the FFN neurons (Eq. 9-11; --ig-form first-order on step 3's own forward, the integrated-gradient
     forms on a pass of their own) and keep the top ones: the knowledge paths (Eq. 12) that this and
     the next steps' backward trains, with whatever else --route-scope trains
  5. backward; memory bank update from the detached outputs at every mention of a key (Eq. 4-6),
     identical on every rank (Knowledge.observe); with --long-tail-words also at every long-tail word
  6. the optimizer step (gradients of the knowledge paths only while routed)

Paper symbol -> flag: theta --theta, k --window-k, gamma --gamma, lambda_0 --lambda0, beta --beta
(q: --lambda-q), m --ig-steps, Q exponent 0.75 (cka.py), K --negatives, route ratio --route-ratio.
Decisions where the paper is ambiguous (--memory-scale, --memory-init, --memory-window, --si-window,
--long-tail-words): docs/departures.md.
Outputs in --output-dir (checkpoint.py): checkpoint/ (latest, with training_state.pt, for --resume),
final/ (model + tokenizer, loadable with AutoModelForMaskedLM / AutoTokenizer), metrics.jsonl,
routing.jsonl, config.json. A previous run there is continued (--resume: every flag but
checkpoint.OPERATIONAL must match, --max-steps may grow to extend the run) or deleted (--overwrite),
never replaced silently. --deterministic makes the same command bitwise repeatable. Data and
divergence errors print one line (--debug: the traceback).
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import common
import data
import routing
from cka import NegativeSampler, cka_loss, cka_response_prob, label_token_counts, total_loss
from entity_importance import (STRATEGIES, KnowledgeInjector, entity_pool, important_threshold, kg_degree,
                               long_tail_mask, select_mentions, si_column, span_positions)
from memory_bank import MemoryBank, span_input


@dataclass(frozen=True)
class Method:
    """What a --method does; a new baseline is one row of METHOD_TABLE (plus a DECODERS function if it
    decodes its spans in a new way).
    injection  default --injection strategy (entity_importance.select_mentions)
    decoding   what the injected spans are trained to predict: a DECODERS key, or "none"
    loss       how L_MLM and the decoding loss combine: a LOSSES key
    sampler    CKA negatives from Q (Eq. 2); bank  memory bank (Sec. 3.2); routing  knowledge paths (Sec. 3.3)"""
    injection: str
    decoding: str
    loss: str
    sampler: bool
    bank: bool
    routing: bool


METHOD_TABLE = {
    "trelm": Method(injection="important", decoding="cka", loss="theta", sampler=True, bank=True, routing=True),
    "dkplm": Method(injection="dkplm", decoding="relation", loss="sum", sampler=False, bank=False, routing=False),
    "mlm": Method(injection="none", decoding="none", loss="mlm", sampler=False, bank=False, routing=False),
}
METHODS = tuple(METHOD_TABLE)
INJECTIONS = STRATEGIES


class Config(argparse.Namespace):
    """The resolved flags of a run (resolve_config), read-only: `replace` makes a changed copy."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the resolved configuration is read-only (tried to set {name}); use .replace()")

    def replace(self, **changes):
        new = Config.__new__(Config)
        new.__dict__.update({**vars(self), **changes})
        return new


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="trelm", choices=METHODS)
    a("--model", default=common.DEFAULT_MODEL, help="HF masked-LM id or local dir; 'minilm' = the packaged MiniLM-L6-H384")
    a("--data", default="mini", help="'mini' (embedded default, built offline) or a DIR with kg/ and corpus.jsonl")
    a("--output-dir", default=None, help="default: runs/<method>")
    a("--max-steps", type=int, default=250, help="optimizer steps (250: about 6 minutes on 2 CPU cores)")
    a("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient sync on the last only)")
    a("--seq-len", type=int, default=128)
    a("--lr", type=float, default=3e-4, help="peak learning rate (3e-4 beat 1e-4 on the default MiniLM, measured)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up; default 6%% of --max-steps")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0)
    a("--mlm-prob", type=float, default=0.15)
    a("--whole-word-mask", action="store_true")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=100, help="write checkpoint/ (for --resume) every N steps")
    a("--snapshot-every", type=int, default=0, help="also keep step_NNNNNN/ model dirs every N steps (efficiency curves)")
    a("--log-every", type=int, default=10)
    a("--resume", action="store_true", help="continue exactly from <output-dir>/checkpoint (every run-changing flag "
      "must match the checkpoint's)")
    a("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a previous run "
      "(deletes its checkpoint/, final/, step_*/ and metrics.jsonl)")
    a("--debug", action="store_true", help="print the full traceback of data and training errors")
    a("--deterministic", action="store_true",
      help="bitwise repeatable: torch.use_deterministic_algorithms (CPU index_put_ accumulate is otherwise "
           "a threaded atomic add), the thread count recorded and checked on --resume")
    a("--num-proc", type=int, default=None, help="processes for corpus preprocessing (datasets.map)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # Sec. 3.1: noise-aware knowledge injection + CKA
    a("--injection", default=None, choices=INJECTIONS,
      help="which mentions get h_e (default: important for trelm, dkplm = DKPLM's long-tail score for dkplm)")
    a("--no-injection", action="store_true",
      help="ablation (Table 6): the chosen spans show the mask embedding only (no h_e, no memory); CKA still trains on them")
    a("--long-tail-percentile", type=float, default=50.0, help="long-tail = occurring entities with frequency at or below this percentile")
    a("--important-fraction", type=float, default=0.5,
      help="'important' = long-tail mentions whose SI is in this top fraction of the corpus's candidates")
    a("--si-window", type=int, default=8, help="SI(e) is computed on +-N tokens around the mention (0 = whole sequence)")
    a("--si-refresh", type=int, default=0,
      help="recompute SI(e) over the corpus with the current model every N epochs (0 = never: SI of the initial model)")
    a("--theta", type=float, default=0.5, help="Eq. 3: L = theta*L_MLM + (1-theta)*L_CKA")
    a("--negatives", type=int, default=16, help="K negatives per target drawn from Q (Eq. 2)")
    # Sec. 3.2: memory bank
    a("--no-memory-bank", action="store_true")
    a("--window-k", type=int, default=16, help="Eq. 4 window k")
    a("--gamma", type=float, default=0.1, help="Eq. 5 EMA discount")
    a("--lambda0", type=float, default=0.5, help="Eq. 7-8 initial mixing weight")
    a("--beta", type=float, default=2.0, help="Eq. 8: lambda_q = lambda0 / beta^q (1 = no decay)")
    a("--lambda-q", default="epoch", choices=("epoch", "fraction"),
      help="Eq. 8's q: the integer pre-training epoch (the paper's) or the fractional epoch")
    a("--lambda-epochs", type=float, default=0.0,
      help="Eq. 8 counts the run as this many epochs, whatever the corpus size (0: the real epochs): a short run "
           "over a small corpus then spans the decay the paper describes instead of reaching lambda ~ 0 early")
    a("--memory-scale", default="embedding", choices=("embedding", "raw"),
      help="Eq. 7: rescale each memory vector to the norm of h_e (embedding) or mix it as stored (raw)")
    a("--memory-init", default="knowledge", choices=("knowledge", "entity"),
      help="initial local memory: h_e = E(t) - E(r) (knowledge) or the mean embedding of the entity's own tokens "
           "(entity: the CKA targets, so CKA can copy them)")
    a("--memory-window", default="context", choices=("context", "span"),
      help="Eq. 4 averages the window without the span (context) or with it (span)")
    a("--long-tail-words", action="store_true",
      help="memory-bank keys also for long-tail words (Sec. 3.2, 3.4; Wu et al. 2020's notes): whole-word tokens "
           "outside entity spans whose corpus frequency is in [--word-min-count, the --word-percentile-th percentile] "
           "(keys of the bank: none under --no-memory-bank or --no-injection)")
    a("--word-percentile", type=float, default=75.0,
      help="long-tail word = a whole-word token type at or below this percentile of the corpus's word frequencies")
    a("--word-min-count", type=int, default=2,
      help="and occurring at least this often (a word seen once would read back its own sentence)")
    a("--memory-dtype", default="fp32", choices=("fp32", "bf16"))
    a("--memory-device", default="cpu", choices=("cpu", "cuda"))
    # Sec. 3.3: routing
    a("--no-routing", action="store_true")
    a("--ig-steps", type=int, default=20, help="m, Riemann steps of integrated gradients")
    a("--route-scope", default="ffn", choices=routing.SCOPES,
      help="what trains while routed besides the knowledge paths (Eq. 12): ffn everything but the FFN neurons "
           "outside the paths (the default: the reading closest to the paper's claims in the study, "
           "results/frontier.md), blocks the embeddings and MLM head (inside the Transformer blocks only the "
           "paths), strict nothing (only the paths; the first study's reading)")
    a("--route-select", default="attr", choices=("attr", "random"),
      help="attr: the top neurons by attribution (Eq. 9-11); random: as many per layer drawn at random at each "
           "routing (the control: does attribution matter?)")
    a("--ig-form", default="layer", choices=routing.FORMS,
      help="layer: Eq. 11 as printed, one layer scaled at a time; joint: all layers scaled together (not Eq. 11); "
           "target: all layers scaled only at the positions where P_x is defined; first-order: activation x "
           "dP_x/dv on the training forward itself (one Riemann step at alpha = 1)")
    a("--ig-chunk", type=int, default=0, help="alpha steps stacked per IG forward (0: as many as --ig-memory-mb allows)")
    a("--ig-memory-mb", type=float, default=1024.0, help="activation memory bound of one stacked IG forward (estimate)")
    a("--ig-batch", type=int, default=8, help="sequences of the micro-batch the attribution runs on (0 = all)")
    a("--route-every", type=int, default=100,
      help="re-route every N steps (measured, docs/measurements.md: successive path sets overlap at the batch-to-batch level, "
           "Jaccard about 0.1, at N = 10, 25 and 100 alike, while IG's share of the time grows from 18%% to 62%%)")
    a("--route-warmup", type=int, default=None,
      help="steps of full-parameter training before the first routing (default: 0, or --route-every when the "
           "model's MLM head is freshly initialised, e.g. MiniLM: routing freezes the head, so it must learn first)")
    a("--route-ratio", type=float, default=0.1, help="top fraction of FFN neurons per layer")
    a("--route-threshold", type=float, default=None, help="instead of --route-ratio: keep neurons >= t * layer max")
    a("--train-layernorm", action="store_true", help="LayerNorms also train while routing")
    a("--train-head-bias", action="store_true", help="MLM-head bias also trains while routing")
    return p


def resolve_config(args):
    """Validate flags against each other and fill method-dependent defaults -> a read-only Config."""
    def bad(flag, msg):
        raise SystemExit(f"pretrain.py: {flag}: {msg}")
    for flag, v in (("--max-steps", args.max_steps), ("--batch-size", args.batch_size),
                    ("--grad-accum", args.grad_accum), ("--ig-steps", args.ig_steps),
                    ("--route-every", args.route_every)):
        if v < 1:
            bad(flag, f"expected a positive integer, got {v}")
    if not 8 <= args.seq_len <= 4096:
        bad("--seq-len", f"expected 8..4096, got {args.seq_len}")
    for flag, v in (("--theta", args.theta), ("--mlm-prob", args.mlm_prob), ("--lambda0", args.lambda0),
                    ("--gamma", args.gamma), ("--important-fraction", args.important_fraction)):
        if not 0.0 <= v <= 1.0:
            bad(flag, f"expected a value in [0, 1], got {v}")
    if args.ig_chunk < 0:
        bad("--ig-chunk", f"expected 0 (automatic) or a positive integer, got {args.ig_chunk}")
    if args.ig_memory_mb <= 0:
        bad("--ig-memory-mb", f"expected > 0, got {args.ig_memory_mb}")
    if args.route_select == "random" and args.route_threshold is not None:
        bad("--route-threshold", "selects by attribution; --route-select random draws --route-ratio of each layer")
    if not 0.0 < args.route_ratio <= 1.0:
        bad("--route-ratio", f"expected (0, 1], got {args.route_ratio}")
    if not 0.0 < args.long_tail_percentile <= 100.0:
        bad("--long-tail-percentile", f"expected (0, 100], got {args.long_tail_percentile}")
    if not 0.0 < args.word_percentile <= 100.0:
        bad("--word-percentile", f"expected (0, 100], got {args.word_percentile}")
    if args.word_min_count < 1:
        bad("--word-min-count", f"expected a positive integer, got {args.word_min_count}")
    if min(args.negatives, args.window_k, args.si_window, args.ig_batch, args.si_refresh) < 0:
        bad("--negatives/--window-k/--si-window/--ig-batch/--si-refresh", "expected non-negative values")
    if not (np.isfinite(args.lambda_epochs) and args.lambda_epochs >= 0):
        bad("--lambda-epochs", f"expected a finite number >= 0 (0: the real epochs), got {args.lambda_epochs}")
    if args.beta < 1:
        bad("--beta", f"expected >= 1 (Eq. 8: lambda0 / beta^q; 1 = no decay), got {args.beta}")
    for flag in ("lr", "weight_decay", "grad_clip", "theta", "mlm_prob", "lambda0", "gamma", "beta",
                 "important_fraction", "long_tail_percentile", "word_percentile", "route_ratio", "route_threshold"):
        v = getattr(args, flag)
        if v is not None and not np.isfinite(v):  # nan passes every comparison below
            bad("--" + flag.replace("_", "-"), f"expected a finite number, got {v}")
    if args.lr <= 0:
        bad("--lr", f"expected > 0, got {args.lr}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        bad("--weight-decay/--grad-clip", f"expected non-negative values, got {args.weight_decay}, {args.grad_clip}")
    if args.resume and args.overwrite:
        bad("--resume/--overwrite", "pass one: --resume continues the run in --output-dir, --overwrite deletes it")
    if args.method != "trelm":
        for flag in ("no_injection", "no_memory_bank", "no_routing"):
            if getattr(args, flag):
                bad("--" + flag.replace("_", "-"), f"is a TRELM ablation; not valid with --method {args.method}")
        if args.long_tail_words:
            bad("--long-tail-words", f"adds memory-bank keys (TRELM only); not valid with --method {args.method}")
    row = METHOD_TABLE[args.method]
    if args.injection is None:
        args.injection = row.injection
    elif args.method == "mlm" and args.injection != "none":
        bad("--injection", "--method mlm injects nothing; use --method trelm or dkplm")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.method)
    warmup_given = args.warmup_steps is not None
    if not warmup_given:
        args.warmup_steps = max(1, int(0.06 * args.max_steps))
    checkpoint.resolve_extension(args, warmup_given)
    args.memory_bank = row.bank and not args.no_memory_bank and not args.no_injection and args.injection != "none"
    args.routing = row.routing and not args.no_routing
    return Config().replace(**vars(args))


# -----------------------------------------------------------------------------
# A micro-batch's knowledge plan and the model wrapper (everything that needs gradients happens
# inside KnowledgeMLM.forward, so DDP sees it)

@dataclass(frozen=True)
class WordNotes:
    """The long-tail words of one micro-batch (--long-tail-words; Sec. 3.2, 3.4): N occurrences.

    rows, cols (N,): every position of a long-tail word in the original text, outside linked mention
    spans; key (N,): its memory-bank key, num_entities + token id (never an entity's key);
    shown (N,) bool: the word is visible in the input (not masked or replaced by MLM), where Eq. 7
    mixes its memory into E_p; mem (local (N, H), global (N, H)): the memory read before the step.
    Every occurrence updates the memory after the forward (Eq. 4-6), shown or not."""
    rows: torch.Tensor
    cols: torch.Tensor
    key: torch.Tensor
    shown: torch.Tensor
    mem: Optional[tuple] = None

    def head(self, n):
        keep = self.rows < n  # (N,)
        return WordNotes(self.rows[keep], self.cols[keep], self.key[keep], self.shown[keep],
                         None if self.mem is None else tuple(m[keep] for m in self.mem))

    def tile(self, c, batch_size):
        shift = torch.arange(c, device=self.rows.device).repeat_interleave(len(self.rows))  # (c*N,)
        rep = lambda t: t.repeat(c, *([1] * (t.dim() - 1)))
        return WordNotes(self.rows.repeat(c) + shift * batch_size, rep(self.cols), rep(self.key), rep(self.shown),
                         None if self.mem is None else tuple(rep(m) for m in self.mem))


@dataclass(frozen=True)
class Plan:
    """What one micro-batch injects: S selected mentions and their P span positions.

    rows, cols (P,): input position of each injected token; mention (P,): which of the S mentions
    it belongs to; targets (P,): the entity's original token there (what CKA / DKPLM decode);
    ent_id (S,), sel (S,): the mentions' KG entities and their index among the batch's M mentions;
    h_e (S, H) or None: the span input before Eq. 7 when fixed (--no-injection: the mask
    embedding), None: h_e = E(t) - E(r), built in forward() so it stays differentiable;
    negatives (P, K): CKA's draws from Q; mem (local (S, H), global (S, H)), lam, match_norm: Eq. 7;
    words: the long-tail words (--long-tail-words), mixed with the same lam and match_norm. A batch
    with long-tail words and no injected entity has a plan with S = P = 0.
    """
    rows: torch.Tensor
    cols: torch.Tensor
    mention: torch.Tensor
    targets: torch.Tensor
    ent_id: torch.Tensor
    sel: torch.Tensor
    h_e: Optional[torch.Tensor] = None
    negatives: Optional[torch.Tensor] = None
    mem: Optional[tuple] = None
    lam: float = 0.0
    match_norm: bool = True
    words: Optional[WordNotes] = None

    def head(self, n):
        """The plan restricted to the first n sequences (per-mention tensors stay whole)."""
        keep = self.rows < n  # (P,)
        return replace(self, rows=self.rows[keep], cols=self.cols[keep], mention=self.mention[keep],
                       targets=self.targets[keep], negatives=None if self.negatives is None else self.negatives[keep],
                       words=None if self.words is None else self.words.head(n))

    def tile(self, c, batch_size):
        """The plan of the batch (batch_size sequences) repeated c times along the batch dimension."""
        if c == 1:
            return self
        P, S = len(self.rows), len(self.ent_id)
        shift = torch.arange(c, device=self.rows.device).repeat_interleave(P)  # (c*P,) copy index
        rep = lambda t: None if t is None else t.repeat(c, *([1] * (t.dim() - 1)))
        return replace(self, rows=self.rows.repeat(c) + shift * batch_size, cols=self.cols.repeat(c),
                       mention=self.mention.repeat(c) + shift * S, targets=self.targets.repeat(c),
                       ent_id=self.ent_id.repeat(c), sel=self.sel.repeat(c), h_e=rep(self.h_e),
                       negatives=rep(self.negatives), mem=None if self.mem is None else tuple(rep(m) for m in self.mem),
                       words=None if self.words is None else self.words.tile(c, batch_size))


def relation_decoding_loss(mlm, hidden, targets, relation):
    """DKPLM's relation-conditioned decoding of the entity tokens: the full-softmax MLM head on
    h * r_hat, r_hat = E(r) / rms(E(r)) (DKPLM multiplies the output by its projected relation
    embedding; here E(r) is rescaled to unit RMS instead of learning a projection, so no new
    parameters). hidden (P, H), targets (P,), relation (P, H) -> scalar; P = 0 gives an attached 0."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    r_hat = relation * torch.rsqrt(relation.pow(2).mean(-1, keepdim=True).clamp(min=1e-12))  # (P, H)
    return F.cross_entropy(common.mlm_logits(mlm, hidden * r_hat.to(hidden.dtype)).float(), targets)


def cka_decoding(net, h_span, targets, plan):
    """Eq. (2): CKA's sampled softmax of each injected token against its K negatives from Q."""
    negatives = plan.negatives if plan is not None else targets.new_zeros(0, 0)
    return cka_loss(net.mlm, h_span, targets, negatives)


def relation_decoding(net, h_span, targets, plan):
    """DKPLM: relation-conditioned full-softmax decoding (relation_decoding_loss)."""
    relation = h_span if plan is None else \
        net.injector.relation_embed(net.mlm.get_input_embeddings().weight, plan.ent_id)[plan.mention]  # (P, H)
    return relation_decoding_loss(net.mlm, h_span, targets, relation)


# Method.decoding -> (loss name, fn(net, h_span (P, H), targets (P,), plan or None) -> scalar)
DECODERS = {"cka": ("l_cka", cka_decoding), "relation": ("l_dec", relation_decoding)}
# Method.loss -> fn(l_mlm, l_decoding, theta): Eq. (3) for TRELM; DKPLM's code sums its two losses
LOSSES = {"theta": total_loss, "sum": lambda l_mlm, l_dec, theta: l_mlm + l_dec}


class KnowledgeMLM(torch.nn.Module):
    """Masked LM + knowledge injection + MLM / CKA / entity-decoding losses in one forward.
    decoding and loss: a Method's (METHOD_TABLE)."""

    def __init__(self, mlm, injector=None, decoding="none", loss="mlm"):
        super().__init__()
        self.mlm = mlm
        self.injector = injector
        self.decoding, self.loss = decoding, loss

    def inputs(self, input_ids, plan):
        """(B, T, H) encoder input: E_p, and Eq. (7) at the injected spans and the shown long-tail words."""
        emb = self.mlm.get_input_embeddings()
        x = emb(input_ids)  # (B, T, H)
        if plan is None:
            return x
        h_e = plan.h_e if plan.h_e is not None else self.injector.embed(emb.weight, plan.ent_id)  # (S, H)
        x = span_input(x, plan.rows, plan.cols, plan.mention, h_e, plan.mem, plan.lam, plan.match_norm)  # Eq. (7)
        w = plan.words
        if w is not None:  # Eq. (7) at the shown long-tail words, their own embedding E_p in the place of h_e
            r, c = w.rows[w.shown], w.cols[w.shown]
            mem = (w.mem[0][w.shown], w.mem[1][w.shown])
            x = span_input(x, r, c, torch.arange(len(r), device=x.device), x[r, c], mem, plan.lam, plan.match_norm)
        return x

    def forward(self, input_ids, attention_mask, mlm_labels, plan=None, theta=0.5, return_hidden=False):
        hidden = self.mlm.base_model(inputs_embeds=self.inputs(input_ids, plan),
                                     attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        sel = mlm_labels != -100
        out = {"l_mlm": F.cross_entropy(common.mlm_logits(self.mlm, hidden[sel]).float(), mlm_labels[sel])
               if sel.any() else hidden.sum() * 0.0}
        out["loss"] = out["l_mlm"]
        if self.decoding != "none":  # every batch, with or without injected spans (an empty one adds 0)
            rows, cols = (plan.rows, plan.cols) if plan is not None else (input_ids[:0, 0], input_ids[:0, 0])
            targets = plan.targets if plan is not None else rows
            name, decode = DECODERS[self.decoding]
            out[name] = decode(self, hidden[rows, cols], targets, plan)
            out["loss"] = LOSSES[self.loss](out["l_mlm"], out[name], theta)
        if return_hidden:
            out["hidden"] = hidden  # (B, T, H) the memory bank reads it detached; routing's P_x needs its graph
        return out


def response_prob(mlm, hidden, labels, plan):
    """P_x of Eq. (9) from a forward's last hidden states (B, T, H): the probability of the correct CKA
    response at each injected span token (cka.cka_response_prob); a batch without one: of the masked
    tokens' MLM labels (B, T)."""
    if plan is not None and len(plan.rows):
        return cka_response_prob(mlm, hidden[plan.rows, plan.cols], plan.targets, plan.negatives)
    sel = labels != -100
    return common.mlm_logits(mlm, hidden[sel]).softmax(-1).gather(1, labels[sel, None])[:, 0]


def knowledge_prob(net, batch, plan, repeat=1):
    """P_x of Eq. (9) for a batch tiled `repeat` times along dim 0 (the alpha steps of integrated
    gradients stacked, routing.ffn_attributions)."""
    b = {k: v.repeat(repeat, 1) for k, v in batch.items()}
    tiled = None if plan is None else plan.tile(repeat, batch["input_ids"].shape[0])
    h = net(b["input_ids"], b["attention_mask"], b["mlm_labels"], tiled, return_hidden=True)["hidden"]
    return response_prob(net.mlm, h, b["mlm_labels"], tiled)


def path_jaccard(a, b):
    """Mean over layers of |a_l & b_l| / |a_l | b_l| (path stability between two routings; 1 for two
    empty paths)."""
    scores = []
    for x, y in zip(a, b):
        x, y = set(x.tolist()), set(y.tolist())
        scores.append(len(x & y) / len(x | y) if x | y else 1.0)
    return sum(scores) / len(scores)


def lr_at(step, args):
    """Linear warm-up to --lr, then linear decay to 0 at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))


def make_optimizer(params, args):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


# -----------------------------------------------------------------------------
# The knowledge side of a run (Sec. 3.1-3.2)

@contextmanager
def rank0_first(ddp, master):
    """Rank 0 runs the block first (it writes a cache), the other ranks after it (they read it)."""
    if ddp and not master:
        dist.barrier()
    yield
    if ddp and master:
        dist.barrier()


class Knowledge:
    """Which mentions of a micro-batch get knowledge injected, with what targets, negatives and memory
    (plan), and the memory-bank update after the forward (observe). Holds the corpus-level state:
    entity frequency and long-tail (Sec. 3.1), SI(e) of every candidate mention as a column of the
    dataset `ds` and the "important" threshold (Eq. 1), Q (Eq. 2), the memory bank (Sec. 3.2)."""

    def __init__(self, args, method, kg, tok, ds, mlm, device, ddp, master):
        self.args, self.kg, self.tok, self.ds, self.device = args, kg, tok, ds, device
        self.ddp, self.master = ddp, master
        self.group = dist.group.WORLD if ddp else None
        self.injector = self.sampler = self.bank = self.long_tail_word = None
        self.si_threshold = self.degree = self.si_candidate = None
        self.si_epoch = 0  # the epoch whose model scored SI (0: the initial model; --si-refresh moves it)
        if args.injection != "none":
            self.injector = KnowledgeInjector(kg, tok, seed=args.seed)
            self.freq = data.mention_counts(ds, kg.num_entities)  # batched pass over the Arrow column
            self.long_tail = torch.as_tensor(long_tail_mask(self.freq, args.long_tail_percentile, inclusive=True))
            if args.injection in ("important", "dkplm"):  # SI once over the corpus (Sec. 3.4), initial model
                self.si_candidate = self.long_tail.numpy() & self.injector.has_knowledge.numpy()  # (E,)
                self.set_si(self.corpus_si(mlm))
            if args.injection == "dkplm":
                self.degree = kg_degree(kg.triples, kg.num_entities)
        if method.sampler and args.injection != "none":
            self.sampler = NegativeSampler(label_token_counts(kg, tok, len(tok)))
        if args.memory_bank:
            self.bank = MemoryBank(mlm.config.hidden_size, window_k=args.window_k, gamma=args.gamma,
                                   dtype=torch.bfloat16 if args.memory_dtype == "bf16" else torch.float32,
                                   device=args.memory_device, context_only=args.memory_window == "context")
        if args.long_tail_words and args.memory_bank:  # once over the corpus (Sec. 3.4), like entity frequency
            self.plain = data.plain_tokens(tok).to(device)  # (V,)
            self.word_freq = data.word_counts(ds, self.plain.cpu())  # (V,)
            lt = long_tail_mask(self.word_freq, args.word_percentile, inclusive=True) & (self.word_freq >= args.word_min_count)
            self.long_tail_word = torch.as_tensor(lt).to(device)  # (V,) bool

    # -- one micro-batch ---------------------------------------------------------------

    @torch.no_grad()
    def plan(self, batch, g, E, epoch):
        """Sec. 3.1-3.2 for one micro-batch -> Plan, or None when it injects nothing: the mentions to
        inject (Fig. 3 strategies; SI from the corpus column), their span positions and decoding targets,
        CKA negatives from Q (drawn with g), the long-tail words, and the memory read for all of them
        with Eq. (8)'s lambda at `epoch`. E: the input embedding table (V, H). Collective under DDP
        (the bank's ensure): every rank calls it, with or without mentions."""
        a = self.args
        spans = self.spans(batch)  # (rows, cols, mention, targets, ent_id, sel) or None
        negatives = None
        if spans is not None and self.sampler is not None:
            negatives = self.sampler.sample(spans[3].cpu(), a.negatives, generator=g).to(self.device)  # (P, K)
        words = self.words(batch) if self.long_tail_word is not None else None  # (rows, cols, key, shown)
        if spans is None and words is None:
            self.read_memory(None, None, E)  # a collective: this rank joins with no keys
            return None
        if spans is None:  # long-tail words and no injected entity: an empty entity plan
            z = torch.zeros(0, dtype=torch.long, device=self.device)
            spans = (z, z, z, z, z, z)
            negatives = None if self.sampler is None else z.new_zeros(0, a.negatives)
        rows, cols, mention, targets, ent_id, sel = spans
        mem, word_mem = self.read_memory(spans, words, E)
        return Plan(rows, cols, mention, targets, ent_id=ent_id, sel=sel, negatives=negatives, mem=mem,
                    h_e=E[self.tok.mask_token_id].expand(len(sel), -1) if a.no_injection else None,  # ablation
                    lam=self.lam(epoch), match_norm=a.memory_scale == "embedding",
                    words=None if words is None else WordNotes(*words, mem=word_mem))

    def spans(self, batch):
        """The mentions --injection selects -> (rows, cols, mention (P,), targets (P,) the entity's own
        tokens, ent_id (S,), sel (S,)), or None."""
        eid = batch["ent_id"]
        if self.injector is None or len(eid) == 0:
            return None
        sel = select_mentions(self.args.injection, eid, self.long_tail, si=batch.get("ent_si"),
                              si_threshold=self.si_threshold, eligible=self.injector.injectable(eid),
                              ent_batch=batch["ent_batch"], degree=self.degree)
        if not sel.any():
            return None
        m = sel.nonzero()[:, 0]
        rows, cols, mention, _ = span_positions(batch["ent_batch"][m], batch["ent_start"][m], batch["ent_end"][m])
        return rows, cols, mention, batch["orig_ids"][rows, cols], eid[m], m

    def words(self, batch):
        """The batch's long-tail words (--long-tail-words) -> (rows, cols, key, shown) (N,) each, or None.
        Words are read from the original text (orig_ids), outside every linked mention span."""
        ids = batch["orig_ids"]  # (B, T)
        word = data.whole_words(ids, batch["word_start"], self.plain) & self.long_tail_word[ids]
        word &= batch["attention_mask"].bool()
        # an entity's tokens are its own key's, never a word's
        word &= ~data.span_mask(batch["ent_batch"], batch["ent_start"], batch["ent_end"], ids.shape)
        r, c = word.nonzero(as_tuple=True)  # (N,)
        if len(r) == 0:
            return None
        return r, c, ids[r, c] + self.kg.num_entities, batch["input_ids"][r, c] == ids[r, c]

    def read_memory(self, spans, words, E):
        """Eq. (7)'s inputs: the (local, global) memory of the S injected mentions and the N long-tail
        words -> (mem (S, H) pairs or None, word mem (N, H) pairs or None). Keys new to the bank are
        added first (ensure: collective), initialised with h_e = E(t) - E(r) (--memory-init knowledge)
        or the mean embedding of the mention's own tokens (entity); a word with its own embedding."""
        if self.bank is None:
            return None, None
        z = torch.zeros(0, dtype=torch.long, device=self.device)
        keys = spans[4] if spans is not None else z
        init = self.memory_init(spans, E) if spans is not None else torch.zeros(0, E.shape[1], device=self.device)
        if words is not None:
            keys = torch.cat([keys, words[2]])
            init = torch.cat([init, E.detach()[words[2] - self.kg.num_entities].float()])
        self.bank.ensure(keys, init, process_group=self.group)
        if spans is None and words is None:
            return None, None
        mem = tuple(t.to(self.device) for t in self.bank.read(keys))
        S = len(spans[4])
        return tuple(m[:S] for m in mem), (None if words is None else tuple(m[S:] for m in mem))

    def memory_init(self, spans, E):
        """(S, H) initial local memory of the spans' keys (Sec. 3.2, --memory-init)."""
        rows, cols, mention, targets, ent_id, _ = spans
        if self.args.memory_init == "knowledge":
            return self.injector.embed(E, ent_id).float()
        S = len(ent_id)
        total = torch.zeros(S, E.shape[1], device=E.device).index_add_(0, mention, E[targets].float())
        return total / torch.bincount(mention, minlength=S)[:, None]

    @torch.no_grad()
    def observe(self, batch, hidden):
        """Local (Eq. 4-5) and global (Eq. 6) memory from this forward's last layer hidden (B, T, H),
        for every mention of an entity in the bank ("an entity e present in both sentence x and M"),
        injected or not, and every occurrence of a long-tail word. No bank: nothing."""
        if self.bank is None:
            return
        seen = self.bank.contains(batch["ent_id"])  # (M,)
        rows, start, end, keys = (batch[k][seen] for k in ("ent_batch", "ent_start", "ent_end", "ent_id"))
        words = batch["plan"].words if batch["plan"] is not None else None
        if words is not None:  # every occurrence of a long-tail word, shown or masked: a span of one token
            rows, start = torch.cat([rows, words.rows]), torch.cat([start, words.cols])
            end, keys = torch.cat([end, words.cols + 1]), torch.cat([keys, words.key])
        self.bank.observe(hidden.detach().float(), batch["attention_mask"], rows, start, end, keys,
                          process_group=self.group)

    def lam(self, epoch):
        """Eq. (8): lambda_q = lambda0 / beta^q, q the integer epoch (--lambda-q epoch) or fractional; 0
        without a memory bank (nothing is mixed)."""
        if self.bank is None:
            return 0.0
        return MemoryBank.lambda_at(math.floor(epoch) if self.args.lambda_q == "epoch" else epoch,
                                    self.args.lambda0, self.args.beta)

    # -- SI over the corpus (Eq. 1) ------------------------------------------------------

    def corpus_si(self, mlm, ds=None):
        """ds (default self.ds) with SI(e) (Eq. 1) of every candidate mention by mlm (the initial model,
        or the current one under --si-refresh; entity_importance.si_column: batched, cached by
        fingerprint; rank 0 first under DDP)."""
        a = self.args
        W = mlm.get_input_embeddings().weight
        key = f"{a.model}|{tuple(W.shape)}|{float(W.detach().double().sum()):.10e}"
        with rank0_first(self.ddp, self.master):
            return si_column(self.ds if ds is None else ds, mlm.to(self.device), self.tok.mask_token_id,
                             window=a.si_window or None, num_proc=a.num_proc, fingerprint=key, only=self.si_candidate)

    def set_si(self, ds):
        """Take ds (the corpus with an ent_si column) and the corpus-level "important" threshold of its SI."""
        self.ds = ds
        ent, si = data.flat_column(ds, "ent_id", np.int64), data.flat_column(ds, "ent_si", np.float64)
        self.si_threshold = important_threshold(si, self.si_candidate[ent], self.args.important_fraction)

    def refresh_si(self, mlm, epoch, step):
        """--si-refresh N: at the start of every N-th epoch, SI(e) of the corpus's candidates again with
        the current model, and a new threshold (Sec. 3.4 identifies important entities once, "throughout
        the corpus"; whether the initial model's ranking should be kept is our decision, docs/departures.md)."""
        n, q = self.args.si_refresh, math.floor(epoch)
        if not n or self.si_candidate is None or q < self.si_epoch + n:
            return
        before = data.flat_column(self.ds, "ent_si", np.float64) >= self.si_threshold
        self.set_si(self.corpus_si(mlm, self.ds.remove_columns("ent_si")))
        self.si_epoch = q - q % n
        after = data.flat_column(self.ds, "ent_si", np.float64) >= self.si_threshold
        if self.master:
            print(f"SI refreshed at epoch {self.si_epoch} (step {step}): {int(after.sum())} important mentions, "
                  f"Jaccard {(before & after).sum() / max(1, (before | after).sum()):.3f} with the previous set",
                  file=sys.stderr, flush=True)

    # -- checkpoint state and census ------------------------------------------------------

    def state_dict(self):
        return {"bank": self.bank.state_dict() if self.bank is not None else None,
                "si": None if not self.si_epoch else
                {"epoch": self.si_epoch, "values": data.flat_column(self.ds, "ent_si", np.float32)}}

    def load_state_dict(self, st):
        """The bank, and the SI column a refresh before the checkpoint computed (its model is gone)."""
        if self.bank is not None:
            self.bank.load_state_dict(st["bank"])
        if not st.get("si"):
            return
        self.si_epoch = st["si"]["epoch"]
        counts = np.concatenate([pc.list_value_length(b["ent_id"]).to_numpy(zero_copy_only=False)
                                 for b in self.ds.with_format("arrow").iter(batch_size=1 << 16)])  # (rows,)
        rows = [x.tolist() for x in np.split(st["si"]["values"].astype(np.float64), np.cumsum(counts)[:-1])]
        self.set_si(self.ds.remove_columns("ent_si").add_column("ent_si", rows))

    def census(self):
        """Over the whole corpus: sequences, linked mentions, entities linked, and the mentions --injection
        may inject (entity has a KG triple and is in the strategy's pool, entity_pool)."""
        c = {"sequences": len(self.ds)}
        if self.injector is None:
            return c
        freq = torch.as_tensor(self.freq)  # (N_e,) linked mentions per entity
        ok = self.injector.injectable(torch.arange(len(freq))) & entity_pool(self.args.injection, self.long_tail)
        c.update(mentions=int(freq.sum()), entities_linked=int((freq > 0).sum()), entities=len(freq),
                 injectable_mentions=int(freq[ok].sum()))
        if self.long_tail_word is not None:  # --long-tail-words: word keys and their occurrences
            lt = self.long_tail_word.cpu().numpy()
            c.update(long_tail_words=int(lt.sum()), long_tail_word_occurrences=int(self.word_freq[lt].sum()))
        return c

    def counts(self, batch, plan):
        """Per-micro-batch statistics for metrics.jsonl."""
        c = {"injected": 0 if plan is None else len(plan.sel), "mentions": len(batch["ent_id"])}
        if self.long_tail_word is not None:  # long-tail word positions whose input Eq. 7 mixed
            c["words_mixed"] = 0 if plan is None or plan.words is None else int(plan.words.shown.sum())
        return c


# -----------------------------------------------------------------------------
# The training run

def process_group_backend(use_cuda):
    """The DDP process group's backend: on GPU nccl for CUDA tensors and gloo for CPU tensors (the
    memory bank lives on the CPU by default, --memory-device); nccl alone serves no CPU tensor."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def setup_process(device):
    """-> (ddp, rank, world, torch.device): torchrun's environment (RANK set) starts DDP."""
    if int(os.environ.get("RANK", -1)) == -1:
        want = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return False, 0, 1, torch.device(want)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group(backend=process_group_backend(use_cuda))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    else:  # share the cores between the local processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return True, dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu")


class Trainer:
    """One process of a pre-training run: data, knowledge (Knowledge), model, routing, optimizer."""

    OPERATIONAL = checkpoint.OPERATIONAL

    def __init__(self, args):
        self.ddp, self.rank, self.world, self.device = setup_process(args.device)
        self.master = self.rank == 0
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        common.seed_everything(args.seed + self.rank)
        mlm, self.tok = common.load_mlm(args.model)
        if self.tok.mask_token_id is None or self.tok.pad_token_id is None:
            raise SystemExit(f"--model {args.model}: tokenizer has no mask or pad token; a masked LM is required")
        self.warmup_reason = None  # a trained head routes from step 0; routing would freeze a random one
        if args.route_warmup is None:
            fresh = getattr(mlm, "fresh_mlm_head", False)
            args = args.replace(route_warmup=args.route_every if fresh else 0)
            self.warmup_reason = "fresh MLM head" if fresh and args.routing else None
        self.args = args
        kg_dir, corpus = data.resolve_data(args.data)
        kg = data.load_kg(kg_dir)
        with rank0_first(self.ddp, self.master):  # rank 0 tokenizes first; the others read its Arrow cache
            ds = data.build_dataset(corpus, kg, self.tok, args.seq_len, os.path.join(args.output_dir, "data_cache"),
                                    args.num_proc)
        self.collate = data.MLMCollator(self.tok, args.mlm_prob, args.whole_word_mask)
        self.global_batch = args.batch_size * args.grad_accum * self.world
        method = METHOD_TABLE[args.method]
        self.know = Knowledge(args, method, kg, self.tok, ds, mlm, self.device, self.ddp, self.master)
        self.net = KnowledgeMLM(mlm, self.know.injector, method.decoding, method.loss).to(self.device)
        self.router, self.paths = None, None  # routing.Router and its knowledge paths, from --route-warmup on
        self.step, self.elapsed, self.saved_step = 0, 0.0, None  # saved_step: the checkpoint on disk, if any
        self.optimizer = make_optimizer(self.net.parameters(), args)
        self.wrap()

    def wrap(self):
        """The DDP wrapper over what trains now (built again when routing changes that set)."""
        self.model = None  # the previous wrapper goes before the next registers its gradient hooks
        gc.collect()
        self.model = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.ddp else self.net

    # -- one step ------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step (Sec. 3.4, the module docstring's steps 1-6)."""
        a = self.args
        if a.routing and self.router is None and self.step >= a.route_warmup:
            self.start_routing()  # Eq. (12): from here on the scope's parameters train
        self.know.refresh_si(self.net.mlm, self.epoch_fraction(), self.step)
        self.net.train()  # dropout on (from_pretrained returns the model in eval mode)
        stats = {}
        for micro in range(a.grad_accum):
            batch = self.get_batch(micro)  # steps 1-2: masking, mentions, knowledge plan (memory read)
            routes = micro == 0 and self.routes_now()
            first_order = routes and a.ig_form == "first-order" and a.route_select == "attr"
            out = self.forward(batch, micro, keep_acts=first_order)  # step 3
            if routes:
                self.route(batch, out)  # step 4: Eq. (9)-(12), the paths this step's backward trains
            (out["loss"] / a.grad_accum).backward()  # step 5
            self.know.observe(batch, out["hidden"])  # step 5: Eq. (4)-(6)
            for k in [k for k in out if k.startswith("l_")] + ["loss"]:
                stats[k] = stats.get(k, 0.0) + float(out[k].detach()) / a.grad_accum
            for k, v in self.know.counts(batch, batch["plan"]).items():
                stats[k] = stats.get(k, 0) + v
            stats["tokens"] = stats.get("tokens", 0) + int(batch["attention_mask"].sum()) * self.world
        stats["lambda"] = self.know.lam(self.memory_epoch())  # Eq. (8)
        stats["lr"] = self.optimizer_step()  # step 6
        return stats

    def get_batch(self, micro):
        """Micro-batch `micro` of this step on this rank, with its knowledge plan (batch["plan"]).
        Masking and negatives are a function of (seed, step, slot in the global batch), whatever the layout."""
        a = self.args
        idx = data.micro_batch_indices(self.step, micro, self.rank, len(self.know.ds), a.batch_size, a.grad_accum,
                                       self.world, a.seed)
        rows = self.know.ds[idx]
        examples = [dict(zip(rows, v)) for v in zip(*rows.values())]
        seed = np.random.SeedSequence([a.seed, self.step, micro * self.world + self.rank]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        batch = self.collate(examples, g)
        if "ent_si" in rows:  # (M,) in the collator's mention order
            batch["ent_si"] = torch.tensor([v for e in examples for v in e["ent_si"]], dtype=torch.float32)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        plan = self.know.plan(batch, g, self.net.mlm.get_input_embeddings().weight, self.memory_epoch())
        if plan is not None:  # injected positions are scored by the decoding loss, not L_MLM
            batch["mlm_labels"] = batch["mlm_labels"].clone()
            batch["mlm_labels"][plan.rows, plan.cols] = -100
        batch["plan"] = plan
        return batch

    def forward(self, batch, micro, keep_acts=False):
        """The loss of micro-batch `micro`; under DDP gradients are synchronised on the last one only.
        keep_acts: out["acts"] = the FFN activations of this forward (first-order attribution)."""
        sync = micro == self.args.grad_accum - 1
        with (self.model.no_sync() if isinstance(self.model, DDP) and not sync else nullcontext()), self.autocast, \
                (routing.capture_ffn_acts(self.net.mlm) if keep_acts else nullcontext()) as acts:
            out = self.model(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], batch["plan"],
                             theta=self.args.theta, return_hidden=True)
        out["acts"] = acts
        if not torch.isfinite(out["loss"]):
            raise self.non_finite(f"loss {out['loss'].item()} (micro-batch {micro})")
        return out

    def optimizer_step(self):
        """Clip, step at this step's learning rate, zero the gradients -> the learning rate."""
        a, lr = self.args, lr_at(self.step, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], a.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    # -- routing (Sec. 3.3) -------------------------------------------------------------------

    def routes_now(self):
        a = self.args
        return self.router is not None and (self.paths is None or self.step % a.route_every == 0)

    def start_routing(self):
        """From --route-warmup on, only the --route-scope parameters train, the FFN weights only at the
        knowledge paths (routing.Router); AdamW's moments carry over into moments for every FFN neuron,
        stepped only where selected (routing.from_adamw)."""
        a = self.args
        self.router = routing.Router(self.net.mlm, a.route_scope, a.train_layernorm, a.train_head_bias)
        self.optimizer = routing.from_adamw(self.optimizer, self.router)
        self.wrap()

    def route(self, batch, out):
        """Eq. (9)-(12): the knowledge paths of this and the next --route-every - 1 steps: the top
        --route-ratio FFN neurons of each layer by attribution, all-reduced over ranks (identical paths
        everywhere), or as many drawn at random (--route-select random). One line to routing.jsonl."""
        a, t0, old = self.args, time.time(), self.paths
        if a.route_select == "random":
            L, I = len(self.router.sizes), self.router.sizes[0]
            paths = routing.random_paths(L, I, max(1, round(a.route_ratio * I)), a.seed, self.step)
        else:
            attr = self.attribute(batch, out)  # (L, I) on the compute device
            if self.ddp:
                dist.all_reduce(attr)
            paths = routing.select_paths(attr, ratio=a.route_ratio, threshold=a.route_threshold)
        self.paths = [p.cpu() for p in paths]
        self.router.set_paths(self.paths)
        self.log_routing({"step": self.step, "attr_s": round(time.time() - t0, 3), "selected": [len(p) for p in paths],
                          "jaccard_prev": None if old is None else round(path_jaccard(old, self.paths), 4)})

    def attribute(self, batch, out):
        """Eq. (9)-(11), --ig-form: first-order on this step's forward (out: its FFN activations and
        hidden states); the integrated-gradient forms on the first --ig-batch sequences, in eval mode."""
        a, plan = self.args, batch["plan"]
        if a.ig_form == "first-order":
            with self.autocast:
                S = response_prob(self.net.mlm, out["hidden"], batch["mlm_labels"], plan).sum()
            return routing.first_order_attributions(out["acts"], S)
        n = min(a.ig_batch or batch["input_ids"].shape[0], batch["input_ids"].shape[0])
        head = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "mlm_labels")}
        plan = None if plan is None else plan.head(n)
        positions = None
        if a.ig_form == "target":  # where P_x is defined: the CKA targets, else the masked tokens
            positions = (plan.rows, plan.cols) if plan is not None and len(plan.rows) else \
                (head["mlm_labels"] != -100).nonzero(as_tuple=True)
        self.net.eval()
        with self.autocast:
            attr = routing.ffn_attributions(self.net.mlm, lambda _, c=1: knowledge_prob(self.net, head, plan, c),
                                            steps=a.ig_steps, chunk=a.ig_chunk, form=a.ig_form,
                                            memory_mb=a.ig_memory_mb, positions=positions)
        self.net.train()
        return attr

    def log_routing(self, rec):
        """Rank 0 appends rec to <output-dir>/routing.jsonl."""
        if self.master:
            with open(os.path.join(self.args.output_dir, "routing.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- checkpoints (checkpoint.py) ------------------------------------------------------------

    def save(self, name, training_state=True):
        """<output-dir>/<name>/: model + tokenizer [+ training_state.pt: everything --resume needs]."""
        rngs = checkpoint.rng_states(self.device, self.ddp, self.world) if training_state else None  # collective
        if self.master:
            st = None if not training_state else {
                "step": self.step, "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict(), "rng": rngs,
                "config": vars(self.args), "commit": common.git_commit(), "world": self.world,
                "global_batch": self.global_batch, "threads": torch.get_num_threads(), "paths": self.paths,
                **self.know.state_dict()}
            checkpoint.save(self.args.output_dir, name, self.net.mlm, self.tok, st)
        if training_state:
            self.saved_step = self.step

    def resume(self):
        """Continue exactly from <output-dir>'s checkpoint -> the run's recorded --max-steps."""
        a = self.args
        st, ck = checkpoint.find_checkpoint(a.output_dir)
        diff = checkpoint.differences(st, a, self.world, self.global_batch, a.deterministic)
        if diff:
            raise SystemExit(f"--resume: {ck} was written by a different run; a resumed run must be the same run "
                             f"(start a new --output-dir, or --overwrite this one). Differences: " + ", ".join(diff))
        checkpoint.load_weights(self.net.mlm, ck)
        self.step, self.elapsed, self.paths = st["step"], st["elapsed"], st["paths"]
        self.saved_step = self.step
        self.know.load_state_dict(st)
        if self.paths is not None:  # routed: the optimizer is the routed one
            self.start_routing()
            self.router.set_paths(self.paths)
        self.optimizer.load_state_dict(st["optimizer"])
        checkpoint.restore_rng(st["rng"][self.rank], self.device)
        checkpoint.promote(a.output_dir, ck, self.ddp, self.master)
        return st["config"]["max_steps"]

    def non_finite(self, what):
        """The one error for a non-finite value in a step: the step as metrics.jsonl counts it (from 1),
        and what is on disk."""
        a = self.args
        ck = os.path.join(a.output_dir, "checkpoint")
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {ck}" if self.saved_step is not None
                else f"no checkpoint was written (--save-every {a.save_every})")
        return FloatingPointError(f"non-finite {what} at step {self.step + 1}; {kept}. "
                                  f"A lower --lr (now {a.lr}) or --grad-clip may help.")

    def epoch_fraction(self):
        """Epochs of data seen so far (fractional)."""
        return self.step * self.global_batch / len(self.know.ds)

    def memory_epoch(self):
        """Eq. (8)'s epoch: the real one, or --lambda-epochs * the fraction of the run done."""
        a = self.args
        return a.lambda_epochs * self.step / a.max_steps if a.lambda_epochs else self.epoch_fraction()


def start_logs(t, record):
    """After the resume is validated, never before: a fresh run starts fresh logs; a resumed one drops
    the lines written after its checkpoint (checkpoint.trim_log) and records the resume (and an
    extension of --max-steps) in config.json."""
    a, out = t.args, t.args.output_dir
    if not a.resume:
        for name in checkpoint.LOGS:  # a run that died before its first checkpoint left them
            open(os.path.join(out, name), "w").close()
        if t.warmup_reason:
            t.log_routing({"step": 0, "warmup": a.route_warmup, "reason": t.warmup_reason})
        return record
    checkpoint.trim_log(os.path.join(out, "metrics.jsonl"), t.step)
    checkpoint.trim_log(os.path.join(out, "routing.jsonl"), t.step - 1)
    previous = json.load(open(os.path.join(out, "config.json"))) if os.path.exists(os.path.join(out, "config.json")) else {}
    record["commit"] = previous.get("commit", record["commit"])  # the run's first commit; each resume's below
    record["resumed"] = previous.get("resumed", []) + [{"step": t.step, "commit": common.git_commit()}]
    old_max = previous.get("config", {}).get("max_steps", a.max_steps)
    if a.max_steps != old_max:
        record["resumed"][-1]["max_steps"] = [old_max, a.max_steps]
    return record


def train(args):
    checkpoint.prepare_output_dir(args)
    if args.deterministic:
        make_deterministic()
    t = Trainer(args)
    a = t.args
    census = t.know.census()
    if t.know.injector is not None and census["injectable_mentions"] == 0:
        raise SystemExit(f"pretrain.py: --method {a.method} --injection {a.injection}: nothing can be injected: "
                         f"{census['mentions']} linked mentions of {census['entities_linked']} entities in --data "
                         f"{a.data}, none with a KG triple that --injection {a.injection} selects. Link entities "
                         f"(corpus.jsonl \"entities\" or KG aliases that occur in the text), or use --method mlm")
    if a.resume:
        old_max = t.resume()
        if old_max != a.max_steps and t.master:
            print(f"--resume: extending the run from --max-steps {old_max} to {a.max_steps} at step {t.step}: the "
                  f"linear learning-rate decay is recomputed for {a.max_steps} steps (warm-up {a.warmup_steps} "
                  f"steps as recorded), so the learning rate continues at {lr_at(t.step, a):.3g}"
                  + (f"; Eq. 8's --lambda-epochs {a.lambda_epochs:g} now span {a.max_steps} steps" if a.lambda_epochs
                     else ""), flush=True)
    if t.warmup_reason and t.master:
        print(f"routing: --model {a.model} has no trained MLM head (freshly initialised); all parameters train for "
              f"the first {a.route_warmup} steps (--route-warmup), then routing starts", flush=True)
    record = {"config": vars(a), "commit": common.git_commit(), "world_size": t.world,
              "global_batch": t.global_batch, "threads": torch.get_num_threads(), **census}
    if t.master:
        common.atomic_write_json(os.path.join(a.output_dir, "config.json"), start_logs(t, record))
        print(f"{a.method}: {len(t.know.ds)} sequences, global batch {t.global_batch} "
              f"({a.batch_size} x {a.grad_accum} accum x {t.world} procs), {a.max_steps} steps, device {t.device}",
              flush=True)
        if t.know.injector is not None:
            c = census
            print(f"{a.method}: {c['mentions']} linked mentions ({c['mentions'] / c['sequences']:.2f} per sequence), "
                  f"{c['entities_linked']} of {c['entities']} KG entities linked; --injection {a.injection} may "
                  f"inject {c['injectable_mentions']} mentions ({100 * c['injectable_mentions'] / max(1, c['mentions']):.1f}%)",
                  flush=True)
        if "long_tail_words" in census:
            print(f"{a.method}: --long-tail-words: {census['long_tail_words']} word keys, "
                  f"{census['long_tail_word_occurrences']} occurrences in the corpus", flush=True)
    bar = tqdm(total=a.max_steps, initial=t.step, disable=not t.master, desc=a.method, dynamic_ncols=True)
    t0 = time.time()
    with open(os.path.join(a.output_dir, "metrics.jsonl"), "a") if t.master else nullcontext() as log:
        while t.step < a.max_steps:
            s0 = time.time()
            stats = t.train_step()
            dt = time.time() - s0
            t.elapsed += dt
            bar.update(1)
            if t.master and (t.step % a.log_every == 0 or t.step == a.max_steps or t.step == 1):
                rec = {"step": t.step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()},
                       "tokens_per_s": round(stats["tokens"] / dt, 1), "elapsed": round(t.elapsed, 3)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", mlm=f"{stats['l_mlm']:.3f}")
            if a.save_every and t.step % a.save_every == 0 and t.step < a.max_steps:
                t.save("checkpoint")
            if a.snapshot_every and t.step % a.snapshot_every == 0:
                t.save(f"step_{t.step:06d}", training_state=False)
    bar.close()
    t.save("checkpoint")
    t.save("final", training_state=False)
    if t.master:
        print(f"done: {t.step} steps in {time.time() - t0:.1f}s; model in {os.path.join(a.output_dir, 'final')}")
    if t.ddp:
        dist.barrier()  # no rank tears the group down while another is still saving or printing
        dist.destroy_process_group()


def main(argv=None):
    """The CLI: the project's own data and training errors print one line (--debug: the traceback)."""
    args = resolve_config(get_parser().parse_args(argv))
    try:
        train(args)
    except (data.DataError, FloatingPointError) as e:
        if args.debug:
            raise
        raise SystemExit(f"pretrain.py: {e}") from None


def make_deterministic():
    """--deterministic: torch.use_deterministic_algorithms (measured source of run-to-run differences:
    the backward of advanced indexing, weight[idx], is on CPU a threaded float atomic add once it
    writes >= 32768 elements; docs/measurements.md) and a fixed cuBLAS workspace on CUDA. An op without
    a deterministic version raises, naming the op."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
