"""Knowledge-enhanced continued pre-training: TRELM (arXiv 2403.11203) and its baselines.

    python pretrain.py                                   # TRELM on the embedded default, 1 process
    torchrun --nproc_per_node=2 pretrain.py --max-steps 4  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 pretrain.py --model roberta-base --data DIR --batch-size 64

Methods (--method):
  mlm    plain continued MLM pre-training (the paper's RoBERTa / BERT rows)
  dkplm  every long-tail entity injected (DKPLM pseudo token), full-softmax entity decoding,
         all parameters train
  trelm  noise-aware injection of important entities + Contrastive Knowledge Assessing (Sec. 3.1),
         Knowledge-augmented Memory Bank (Sec. 3.2), Dynamic Knowledge Routing (Sec. 3.3);
         ablations --no-injection, --no-memory-bank, --no-routing (Table 6)

One optimizer step (Sec. 3.4):
  1. collate a micro-batch (dynamic 15% MLM masking, 80/10/10) with its linked entity mentions
  2. choose mentions to inject (--injection; "important" ranks long-tail mentions by SI, Eq. 1)
  3. input embedding of each injected span = h_e (Eq. 1 section), mixed with memory (Eq. 7)
  4. forward; L = theta * L_MLM + (1 - theta) * L_CKA (Eq. 2-3); MLM head only at masked positions
  5. memory bank update from the detached outputs (Eq. 4-6), identical on every rank
  6. every --route-every steps: re-attribute FFN neurons (Eq. 9-11) and train only the knowledge
     paths (Eq. 12) until the next re-routing

Paper symbol -> flag: theta --theta, k --window-k, gamma --gamma, lambda_0 --lambda0, beta --beta,
m --ig-steps, Q exponent 0.75 (cka.py), K --negatives.
Outputs in --output-dir: checkpoint/ (latest, with training_state.pt, for --resume), final/
(model + tokenizer, loadable with AutoModelForMaskedLM / AutoTokenizer), metrics.jsonl, config.json.
"""
import argparse
import json
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import routing
from cka import NegativeSampler, cka_loss, cka_response_prob, label_token_counts, total_loss
from entity_importance import (KnowledgeInjector, entity_frequency, long_tail_mask, select_mentions,
                               semantic_importance, span_positions)
from memory_bank import MemoryBank, mix

METHODS = ("trelm", "dkplm", "mlm")
INJECTIONS = ("important", "long-tail", "frequent", "all", "none")


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
    a("--lr", type=float, default=3e-4, help="peak learning rate (3e-4 beat 1e-4 on the default, DESIGN.md)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up; default 6%% of --max-steps")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0)
    a("--mlm-prob", type=float, default=0.15)
    a("--whole-word-mask", action="store_true")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=100, help="write checkpoint/ (for --resume) every N steps")
    a("--snapshot-every", type=int, default=0, help="also keep step_NNNNNN/ model dirs every N steps (efficiency curves)")
    a("--log-every", type=int, default=10)
    a("--resume", action="store_true", help="continue exactly from <output-dir>/checkpoint")
    a("--num-proc", type=int, default=None, help="processes for corpus preprocessing (datasets.map)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # Sec. 3.1: noise-aware knowledge injection + CKA
    a("--injection", default=None, choices=INJECTIONS, help="which mentions get h_e (default: important for trelm, long-tail for dkplm)")
    a("--no-injection", action="store_true", help="ablation: injected spans get the mask embedding instead of h_e")
    a("--long-tail-percentile", type=float, default=50.0, help="long-tail = occurring entities with frequency at or below this percentile")
    a("--important-fraction", type=float, default=0.5, help="'important' = long-tail mentions with SI in this top fraction")
    a("--si-window", type=int, default=8, help="SI(e) is computed on +-N tokens around the mention (0 = whole sequence)")
    a("--theta", type=float, default=0.5, help="Eq. 3: L = theta*L_MLM + (1-theta)*L_CKA")
    a("--negatives", type=int, default=16, help="K negatives per target drawn from Q (Eq. 2)")
    # Sec. 3.2: memory bank
    a("--no-memory-bank", action="store_true")
    a("--window-k", type=int, default=16, help="Eq. 4 window k")
    a("--gamma", type=float, default=0.1, help="Eq. 5 EMA discount")
    a("--lambda0", type=float, default=0.5, help="Eq. 7-8 initial mixing weight")
    a("--beta", type=float, default=2.0, help="Eq. 8 decay per epoch")
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
    if min(args.negatives, args.window_k, args.beta, args.si_window, args.ig_batch) < 0:
        bad("--negatives/--window-k/--beta/--si-window/--ig-batch", "expected non-negative values")
    if args.lr <= 0:
        bad("--lr", f"expected > 0, got {args.lr}")
    if args.method != "trelm":
        for flag in ("no_injection", "no_memory_bank", "no_routing"):
            if getattr(args, flag):
                bad("--" + flag.replace("_", "-"), f"is a TRELM ablation; not valid with --method {args.method}")
    if args.injection is None:
        args.injection = {"trelm": "important", "dkplm": "long-tail", "mlm": "none"}[args.method]
    elif args.method == "mlm" and args.injection != "none":
        bad("--injection", "--method mlm injects nothing; use --method trelm or dkplm")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.method)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, int(0.06 * args.max_steps))
    args.memory_bank = args.method == "trelm" and not args.no_memory_bank and args.injection != "none"
    args.routing = args.method == "trelm" and not args.no_routing
    return args


# -----------------------------------------------------------------------------
# The model wrapper: everything that needs gradients happens inside forward(), so DDP sees it.

class KnowledgeMLM(torch.nn.Module):
    """Masked LM + knowledge injection + MLM / CKA / entity-decoding losses in one forward."""

    def __init__(self, mlm, injector=None, decoding="none"):
        super().__init__()
        self.mlm = mlm
        self.injector = injector
        self.decoding = decoding  # "cka" (TRELM, sampled softmax), "full" (DKPLM), "none"

    def forward(self, input_ids, attention_mask, mlm_labels, inj=None, theta=0.5, return_hidden=False):
        emb = self.mlm.get_input_embeddings()
        x = emb(input_ids)  # (B, T, H)
        if inj is not None:
            h = inj["h_e"] if "h_e" in inj else self.injector.embed(emb.weight, inj["ent_id"])  # (Ms, H)
            if inj.get("mem") is not None:
                h = mix(h, inj["mem"][0], inj["mem"][1], inj["lam"])  # Eq. (7)
            x = x.index_put((inj["rows"], inj["cols"]), h[inj["mention"]].to(x.dtype))
        hidden = self.mlm.base_model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        out = {}
        sel = mlm_labels != -100
        out["l_mlm"] = F.cross_entropy(common.mlm_logits(self.mlm, hidden[sel]).float(), mlm_labels[sel]) \
            if sel.any() else hidden.sum() * 0.0
        loss = out["l_mlm"]
        if inj is not None and len(inj["rows"]) and self.decoding != "none":
            h_span = hidden[inj["rows"], inj["cols"]]  # (P, H)
            if self.decoding == "cka":
                out["l_cka"] = cka_loss(self.mlm, h_span, inj["targets"], inj["negatives"])  # Eq. (2)
            else:
                out["l_cka"] = F.cross_entropy(common.mlm_logits(self.mlm, h_span).float(), inj["targets"])
            loss = total_loss(out["l_mlm"], out["l_cka"], theta)  # Eq. (3)
        out["loss"] = loss
        if return_hidden:
            out["hidden"] = hidden  # (B, T, H) the memory bank reads it detached; routing's P_x needs its graph
        return out


# -----------------------------------------------------------------------------

def head_of(batch, inj, n):
    """The first n sequences of a batch and the injected positions inside them (n = 0: all)."""
    if n == 0 or n >= batch["input_ids"].shape[0]:
        return batch, inj
    b = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "mlm_labels")}
    if inj is None:
        return b, None
    keep = inj["rows"] < n  # (P,) positions in the kept rows; per-mention tensors stay whole
    j = dict(inj, **{k: inj[k][keep] for k in ("rows", "cols", "mention", "targets", "negatives") if k in inj})
    return b, j


def tile(batch, inj, c):
    """The batch and its injection plan repeated c times along the batch dimension (IG chunks)."""
    if c == 1:
        return batch, inj
    B, Ms = batch["input_ids"].shape[0], 0 if inj is None else len(inj["ent_id"])
    b = {k: batch[k].repeat(c, 1) for k in ("input_ids", "attention_mask", "mlm_labels")}
    if inj is None:
        return b, None
    P = len(inj["rows"])
    shift = torch.arange(c, device=inj["rows"].device).repeat_interleave(P)  # (c*P,) copy index
    j = {"rows": inj["rows"].repeat(c) + shift * B, "cols": inj["cols"].repeat(c),
         "mention": inj["mention"].repeat(c) + shift * Ms, "targets": inj["targets"].repeat(c),
         "ent_id": inj["ent_id"].repeat(c), "negatives": inj["negatives"].repeat(c, 1)}
    if "h_e" in inj:
        j["h_e"] = inj["h_e"].repeat(c, 1)
    if inj.get("mem") is not None:
        j["mem"], j["lam"] = tuple(m.repeat(c, 1) for m in inj["mem"]), inj["lam"]
    return b, j


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

        self.injector = self.sampler = self.bank = None
        decoding = {"trelm": "cka", "dkplm": "full", "mlm": "none"}[args.method]
        if args.injection != "none":
            self.injector = KnowledgeInjector(self.kg, tok, seed=args.seed)
            ent = np.fromiter((e for row in self.ds["ent_id"] for e in row), dtype=np.int64)
            self.freq = entity_frequency(ent, self.kg.num_entities)
            self.long_tail = torch.as_tensor(long_tail_mask(self.freq, args.long_tail_percentile, inclusive=True))
        if args.method == "trelm" and args.injection != "none":
            self.sampler = NegativeSampler(label_token_counts(self.kg, tok, len(tok)))
        if args.memory_bank:
            self.bank = MemoryBank(mlm.config.hidden_size, window_k=args.window_k, gamma=args.gamma,
                                   dtype=torch.bfloat16 if args.memory_dtype == "bf16" else torch.float32,
                                   device=args.memory_device)
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
        self.net = KnowledgeMLM(mlm, self.injector, decoding).to(self.device)
        self.router = None
        self.paths = None
        self.step = 0
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
        batch, inj = head_of(batch, batch.get("inj"), a.ig_batch)

        def run(_model, repeat=1):  # P_x: probability of the correct CKA response (Eq. 9)
            b, j = tile(batch, inj, repeat)  # repeat > 1: alpha steps stacked in one forward
            h = self.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], j, return_hidden=True)["hidden"]
            if j is not None and len(j["rows"]):
                return cka_response_prob(self.net.mlm, h[j["rows"], j["cols"]], j["targets"], j["negatives"])
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
        batch = {k: v.to(self.device) for k, v in batch.items()}
        inj = batch["inj"] = self.plan_injection(batch, g)
        if self.bank is not None:  # collective under DDP: every rank calls it, with or without mentions
            H = self.net.mlm.config.hidden_size
            if inj:
                keys, init = inj["ent_id"], inj.pop("mem_init")
            else:
                keys, init = torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, H, device=self.device)
            self.bank.ensure(keys, init, process_group=self.group)
            if inj:
                inj["mem"] = tuple(t.to(self.device) for t in self.bank.read(keys))
                inj["lam"] = self.bank.lambda_at(self.epoch_fraction(), self.args.lambda0, self.args.beta)  # Eq. (8)
        return batch

    @torch.no_grad()
    def plan_injection(self, batch, g):
        """Choose mentions (Sec. 3.1 / Fig. 3) and build their injection positions, CKA targets and
        negatives, and the memory keys' initial values (the memory itself is read in get_batch)."""
        a = self.args
        if self.injector is None or len(batch["ent_id"]) == 0:
            return None
        eid = batch["ent_id"]
        ok = self.injector.injectable(eid)
        si = None
        if a.injection == "important":
            cand = ok & self.long_tail.to(eid.device)[eid]
            si = torch.zeros(len(eid), device=eid.device)
            if cand.any():
                si[cand] = self.mention_importance(batch, cand.nonzero()[:, 0])
        sel = select_mentions(a.injection, eid, si, self.long_tail.to(eid.device),
                              top_fraction=a.important_fraction, eligible=ok)
        if not sel.any():
            return None
        m = sel.nonzero()[:, 0]
        rows, cols, mention, _ = span_positions(batch["ent_batch"][m], batch["ent_start"][m], batch["ent_end"][m],
                                                torch.ones(len(m), dtype=torch.bool, device=eid.device))
        targets = batch["orig_ids"][rows, cols]  # (P,) the entity's own tokens
        batch["mlm_labels"][rows, cols] = -100  # injected positions are scored by L_CKA, not L_MLM
        inj = dict(rows=rows, cols=cols, mention=mention, ent_id=eid[m], targets=targets, sel=m)
        if a.no_injection:  # ablation: the span shows only the mask embedding
            emb = self.net.mlm.get_input_embeddings().weight
            inj["h_e"] = emb[self.tok.mask_token_id].expand(len(m), -1)
        if self.sampler is not None:
            inj["negatives"] = self.sampler.sample(targets.cpu(), a.negatives, generator=g).to(self.device)
        if self.bank is not None:  # key init: mean input embedding of the mention's own tokens
            emb = self.net.mlm.get_input_embeddings().weight
            inj["mem_init"] = torch.zeros(len(m), emb.shape[1], device=emb.device).index_add_(
                0, mention, emb[targets]) / torch.bincount(mention, minlength=len(m))[:, None]
        return inj

    def mention_importance(self, batch, idx):
        """SI(e) (Eq. 1) for mentions idx, on a window of +-si_window tokens around each mention."""
        a = self.args
        ids, attn = batch["orig_ids"], batch["attention_mask"]
        b, s, e = batch["ent_batch"][idx], batch["ent_start"][idx], batch["ent_end"][idx]
        if a.si_window == 0:
            return semantic_importance(self.net.mlm, ids, attn, b, s, e, self.tok.mask_token_id)
        W = int((e - s).max()) + 2 * a.si_window
        lo = (s - a.si_window).clamp(min=0)  # (M,)
        pos = lo[:, None] + torch.arange(W, device=ids.device)  # (M, W)
        valid = pos < attn.sum(1)[b][:, None]
        win_ids = torch.where(valid, ids[b[:, None], pos.clamp(max=ids.shape[1] - 1)], self.tok.pad_token_id)
        return semantic_importance(self.net.mlm, win_ids, valid.long(), torch.arange(len(idx), device=ids.device),
                                   s - lo, e - lo, self.tok.mask_token_id)

    @torch.no_grad()
    def update_memory(self, batch, inj, hidden):
        """Local (Eq. 4-5) and global (Eq. 6) memory of the injected entities from this forward."""
        if inj is None:
            z = torch.zeros(0, dtype=torch.long, device=hidden.device)
            self.bank.observe(hidden, batch["attention_mask"], z, z, z, z, process_group=self.group)
            return
        m = inj["sel"]
        self.bank.observe(hidden, batch["attention_mask"], batch["ent_batch"][m], batch["ent_start"][m],
                          batch["ent_end"][m], inj["ent_id"], process_group=self.group)

    def epoch_fraction(self):
        """q in Eq. (8): epochs of data seen so far."""
        return self.step * self.global_batch / len(self.ds)

    # -- training --------------------------------------------------------------------

    def train_step(self):
        a = self.args
        first = None  # micro-batch 0, when re-routing already built it (its SI forward is not repeated)
        if a.routing and self.step >= a.route_warmup and (self.router is None or self.step % a.route_every == 0):
            self.net.eval()
            first = self.get_batch(0)
            self.reroute(first)
        self.net.train()
        lr = lr_at(self.step, a)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = {"l_mlm": 0.0, "l_cka": 0.0, "loss": 0.0, "injected": 0, "mentions": 0, "tokens": 0}
        for micro in range(a.grad_accum):
            batch = first if micro == 0 and first is not None else self.get_batch(micro)
            inj = batch["inj"]
            sync = micro == a.grad_accum - 1
            ddp_wrapped = isinstance(self.model, DDP)
            with (self.model.no_sync() if ddp_wrapped and not sync else nullcontext()), self.autocast:
                out = self.model(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], inj,
                                 theta=a.theta, return_hidden=self.bank is not None)
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"non-finite loss {out['loss'].item()} at step {self.step} "
                                         f"(micro-batch {micro}); the last good checkpoint is kept in "
                                         f"{os.path.join(a.output_dir, 'checkpoint')}")
            (out["loss"] / a.grad_accum).backward()
            if self.bank is not None:  # Eq. (4)-(6), after the forward pass; every rank joins the gather
                self.update_memory(batch, inj, out["hidden"].detach().float())
            for k in ("l_mlm", "l_cka", "loss"):
                stats[k] += float(out[k].detach()) / a.grad_accum if k in out else 0.0
            stats["tokens"] += int(batch["attention_mask"].sum()) * self.world
            stats["injected"] += 0 if inj is None else len(inj["sel"])
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
        """Write <output-dir>/<name>/ (model + tokenizer [+ training_state.pt]) via a temp dir and rename."""
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
                        "paths": self.paths, "bank": self.bank.state_dict() if self.bank is not None else None},
                       os.path.join(tmp, "training_state.pt"))
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    RESUME_KEYS = ("method", "model", "data", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps",
                   "max_steps", "seed", "injection", "no_injection", "no_memory_bank", "no_routing",
                   "mlm_prob", "whole_word_mask", "theta", "negatives", "window_k", "gamma", "lambda0", "beta",
                   "route_every", "route_ratio", "route_threshold", "ig_steps", "ig_batch", "ig_form", "route_warmup")

    def resume(self):
        from safetensors.torch import load_file
        ck = os.path.join(self.args.output_dir, "checkpoint")
        path = os.path.join(ck, "training_state.pt")
        if not os.path.exists(path):
            raise SystemExit(f"--resume: {path} not found (no checkpoint in --output-dir {self.args.output_dir})")
        st = torch.load(path, map_location="cpu", weights_only=False)
        old, new = st["config"], vars(self.args)
        diff = [k for k in self.RESUME_KEYS if old.get(k) != new.get(k)]
        if diff:  # (--max-steps too: the learning-rate schedule depends on it)
            raise SystemExit("--resume: flags differ from the checkpoint's: " +
                             ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {new.get(k)}" for k in diff))
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
        if self.bank is not None:
            self.bank.load_state_dict(st["bank"])
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


def trim_metrics(path, step):
    """On resume drop metric lines written after the checkpoint (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    common.atomic_write(path, lambda tmp: open(tmp, "w").writelines(keep))


def main(argv=None):
    args = resolve_config(get_parser().parse_args(argv))
    t = Trainer(args)
    a = t.args
    metrics_path = os.path.join(a.output_dir, "metrics.jsonl")
    if a.resume:
        t.resume()
        if t.master:
            trim_metrics(metrics_path, t.step)
    elif t.master and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if t.master:
        common.atomic_write_json(os.path.join(a.output_dir, "config.json"),
                                 {"config": vars(a), "commit": common.git_commit(), "world_size": t.world,
                                  "global_batch": t.global_batch, "sequences": len(t.ds)})
        print(f"{a.method}: {len(t.ds)} sequences, global batch {t.global_batch} "
              f"({a.batch_size} x {a.grad_accum} accum x {t.world} procs), {a.max_steps} steps, device {t.device}",
              flush=True)
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
                bar.set_postfix(loss=f"{stats['loss']:.3f}", cka=f"{stats['l_cka']:.3f}")
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
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
