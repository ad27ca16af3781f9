"""Knowledge-enhanced continued pre-training: TRELM (arXiv 2403.11203) and its baselines.

    python pretrain.py                                   # TRELM on the embedded default, 1 process
    torchrun --nproc_per_node=2 pretrain.py --max-steps 4  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 pretrain.py --model roberta-base --data DIR --batch-size 64

Methods (--method):
  mlm    plain continued MLM pre-training (the paper's RoBERTa / BERT rows)
  dkplm  DKPLM (alibaba/EasyNLP's released code, see README): long-tail mentions by KLT =
         long-tail * SI * KG degree, pseudo token E(t) - E(r), relation-conditioned full-softmax
         decoding of the entity's tokens, L_MLM + L_dec, all parameters train
  trelm  noise-aware injection of important entities + Contrastive Knowledge Assessing (Sec. 3.1),
         Knowledge-augmented Memory Bank (Sec. 3.2), Dynamic Knowledge Routing (Sec. 3.3);
         ablations --no-injection, --no-memory-bank, --no-routing (Table 6)

One optimizer step (Sec. 3.4):
  0. once, before training: SI(e) (Eq. 1) of every corpus mention with the initial model (a dataset
     column) and the corpus-level threshold of "important"
  1. collate a micro-batch (dynamic 15% MLM masking, 80/10/10) with its linked entity mentions
  2. choose mentions to inject (--injection; "important" = long-tail mentions above the threshold)
     -> one Plan (span positions, targets, negatives, memory)
  3. input embedding of each injected span = h_e (Eq. 1 section), mixed with memory (Eq. 7, 8)
  4. forward; L = theta * L_MLM + (1 - theta) * L_CKA (Eq. 2-3); MLM head only at masked positions
  5. memory bank update from the detached outputs at every mention of a key (Eq. 4-6), identical
     on every rank; with --long-tail-words also at every long-tail word (memory_bank.py docstring),
     whose shown occurrences step 3 mixed with Eq. 7 ("important entities and long-tail words",
     Sec. 3.4)
  6. every --route-every steps: re-attribute FFN neurons (Eq. 9-11) and train only the knowledge
     paths (Eq. 12) until the next re-routing

Paper symbol -> flag: theta --theta, k --window-k, gamma --gamma, lambda_0 --lambda0, beta --beta
(q: --lambda-q), m --ig-steps, Q exponent 0.75 (cka.py), K --negatives. Decisions where the paper
is ambiguous (--memory-scale, --memory-init, --memory-window, --si-window, --long-tail-words):
README "Departures".
Outputs in --output-dir: checkpoint/ (latest, with training_state.pt, for --resume), final/
(model + tokenizer, loadable with AutoModelForMaskedLM / AutoTokenizer), metrics.jsonl, config.json.
A previous run there is continued (--resume: every flag but Trainer.OPERATIONAL, the world size and
the global batch must match) or deleted (--overwrite), never replaced silently. --deterministic
makes the same command bitwise repeatable (make_deterministic says what differs without it).
Data and divergence errors print one line (--debug: the traceback).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import routing
from cka import NegativeSampler, cka_loss, cka_response_prob, label_token_counts, total_loss
from entity_importance import (STRATEGIES, KnowledgeInjector, important_threshold, kg_degree,
                               long_tail_mask, select_mentions, si_column, span_positions)
from memory_bank import MemoryBank

# --method -> what each mechanism does (a new baseline is one row):
#   injection  default --injection strategy (entity_importance.select_mentions)
#   decoding   what the injected spans are trained to predict: "cka" sampled softmax (Eq. 2),
#              "relation" DKPLM's relation-conditioned full-softmax decoding, "none"
#   loss       "theta": theta * L_MLM + (1 - theta) * L_CKA (Eq. 3); "sum": L_MLM + L_dec (DKPLM's code)
#   sampler    negatives from Q (Eq. 2); bank  memory bank (Sec. 3.2); routing  knowledge paths (Sec. 3.3)
METHOD_TABLE = {
    "trelm": dict(injection="important", decoding="cka", loss="theta", sampler=True, bank=True, routing=True),
    "dkplm": dict(injection="dkplm", decoding="relation", loss="sum", sampler=False, bank=False, routing=False),
    "mlm": dict(injection="none", decoding="none", loss="mlm", sampler=False, bank=False, routing=False),
}
METHODS = tuple(METHOD_TABLE)
INJECTIONS = STRATEGIES


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="trelm", choices=METHODS)
    a("--model", default=common.DEFAULT_MODEL, help="HF masked-LM id or local dir; 'minilm' = the packaged MiniLM-L6-H384")
    a("--data", default="mini", help="'mini' (embedded default, built offline) or a DIR with kg/ and corpus.jsonl")
    a("--output-dir", default=None, help="default: runs/<method>")
    a("--max-steps", type=int, default=250, help="optimizer steps (250: about 9 minutes on 2 CPU cores)")
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
    a("--ig-form", default="layer", choices=routing.FORMS,
      help="layer: Eq. 11 as printed, one layer scaled at a time (forward from cached lower layers); "
           "joint: all layers scaled together, about (L+1)/2 times cheaper, not Eq. 11")
    a("--ig-chunk", type=int, default=0, help="alpha steps stacked per IG forward (0: as many as --ig-memory-mb allows)")
    a("--ig-memory-mb", type=float, default=1024.0, help="activation memory bound of one stacked IG forward (estimate)")
    a("--ig-batch", type=int, default=8, help="sequences of the micro-batch the attribution runs on (0 = all)")
    a("--route-every", type=int, default=100,
      help="re-route every N steps (measured, README: successive path sets overlap at the batch-to-batch level, "
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
    """Validate flags against each other and fill method-dependent defaults."""
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
        args.injection = row["injection"]
    elif args.method == "mlm" and args.injection != "none":
        bad("--injection", "--method mlm injects nothing; use --method trelm or dkplm")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.method)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, int(0.06 * args.max_steps))
    args.memory_bank = row["bank"] and not args.no_memory_bank and not args.no_injection and args.injection != "none"
    args.routing = row["routing"] and not args.no_routing
    return args


# -----------------------------------------------------------------------------
# The model wrapper: everything that needs gradients happens inside forward(), so DDP sees it.

@dataclass
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


@dataclass
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


class KnowledgeMLM(torch.nn.Module):
    """Masked LM + knowledge injection + MLM / CKA / entity-decoding losses in one forward.
    decoding and loss: a row of METHOD_TABLE."""

    def __init__(self, mlm, injector=None, decoding="none", loss="mlm"):
        super().__init__()
        self.mlm = mlm
        self.injector = injector
        self.decoding, self.loss = decoding, loss

    def forward(self, input_ids, attention_mask, mlm_labels, plan=None, theta=0.5, return_hidden=False):
        from memory_bank import span_input
        emb = self.mlm.get_input_embeddings()
        x = emb(input_ids)  # (B, T, H)
        if plan is not None:
            h_e = plan.h_e if plan.h_e is not None else self.injector.embed(emb.weight, plan.ent_id)  # (S, H)
            x = span_input(x, plan.rows, plan.cols, plan.mention, h_e, plan.mem, plan.lam, plan.match_norm)  # Eq. (7)
            w = plan.words
            if w is not None:  # Eq. (7) at the shown long-tail words, their own embedding E_p in the place of h_e
                r, c = w.rows[w.shown], w.cols[w.shown]
                mem = (w.mem[0][w.shown], w.mem[1][w.shown])
                x = span_input(x, r, c, torch.arange(len(r), device=x.device), x[r, c], mem, plan.lam, plan.match_norm)
        hidden = self.mlm.base_model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        out = {}
        sel = mlm_labels != -100
        out["l_mlm"] = F.cross_entropy(common.mlm_logits(self.mlm, hidden[sel]).float(), mlm_labels[sel]) \
            if sel.any() else hidden.sum() * 0.0
        out["loss"] = out["l_mlm"]
        if self.decoding != "none":  # every batch, with or without injected spans (an empty one adds 0)
            rows, cols = (plan.rows, plan.cols) if plan is not None else (input_ids[:0, 0], input_ids[:0, 0])
            h_span = hidden[rows, cols]  # (P, H)
            targets = plan.targets if plan is not None else rows
            if self.decoding == "cka":
                neg = plan.negatives if plan is not None else rows.new_zeros(0, 0)
                key, l_k = "l_cka", cka_loss(self.mlm, h_span, targets, neg)  # Eq. (2)
            else:
                rel = self.injector.relation_embed(emb.weight, plan.ent_id)[plan.mention] if plan is not None \
                    else h_span
                key, l_k = "l_dec", relation_decoding_loss(self.mlm, h_span, targets, rel)
            out[key] = l_k
            # Eq. (3) for TRELM, the same weighting for every batch; DKPLM's code sums its two losses
            out["loss"] = total_loss(out["l_mlm"], l_k, theta) if self.loss == "theta" else out["l_mlm"] + l_k
        if return_hidden:
            out["hidden"] = hidden  # (B, T, H) the memory bank reads it detached; routing's P_x needs its graph
        return out


# -----------------------------------------------------------------------------

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


def process_group_backend(use_cuda):
    """The DDP process group's backend: on GPU nccl for CUDA tensors and gloo for CPU tensors (the
    memory bank lives on the CPU by default, --memory-device); nccl alone serves no CPU tensor."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


class Trainer:
    """State and step logic of one pre-training run (one object per process)."""

    def __init__(self, args):
        self.args = args
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if self.ddp:
            use_cuda = torch.cuda.is_available() and args.device != "cpu"
            dist.init_process_group(backend=process_group_backend(use_cuda))
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
            else:  # share the cores between the local processes
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        else:
            self.rank, self.world = 0, 1
            want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            self.device = torch.device(want)
        self.master = self.rank == 0
        self.group = dist.group.WORLD if self.ddp else None
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        common.seed_everything(args.seed + self.rank)

        mlm, tok = common.load_mlm(args.model)
        self.tok = tok
        if tok.mask_token_id is None or tok.pad_token_id is None:
            raise SystemExit(f"--model {args.model}: tokenizer has no mask or pad token; a masked LM is required")
        kg_dir, corpus = data.resolve_data(args.data)
        self.kg = data.load_kg(kg_dir)
        cache = os.path.join(args.output_dir, "data_cache")
        if self.ddp and not self.master:
            dist.barrier()  # rank 0 tokenizes first; the others read its Arrow cache
        self.ds = data.build_dataset(corpus, self.kg, tok, args.seq_len, cache, args.num_proc)
        if self.ddp and self.master:
            dist.barrier()
        self.collate = data.MLMCollator(tok, args.mlm_prob, args.whole_word_mask)
        self.global_batch = args.batch_size * args.grad_accum * self.world

        row = METHOD_TABLE[args.method]
        self.injector = self.sampler = self.bank = None
        self.si_threshold = self.degree = self.si_candidate = None
        self.si_epoch = 0  # the epoch whose model scored SI (0: the initial model; --si-refresh moves it)
        if args.injection != "none":
            self.injector = KnowledgeInjector(self.kg, tok, seed=args.seed)
            self.freq = data.mention_counts(self.ds, self.kg.num_entities)  # batched pass over the Arrow column
            self.long_tail = torch.as_tensor(long_tail_mask(self.freq, args.long_tail_percentile, inclusive=True))
            if args.injection in ("important", "dkplm"):  # SI once over the corpus (Sec. 3.4), initial model
                self.si_candidate = self.long_tail.numpy() & self.injector.has_knowledge.numpy()  # (E,)
                self.set_si(self.corpus_si(mlm, self.si_candidate))
            if args.injection == "dkplm":
                self.degree = kg_degree(self.kg.triples, self.kg.num_entities)
        if row["sampler"] and args.injection != "none":
            self.sampler = NegativeSampler(label_token_counts(self.kg, tok, len(tok)))
        if args.memory_bank:
            self.bank = MemoryBank(mlm.config.hidden_size, window_k=args.window_k, gamma=args.gamma,
                                   dtype=torch.bfloat16 if args.memory_dtype == "bf16" else torch.float32,
                                   device=args.memory_device, context_only=args.memory_window == "context")
        self.plain = self.long_tail_word = None
        if args.long_tail_words and args.memory_bank:  # once over the corpus (Sec. 3.4), like entity frequency
            self.plain = data.plain_tokens(tok).to(self.device)  # (V,)
            self.word_freq = data.word_counts(self.ds, self.plain.cpu())  # (V,)
            lt = long_tail_mask(self.word_freq, args.word_percentile, inclusive=True) & (self.word_freq >= args.word_min_count)
            self.long_tail_word = torch.as_tensor(lt).to(self.device)  # (V,) bool
        if self.master and not args.resume:  # a fresh run starts a fresh routing log
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, "routing.jsonl"), "w").close()
        if args.route_warmup is None:  # a trained head routes from step 0; routing would freeze a random one
            args.route_warmup = args.route_every if getattr(mlm, "fresh_mlm_head", False) else 0
            if args.routing and args.route_warmup:
                self.route_log({"step": 0, "warmup": args.route_warmup, "reason": "fresh MLM head"},
                               f"routing: --model {args.model} has no trained MLM head (freshly initialised); all "
                               f"parameters train for the first {args.route_warmup} steps (--route-warmup), then "
                               f"routing starts")
        self.net = KnowledgeMLM(mlm, self.injector, row["decoding"], row["loss"]).to(self.device)
        self.router = None
        self.paths = None
        self.step = 0
        self.saved_step = None  # step of the training checkpoint on disk, if any
        self.elapsed = 0.0
        self.optimizer = None
        self.wrap()

    # -- model / optimizer plumbing -------------------------------------------------

    def wrap(self):
        """(Re)build the optimizer over what trains now, and the DDP wrapper. While routing, only the
        path slices train; they are not module parameters, so the Router all-reduces their gradients
        itself (after the last micro-batch) instead of DDP."""
        if self.router is not None:
            self.optimizer = make_optimizer(self.router.parameters(), self.args)
            self.model = self.net
            return
        self.optimizer = make_optimizer(self.net.parameters(), self.args)
        self.model = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.ddp else self.net

    def reroute(self, batch):
        """Eq. (9)-(12): attribute FFN neurons on this batch, keep the top ones, train only them.
        Adam moments of slices that stay selected are kept (routing.carry_adam_state). Appends one
        line to <output-dir>/routing.jsonl: step, seconds, mean Jaccard with the previous paths."""
        a = self.args
        t0 = time.time()
        old_opt, old_paths = self.optimizer, self.paths
        old_views = self.router.views() if self.router is not None else \
            [(p, p, None, None) for p in self.net.parameters() if p.requires_grad]
        if self.router is not None:
            self.router.detach()
            self.router = None
        n = a.ig_batch if 0 < a.ig_batch < batch["input_ids"].shape[0] else batch["input_ids"].shape[0]
        head = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "mlm_labels")}
        plan = None if batch["plan"] is None else batch["plan"].head(n)

        def run(_model, repeat=1):  # P_x: probability of the correct CKA response (Eq. 9)
            b = {k: v.repeat(repeat, 1) for k, v in head.items()}  # repeat > 1: --ig-chunk alpha steps stacked
            j = None if plan is None else plan.tile(repeat, n)
            h = self.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], j, return_hidden=True)["hidden"]
            if j is not None and len(j.rows):
                return cka_response_prob(self.net.mlm, h[j.rows, j.cols], j.targets, j.negatives)
            sel = b["mlm_labels"] != -100  # no injected mention: P of the masked tokens instead
            return common.mlm_logits(self.net.mlm, h[sel]).softmax(-1).gather(1, b["mlm_labels"][sel, None])[:, 0]

        with self.autocast:
            attr = routing.ffn_attributions(self.net.mlm, run, steps=a.ig_steps, chunk=a.ig_chunk,
                                            form=a.ig_form, memory_mb=a.ig_memory_mb)  # (L, I) on self.device
        if self.ddp:
            dist.all_reduce(attr)  # identical paths on every rank
        self.paths = [p.cpu() for p in routing.select_paths(attr, ratio=a.route_ratio, threshold=a.route_threshold)]
        self.attach_paths()
        routing.carry_adam_state(old_opt, old_views, self.optimizer, self.router.views())
        self.route_log({"step": self.step, "ig_s": round(time.time() - t0, 3), "selected": [len(p) for p in self.paths],
                        "jaccard_prev": None if old_paths is None else round(path_jaccard(old_paths, self.paths), 4)})

    def route_log(self, rec, message=None):
        """Rank 0 appends rec to <output-dir>/routing.jsonl (and prints message). After --resume the
        re-routings past the checkpoint are logged again: the last line of a step holds."""
        if not self.master:
            return
        if message:
            print(message, flush=True)
        with open(os.path.join(self.args.output_dir, "routing.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def attach_paths(self):
        self.router = routing.Router()
        self.router.attach(self.net.mlm, self.paths, train_layernorm=self.args.train_layernorm,
                           train_head_bias=self.args.train_head_bias)
        self.wrap()

    # -- one batch -------------------------------------------------------------------

    def corpus_si(self, mlm, candidate, ds=None):
        """ds (default self.ds) with SI(e) (Eq. 1) of every candidate mention by mlm (the initial model,
        or the current one under --si-refresh; entity_importance.si_column: batched, cached by
        fingerprint; rank 0 first under DDP)."""
        a = self.args
        W = mlm.get_input_embeddings().weight
        key = f"{a.model}|{tuple(W.shape)}|{float(W.detach().double().sum()):.10e}"
        if self.ddp and not self.master:
            dist.barrier()
        ds = si_column(self.ds if ds is None else ds, mlm.to(self.device), self.tok.mask_token_id, window=a.si_window or None,
                       num_proc=a.num_proc, fingerprint=key, only=candidate)
        if self.ddp and self.master:
            dist.barrier()
        return ds

    def set_si(self, ds):
        """Take ds (self.ds with an ent_si column) and the corpus-level "important" threshold of its SI."""
        self.ds = ds
        ent, si = data.flat_column(ds, "ent_id", np.int64), data.flat_column(ds, "ent_si", np.float64)
        self.si_threshold = important_threshold(si, self.si_candidate[ent], self.args.important_fraction)

    def refresh_si(self):
        """--si-refresh N: at the start of every N-th epoch, SI(e) of the corpus's candidates again with
        the current model, and a new threshold (Sec. 3.4 identifies important entities once, "throughout
        the corpus"; whether the initial model's ranking should be kept is our decision, see README)."""
        n, q = self.args.si_refresh, math.floor(self.epoch_fraction())
        if not n or self.si_candidate is None or q < self.si_epoch + n:
            return
        if self.router is not None:
            self.router.sync_to_model()  # the routed slices into the full weights SI's forward reads
        before = data.flat_column(self.ds, "ent_si", np.float64) >= self.si_threshold
        self.set_si(self.corpus_si(self.net.mlm, self.si_candidate, self.ds.remove_columns("ent_si")))
        self.si_epoch = q - q % n
        after = data.flat_column(self.ds, "ent_si", np.float64) >= self.si_threshold
        if self.master:
            print(f"SI refreshed at epoch {self.si_epoch} (step {self.step}): {int(after.sum())} important mentions, "
                  f"Jaccard {(before & after).sum() / max(1, (before | after).sum()):.3f} with the previous set",
                  file=sys.stderr, flush=True)

    def restore_si(self, st):
        """The SI column a refresh before the checkpoint computed (its model is gone), from training_state."""
        import pyarrow.compute as pc
        self.si_epoch = st["epoch"]
        counts = np.concatenate([pc.list_value_length(b["ent_id"]).to_numpy(zero_copy_only=False)
                                 for b in self.ds.with_format("arrow").iter(batch_size=1 << 16)])  # (rows,)
        rows = [x.tolist() for x in np.split(st["values"].astype(np.float64), np.cumsum(counts)[:-1])]
        self.set_si(self.ds.remove_columns("ent_si").add_column("ent_si", rows))

    def get_batch(self, micro):
        a = self.args
        idx = data.micro_batch_indices(self.step, micro, self.rank, len(self.ds), a.batch_size, a.grad_accum,
                                       self.world, a.seed)
        rows = self.ds[idx]
        examples = [dict(zip(rows, v)) for v in zip(*rows.values())]
        # masking and negatives: a function of (step, slot in the global batch), whatever the layout
        slot = micro * self.world + self.rank
        seed = np.random.SeedSequence([a.seed, self.step, slot]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        batch = self.collate(examples, g)
        if "ent_si" in rows:  # (M,) in the collator's mention order
            batch["ent_si"] = torch.tensor([v for e in examples for v in e["ent_si"]], dtype=torch.float32)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        plan = batch["plan"] = self.plan_injection(batch, g)
        if self.long_tail_word is not None:
            plan = batch["plan"] = self.plan_words(batch, plan)
        if self.bank is not None:  # collective under DDP: every rank calls it, with or without mentions
            H = self.net.mlm.config.hidden_size
            keys = plan.ent_id if plan else torch.zeros(0, dtype=torch.long, device=self.device)
            init = self.memory_init(batch, plan) if plan else torch.zeros(0, H, device=self.device)
            words = plan.words if plan else None
            if words is not None:  # a word's local memory starts as its input embedding (Sec. 3.2)
                W = self.net.mlm.get_input_embeddings().weight
                keys = torch.cat([keys, words.key])
                init = torch.cat([init, W.detach()[words.key - self.kg.num_entities].float()])
            self.bank.ensure(keys, init, process_group=self.group)
            if plan:
                mem = tuple(t.to(self.device) for t in self.bank.read(keys))
                S = len(plan.ent_id)
                plan.mem = mem if words is None else tuple(m[:S] for m in mem)
                if words is not None:
                    words.mem = tuple(m[S:] for m in mem)
                plan.lam = self.lam()  # Eq. (8)
        return batch

    @torch.no_grad()
    def plan_injection(self, batch, g):
        """Choose mentions (Sec. 3.1 / Fig. 3; SI from the corpus column) -> Plan with their span
        positions, decoding targets and CKA negatives, or None (the memory is read in get_batch)."""
        a = self.args
        if self.injector is None or len(batch["ent_id"]) == 0:
            return None
        eid = batch["ent_id"]
        sel = select_mentions(a.injection, eid, self.long_tail, si=batch.get("ent_si"), si_threshold=self.si_threshold,
                              eligible=self.injector.injectable(eid), ent_batch=batch["ent_batch"], degree=self.degree)
        if not sel.any():
            return None
        m = sel.nonzero()[:, 0]
        rows, cols, mention, _ = span_positions(batch["ent_batch"][m], batch["ent_start"][m], batch["ent_end"][m])
        targets = batch["orig_ids"][rows, cols]  # (P,) the entity's own tokens
        batch["mlm_labels"][rows, cols] = -100  # injected positions are scored by the decoding loss, not L_MLM
        plan = Plan(rows, cols, mention, targets, ent_id=eid[m], sel=m, match_norm=a.memory_scale == "embedding")
        if a.no_injection:  # ablation: the span shows only the mask embedding
            plan.h_e = self.net.mlm.get_input_embeddings().weight[self.tok.mask_token_id].expand(len(m), -1)
        if self.sampler is not None:
            plan.negatives = self.sampler.sample(targets.cpu(), a.negatives, generator=g).to(self.device)
        return plan

    @torch.no_grad()
    def plan_words(self, batch, plan):
        """The batch's long-tail words (--long-tail-words) -> plan with .words, or plan unchanged when
        there are none (an empty entity plan is made for a batch with words and no injected entity).
        Words are read from the original text (orig_ids), outside every linked mention span."""
        ids = batch["orig_ids"]  # (B, T)
        word = data.whole_words(ids, batch["word_start"], self.plain) & self.long_tail_word[ids]
        word &= batch["attention_mask"].bool()
        # an entity's tokens are its own key's, never a word's
        word &= ~data.span_mask(batch["ent_batch"], batch["ent_start"], batch["ent_end"], ids.shape)
        r, c = word.nonzero(as_tuple=True)  # (N,)
        if len(r) == 0:
            return plan
        words = WordNotes(r, c, ids[r, c] + self.kg.num_entities, batch["input_ids"][r, c] == ids[r, c])
        if plan is None:
            z = torch.zeros(0, dtype=torch.long, device=self.device)
            plan = Plan(z, z, z, z, ent_id=z, sel=z, match_norm=self.args.memory_scale == "embedding",
                        negatives=None if self.sampler is None else z.new_zeros(0, self.args.negatives))
        plan.words = words
        return plan

    @torch.no_grad()
    def memory_init(self, batch, plan):
        """(S, H) initial local memory of the plan's keys: h_e (--memory-init knowledge) or the mean
        input embedding of the mention's own tokens, i.e. of its CKA targets (entity)."""
        W = self.net.mlm.get_input_embeddings().weight
        if self.args.memory_init == "knowledge":
            return self.injector.embed(W, plan.ent_id).float()
        S = len(plan.ent_id)
        total = torch.zeros(S, W.shape[1], device=W.device).index_add_(0, plan.mention, W[plan.targets].float())
        return total / torch.bincount(plan.mention, minlength=S)[:, None]

    @torch.no_grad()
    def update_memory(self, batch, hidden):
        """Local (Eq. 4-5) and global (Eq. 6) memory from this forward, for every mention of an
        entity in the bank ("an entity e present in both sentence x and M"), injected or not."""
        seen = self.bank.contains(batch["ent_id"])  # (M,)
        rows, start, end, keys = (batch[k][seen] for k in ("ent_batch", "ent_start", "ent_end", "ent_id"))
        words = batch["plan"].words if batch["plan"] is not None else None
        if words is not None:  # every occurrence of a long-tail word, shown or masked: a span of one token
            rows, start = torch.cat([rows, words.rows]), torch.cat([start, words.cols])
            end, keys = torch.cat([end, words.cols + 1]), torch.cat([keys, words.key])
        self.bank.observe(hidden, batch["attention_mask"], rows, start, end, keys, process_group=self.group)

    def epoch_fraction(self):
        """Epochs of data seen so far (fractional)."""
        return self.step * self.global_batch / len(self.ds)

    def lam(self):
        """Eq. (8): lambda_q = lambda0 / beta^q, q the integer epoch (--lambda-q epoch) or fractional."""
        q = self.epoch_fraction()
        return MemoryBank.lambda_at(math.floor(q) if self.args.lambda_q == "epoch" else q,
                                    self.args.lambda0, self.args.beta)

    # -- training --------------------------------------------------------------------

    def train_step(self):
        a = self.args
        self.refresh_si()
        first = None  # micro-batch 0, when re-routing already built it (its SI forward is not repeated)
        if a.routing and self.step >= a.route_warmup and (self.router is None or self.step % a.route_every == 0):
            self.net.eval()
            first = self.get_batch(0)
            self.reroute(first)
        self.net.train()
        lr = lr_at(self.step, a)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dec = {"cka": ("l_cka",), "relation": ("l_dec",), "none": ()}[self.net.decoding]
        stats = {"l_mlm": 0.0, **{k: 0.0 for k in dec}, "loss": 0.0, "injected": 0, "mentions": 0, "tokens": 0,
                 "lambda": self.lam() if self.bank is not None else 0.0}  # Eq. (8) weight used this step
        if self.long_tail_word is not None:
            stats["words_mixed"] = 0  # long-tail word positions whose input Eq. 7 mixed (--long-tail-words)
        for micro in range(a.grad_accum):
            batch = first if micro == 0 and first is not None else self.get_batch(micro)
            plan = batch["plan"]
            sync = micro == a.grad_accum - 1
            ddp_wrapped = isinstance(self.model, DDP)
            with (self.model.no_sync() if ddp_wrapped and not sync else nullcontext()), self.autocast:
                out = self.model(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], plan,
                                 theta=a.theta, return_hidden=self.bank is not None)
            if not torch.isfinite(out["loss"]):
                raise self.non_finite(f"loss {out['loss'].item()} (micro-batch {micro})")
            (out["loss"] / a.grad_accum).backward()
            if self.bank is not None:  # Eq. (4)-(6), after the forward pass; every rank joins the gather
                self.update_memory(batch, out["hidden"].detach().float())
            for k in ("l_mlm", *dec, "loss"):
                stats[k] += float(out[k].detach()) / a.grad_accum
            stats["tokens"] += int(batch["attention_mask"].sum()) * self.world
            stats["injected"] += 0 if plan is None else len(plan.sel)
            if self.long_tail_word is not None:
                stats["words_mixed"] += 0 if plan is None or plan.words is None else int(plan.words.shown.sum())
            stats["mentions"] += len(batch["ent_id"])
        if self.router is not None:
            self.router.all_reduce_grads()  # no-op without DDP
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], a.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats["lr"] = lr
        return stats

    # -- checkpoints -----------------------------------------------------------------

    def rng_state(self):
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.ddp:
            return [state]
        states = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save(self, name, training_state=True):
        """Write <output-dir>/<name>/ (model + tokenizer [+ training_state.pt, written last]) into
        .<name>.tmp, then rename: <name> -> .<name>.old, .<name>.tmp -> <name>, delete .<name>.old.
        A crash between the two renames leaves two complete copies; find_checkpoint() takes the newer."""
        rngs = self.rng_state() if training_state else None
        if self.router is not None:
            self.router.sync_to_model()
        if not self.master:
            return
        out = self.args.output_dir
        final, tmp, old = (os.path.join(out, n) for n in (name, f".{name}.tmp", f".{name}.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        self.net.mlm.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        if training_state:
            torch.save({"step": self.step, "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict(),
                        "rng": rngs, "config": vars(self.args), "commit": common.git_commit(),
                        "world": self.world, "global_batch": self.global_batch, "threads": torch.get_num_threads(),
                        "paths": self.paths, "bank": self.bank.state_dict() if self.bank is not None else None,
                        "si": None if not self.si_epoch else
                        {"epoch": self.si_epoch, "values": data.flat_column(self.ds, "ent_si", np.float32)}},
                       os.path.join(tmp, "training_state.pt"))
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if training_state:
            self.saved_step = self.step

    # Flags that change nothing the run computes. Every other flag, including any added later, must
    # match the checkpoint's on --resume: otherwise the resumed run is silently another run.
    OPERATIONAL = ("output_dir", "save_every", "snapshot_every", "log_every", "num_proc", "device", "resume",
                   "overwrite", "debug")

    def resume_differences(self, st):
        """['--flag old -> new', ...]: every run-changing difference between a checkpoint and this run."""
        old, new = st["config"], vars(self.args)
        diff = []
        for k in sorted(set(old) | set(new)):
            if k not in self.OPERATIONAL and old.get(k, "(not recorded)") != new.get(k, "(not recorded)"):
                diff.append(f"--{k.replace('_', '-')} {old.get(k, '(not recorded)')} -> {new.get(k, '(not set)')}")
        world = st.get("world", len(st["rng"]))
        if world != self.world:
            diff.append(f"world size (processes) {world} -> {self.world}")
        batch = st.get("global_batch", self.args.batch_size * self.args.grad_accum * world)
        if batch != self.global_batch:
            diff.append(f"global batch {batch} -> {self.global_batch}")
        if self.args.deterministic and st.get("threads") != torch.get_num_threads():  # reductions split by thread
            diff.append(f"threads per process {st.get('threads')} -> {torch.get_num_threads()} (set OMP_NUM_THREADS)")
        return diff

    def resume(self):
        from safetensors.torch import load_file
        out = self.args.output_dir
        st, ck = find_checkpoint(out)
        diff = self.resume_differences(st)
        if diff:  # (--max-steps too: the learning-rate schedule depends on it)
            raise SystemExit(f"--resume: {ck} was written by a different run; a resumed run must be the same run "
                             f"(start a new --output-dir, or --overwrite this one). Differences: " + ", ".join(diff))
        weights = load_file(os.path.join(ck, "model.safetensors"))
        missing, unexpected = self.net.mlm.load_state_dict(weights, strict=False)
        names = {}  # tied parameters are saved once, under one of their names
        for n, p in self.net.mlm.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        tied = {n for group in names.values() if any(m in weights for m in group) for n in group}
        if unexpected or set(missing) - tied:
            raise SystemExit(f"--resume: {ck}/model.safetensors does not match the model "
                             f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")
        self.step, self.elapsed, self.paths = st["step"], st["elapsed"], st["paths"]
        self.saved_step = self.step
        if self.bank is not None:
            self.bank.load_state_dict(st["bank"])
        if st.get("si"):
            self.restore_si(st["si"])
        if self.paths is not None:
            self.attach_paths()
        else:
            self.wrap()
        self.optimizer.load_state_dict(st["optimizer"])
        rng = st["rng"][self.rank]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if os.path.basename(ck) != "checkpoint":  # recovered from a crash inside save(): make it checkpoint/ again
            if self.ddp:
                dist.barrier()  # every rank has read it
            if self.master:
                os.replace(ck, os.path.join(out, "checkpoint"))
                for n in (".checkpoint.tmp", ".checkpoint.old"):
                    shutil.rmtree(os.path.join(out, n), ignore_errors=True)

    def non_finite(self, what):
        """The one error for a non-finite value in a step: the step as metrics.jsonl counts it (from 1),
        and what is on disk."""
        a = self.args
        ck = os.path.join(a.output_dir, "checkpoint")
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {ck}" if self.saved_step is not None
                else f"no checkpoint was written (--save-every {a.save_every})")
        return FloatingPointError(f"non-finite {what} at step {self.step + 1}; {kept}. "
                                  f"A lower --lr (now {a.lr}) or --grad-clip may help.")

    def injection_census(self):
        """Over the whole corpus: sequences, linked mentions, entities linked, and the mentions --injection
        may inject (entity has a KG triple and is long-tail / frequent as the strategy asks)."""
        a = self.args
        c = {"sequences": len(self.ds)}
        if self.injector is None:
            return c
        freq = torch.as_tensor(self.freq)  # (N_e,) linked mentions per entity
        ok = self.injector.injectable(torch.arange(len(freq)))
        lt = self.long_tail
        ok &= {"important": lt, "long-tail": lt, "dkplm": lt, "frequent": ~lt, "all": torch.ones_like(lt)}[a.injection]
        c.update(mentions=int(freq.sum()), entities_linked=int((freq > 0).sum()), entities=len(freq),
                 injectable_mentions=int(freq[ok].sum()))
        if self.long_tail_word is not None:  # --long-tail-words: word keys and their occurrences
            lt = self.long_tail_word.cpu().numpy()
            c.update(long_tail_words=int(lt.sum()), long_tail_word_occurrences=int(self.word_freq[lt].sum()))
        return c


def find_checkpoint(out):
    """-> (training_state, dir) of the newest complete checkpoint in out: checkpoint/ when it loads,
    else (a crash inside save()) the newer loadable one of .checkpoint.tmp/ and .checkpoint.old/."""
    from safetensors import safe_open
    found, errors = [], []
    for name in ("checkpoint", ".checkpoint.tmp", ".checkpoint.old"):
        d = os.path.join(out, name)
        if not os.path.isdir(d):
            continue
        try:
            st = torch.load(os.path.join(d, "training_state.pt"), map_location="cpu", weights_only=False)
            with safe_open(os.path.join(d, "model.safetensors"), "pt"):  # header and size complete
                pass
        except Exception as e:  # missing or torn: not a complete checkpoint
            errors.append(f"{d}: {type(e).__name__}")
            continue
        if name == "checkpoint":
            return st, d
        found.append((st["step"], d, st))
    if not found:
        raise SystemExit(f"--resume: no complete checkpoint in --output-dir {out} (looked for checkpoint/, "
                         f".checkpoint.tmp/, .checkpoint.old/ with training_state.pt and model.safetensors"
                         + (f"; unreadable: {', '.join(errors)}" if errors else "") + ")")
    step, d, st = max(found, key=lambda f: f[0])
    print(f"warning: --resume: {out}/checkpoint/ is missing or torn (a crash inside save()); resuming from the "
          f"newest complete copy, {d} (step {step})", flush=True)
    return st, d


def trim_metrics(path, step):
    """On resume drop metric lines written after the checkpoint (they will be written again), and a
    torn last line (the process died while writing it) with a warning."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise SystemExit(f"--resume: {path}:{n}: not a JSON line (only a torn last line is repaired); "
                                 f"fix or delete metrics.jsonl")
            print(f"warning: {path}:{n}: dropped a torn last line ({line[:40]!r}...)", flush=True)
            continue
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    common.atomic_write(path, lambda tmp: open(tmp, "w").writelines(keep))


RUN_FILES = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old", "final")


def prepare_output_dir(args):
    """Before anything loads: --output-dir must be writable, and a previous run in it is continued
    (--resume) or deleted (--overwrite), never silently replaced."""
    out = args.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SystemExit(f"pretrain.py: --output-dir {out}: not writable ({e.strerror or e})")
    previous = [n for n in RUN_FILES if os.path.isdir(os.path.join(out, n))]
    if args.resume or not previous:
        return
    if not args.overwrite:
        raise SystemExit(f"pretrain.py: --output-dir {out} holds a previous run ({', '.join(previous)}); pass "
                         f"--resume to continue it, or --overwrite to delete it and start afresh")
    if int(os.environ.get("RANK", 0)) == 0:
        snapshots = [n for n in os.listdir(out) if n.startswith("step_")]
        for n in previous + snapshots:
            shutil.rmtree(os.path.join(out, n))
        for n in ("metrics.jsonl", "config.json"):
            if os.path.exists(os.path.join(out, n)):
                os.remove(os.path.join(out, n))
        print(f"--overwrite: deleted the previous run in {out} ({', '.join(previous + snapshots)})", flush=True)


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
    """--deterministic. Measured source of run-to-run differences at the default shape (16 x 128,
    MiniLM, 2 threads): the backward of advanced indexing (weight[idx], e.g. the CKA targets' and
    negatives' decoder rows, the h_e label embeddings) is index_put_(accumulate=True), which on CPU
    adds with threaded float atomics once it writes >= 32768 elements (so tiny test shapes never
    show it): the same gradients came out different in 3 of 6 repeats, and 0 of 8 in deterministic
    mode. Deterministic mode makes it serial, and raises on any op without a deterministic version
    (the error names the op). cuBLAS needs a fixed workspace for deterministic GEMMs on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train(args):
    prepare_output_dir(args)
    if args.deterministic:
        make_deterministic()
    t = Trainer(args)
    a = t.args
    census = t.injection_census()
    if t.injector is not None and census["injectable_mentions"] == 0:
        raise SystemExit(f"pretrain.py: --method {a.method} --injection {a.injection}: nothing can be injected: "
                         f"{census['mentions']} linked mentions of {census['entities_linked']} entities in --data "
                         f"{a.data}, none with a KG triple that --injection {a.injection} selects. Link entities "
                         f"(corpus.jsonl \"entities\" or KG aliases that occur in the text), or use --method mlm")
    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    record = {"config": vars(a), "commit": common.git_commit(), "world_size": t.world,
              "global_batch": t.global_batch, "threads": torch.get_num_threads(), **census}
    if a.resume:
        t.resume()
        if t.master:
            trim_metrics(metrics_path, t.step)
        config_path = os.path.join(a.output_dir, "config.json")
        previous = json.load(open(config_path)) if os.path.exists(config_path) else {}
        record["commit"] = previous.get("commit", record["commit"])  # the run's first commit; each resume's below
        record["resumed"] = previous.get("resumed", []) + [{"step": t.step, "commit": common.git_commit()}]
    elif t.master and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a run that died before its first checkpoint (no previous run to protect)
    if t.master:
        common.atomic_write_json(os.path.join(a.output_dir, "config.json"), record)
        print(f"{a.method}: {len(t.ds)} sequences, global batch {t.global_batch} "
              f"({a.batch_size} x {a.grad_accum} accum x {t.world} procs), {a.max_steps} steps, device {t.device}",
              flush=True)
        if t.injector is not None:
            c = census
            print(f"{a.method}: {c['mentions']} linked mentions ({c['mentions'] / c['sequences']:.2f} per sequence), "
                  f"{c['entities_linked']} of {c['entities']} KG entities linked; --injection {a.injection} may "
                  f"inject {c['injectable_mentions']} mentions ({100 * c['injectable_mentions'] / max(1, c['mentions']):.1f}%)",
                  flush=True)
        if "long_tail_words" in census:
            print(f"{a.method}: --long-tail-words: {census['long_tail_words']} word keys, "
                  f"{census['long_tail_word_occurrences']} occurrences in the corpus", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=a.max_steps, initial=t.step, disable=not t.master, desc=a.method, dynamic_ncols=True)
    t0 = time.time()
    with open(metrics_path, "a") if t.master else nullcontext() as log:
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


if __name__ == "__main__":
    main()
