"""Knowledge-enhanced continued pre-training: TRELM (arXiv 2403.11203) and its baselines; the training loop.

    python pretrain.py                                   # TRELM on the embedded default, 1 process
    torchrun --nproc_per_node=2 pretrain.py --max-steps 4  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 pretrain.py --model roberta-base --data DIR --batch-size 64

Methods (--method; config.METHOD_TABLE is the one place where they differ):
  mlm    plain continued MLM pre-training (the paper's RoBERTa / BERT rows)
  dkplm  DKPLM (alibaba/EasyNLP's released code): long-tail mentions by KLT = long-tail * SI * KG
         degree, pseudo token E(t) - E(r), full-softmax decoding of the entity's tokens from h
         (--dkplm-decoder relation: from h * r_hat), L_MLM + L_dec, all parameters train
  trelm  noise-aware injection of important entities + Contrastive Knowledge Assessing (Sec. 3.1),
         Knowledge-augmented Memory Bank (Sec. 3.2), Dynamic Knowledge Routing (Sec. 3.3);
         ablations --no-injection, --no-memory-bank, --no-routing (Table 6)

Where each part lives: the flags and their resolution config.py, the model and its losses model.py,
what a micro-batch injects and the memory it reads knowledge.py (with entity_importance.py, cka.py,
memory_bank.py), routing routing.py, checkpoints checkpoint.py; this file is the loop.

One optimizer step (Sec. 3.4), Trainer.train_step:
  0. once, before training: SI(e) (Eq. 1) of every corpus mention with the initial model and the
     corpus-level threshold of "important" (knowledge.Knowledge)
  1. a micro-batch: dynamic 15% MLM masking (80/10/10) and its linked entity mentions (get_batch)
  2. its knowledge plan (Knowledge.plan): the mentions to inject (--injection; "important" = long-tail
     mentions above the threshold), their span positions, CKA targets and negatives from Q, and the
     memory read for them (Eq. 7-8 inputs); built complete, never changed afterwards
  3. forward: input embedding of each injected span = h_e mixed with memory (Eq. 7);
     L = theta * L_MLM + (1 - theta) * L_CKA (Eq. 2-3); the MLM head only at masked positions
  4. routing (Sec. 3.3, Trainer.route), from --route-warmup on: every --route-every steps attribute
     the FFN neurons (Eq. 9-11, routing.Attribution under --ig-form) and keep the top ones: the
     knowledge paths (Eq. 12) that this and the next steps' backward trains, with whatever else
     --route-scope trains
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
divergence errors print one line (--debug: the traceback). On GPUs: bf16 autocast and fused AdamW;
--attention (sdpa, the default, or eager), --compile (torch.compile) and --loader-workers N (batches
collated in N processes, bitwise those of the training thread) are flags.
"""
import datetime
import gc
import json
import os
import time
from contextlib import closing, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import common
import config
import data
import routing
from knowledge import Knowledge
from kg import load_kg
from memory_bank import lambda_for
from model import KnowledgeMLM, KnowledgeProb
from optim import from_adamw, lr_at, make_optimizer

STARTED = time.time()  # this process's start, near enough: startup_s in config.json counts from here


def process_group_backend(use_cuda):
    """The DDP process group's backend: on GPU nccl for CUDA tensors and gloo for CPU tensors (the
    memory bank lives on the CPU by default, --memory-device); nccl alone serves no CPU tensor."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def setup_process(device, timeout_minutes):
    """-> (ddp, rank, world, torch.device): torchrun's environment (RANK set) starts DDP, whose collectives
    wait up to --ddp-timeout minutes for the slowest rank."""
    if int(os.environ.get("RANK", -1)) == -1:
        want = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return False, 0, 1, torch.device(want)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group(backend=process_group_backend(use_cuda), timeout=datetime.timedelta(minutes=timeout_minutes))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    else:  # share the cores between the local processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return True, dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def collated(store, collate, cfg, step, micro, rank, world):
    """Micro-batch `micro` of optimizer step `step` on rank `rank`, collated (data.MLMCollator `collate`)
    -> (batch, its store indices, the torch.Generator it drew from). Masking, and the knowledge plan's
    negatives drawn next from the same generator, are a function of (seed, step, slot in the global
    batch), whatever the layout."""
    d, seed = cfg.data, cfg.run.seed
    idx = data.micro_batch_indices(step, micro, rank, len(store), d.batch_size, d.grad_accum, world, seed)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(
        [seed, step, micro * world + rank]).generate_state(1)[0]))
    return collate(store.rows(idx), g), idx, g


class MicroBatches(torch.utils.data.Dataset):
    """--loader-workers: item k = step * --grad-accum + micro is collated()'s micro-batch of (step, micro) on
    this rank, returned as (batch, indices, the generator's state after collation). It holds the store's
    path, not its arrays: each worker opens the memory-mapped store itself (nothing large is pickled)."""

    def __init__(self, path, collate, cfg, rank, world):
        self.path, self.collate, self.cfg, self.rank, self.world = path, collate, cfg, rank, world
        self.store = None

    def __getitem__(self, k):
        if self.store is None:
            self.store = data.Store(self.path)
        step, micro = divmod(k, self.cfg.data.grad_accum)
        batch, idx, g = collated(self.store, self.collate, self.cfg, step, micro, self.rank, self.world)
        return batch, idx, g.get_state()


class Trainer:
    """One process of a pre-training run (cfg: config.Config): data, knowledge (Knowledge), model
    (net: model.KnowledgeMLM around the masked LM net.mlm; wrapped: its DDP wrapper, or net itself),
    routing, optimizer."""

    OPERATIONAL = checkpoint.OPERATIONAL

    def __init__(self, cfg):
        self.cfg = cfg
        self.ddp, self.rank, self.world, self.device = setup_process(cfg.run.device, cfg.run.ddp_timeout)
        self.master = self.rank == 0
        if self.master:  # train() prepared it; a Trainer driven directly (bench, tests) logs its routings there too
            os.makedirs(cfg.run.output_dir, exist_ok=True)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        common.seed_everything(cfg.run.seed + self.rank)
        mlm, self.tok = common.load_mlm(cfg.run.model, attn_implementation=cfg.run.attention)
        if self.tok.mask_token_id is None or self.tok.pad_token_id is None:
            raise SystemExit(f"--model {cfg.run.model}: tokenizer has no mask or pad token; a masked LM is required")
        r = cfg.routing  # a trained head routes from step 0; routing would freeze a random one
        self.warmup_reason = "fresh MLM head" if r.routing and r.route_warmup and \
            not common.has_mlm_head(cfg.run.model) else None
        cache = common.cache_root(cfg.data.cache_dir)
        self.store, kg_dir = data.open_data(cfg.data.data, self.tok, cfg.data.seq_len, cache, cfg.data.num_proc)
        kg = load_kg(kg_dir, os.path.join(cache, "kg"))
        self.collate = data.MLMCollator(self.tok, cfg.data.mlm_prob, cfg.data.whole_word_mask)
        self.global_batch = cfg.data.batch_size * cfg.data.grad_accum * self.world
        method = config.method_of(cfg)
        self.know = Knowledge(cfg.injection, cfg.memory, method, kg, self.tok, self.store, mlm, self.device,
                              seed=cfg.run.seed, model_name=cfg.run.model, cache=cache, rank=self.rank, world=self.world)
        self.net = KnowledgeMLM(mlm, self.know.injector, method.decoding, method.loss,
                                cfg.injection.kg_grad == "on").to(self.device)
        self.attribution = routing.Attribution(r.ig_form, r.ig_steps, r.ig_chunk, r.ig_memory_mb) \
            if r.routing and r.route_select == "attr" else None  # Eq. (9)-(11)
        self.router, self.paths = None, None  # routing.Router and its knowledge paths, from --route-warmup on
        self.routing_began = None  # (attribution seconds, the paths before) of the routing this step's backward ends
        self.step, self.elapsed, self.saved_step = 0, 0.0, None  # saved_step: the checkpoint on disk, if any
        self.optimizer = make_optimizer(self.net.parameters(), cfg.optim)  # fused on CUDA
        self.loader, self.loader_k = None, None  # --loader-workers: the batches' iterator, the next micro-batch's k
        self.wrap()

    def wrap(self):
        """The DDP wrapper over what trains now (built again when routing changes that set), around the
        torch.compile'd net with --compile."""
        self.wrapped = None  # the previous wrapper goes before the next registers its gradient hooks
        gc.collect()
        net = torch.compile(self.net) if self.cfg.run.compile else self.net
        if self.cfg.run.compile and self.attribution is not None and self.attribution.form == "first-order":
            # its attribution differentiates the training graph before the training backward does (retain_graph),
            # which a compiled backward allows only without donated buffers (they save memory, nothing else)
            torch._functorch.config.donated_buffer = False
        self.wrapped = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.ddp else net

    # -- one step ------------------------------------------------------------------------

    def train_step(self):
        """One optimizer step (Sec. 3.4, the module docstring's steps 1-6)."""
        c = self.cfg
        if c.routing.routing and self.router is None and self.step >= c.routing.route_warmup:
            self.start_routing()  # Eq. (12): from here on the scope's parameters train
        self.know.refresh_si(self.net.mlm, self.epoch_fraction(), self.step)
        self.net.train()  # dropout on (from_pretrained returns the model in eval mode)
        stats = {}
        for micro in range(c.data.grad_accum):
            batch = self.get_batch(micro)  # steps 1-2: masking, mentions, knowledge plan (memory read)
            routes = micro == 0 and self.routes_now()
            out = self.forward(batch, micro, self.attribution if routes else None)  # step 3
            if routes:
                self.route(batch, out)  # step 4: Eq. (9)-(12), the paths this step's backward trains
            (out["loss"] / c.data.grad_accum).backward()  # step 5 (--ig-form loss-grad: its paths chosen in it)
            if routes:
                self.routed()
            self.know.observe(batch, out["hidden"])  # step 5: Eq. (4)-(6)
            for k in [k for k in out if k.startswith("l_")] + ["loss"]:
                stats[k] = stats.get(k, 0.0) + float(out[k].detach()) / c.data.grad_accum
            for k, v in self.know.counts(batch, batch["plan"]).items():
                stats[k] = stats.get(k, 0) + v
            stats["tokens"] = stats.get("tokens", 0) + int(batch["attention_mask"].sum()) * self.world
        stats["lambda"] = self.lam()  # Eq. (8)
        if self.know.bank is not None:
            stats["bank_bytes"] = self.know.bank.nbytes()
        stats["lr"] = self.optimizer_step()  # step 6
        return stats

    def get_batch(self, micro):
        """Micro-batch `micro` of this step on this rank, with its knowledge plan (batch["plan"]).
        Masking and negatives are a function of (seed, step, slot in the global batch), whatever the layout."""
        if self.cfg.run.loader_workers:
            batch, idx, g = self.loaded(micro)
        else:
            batch, idx, g = collated(self.store, self.collate, self.cfg, self.step, micro, self.rank, self.world)
        si = self.know.batch_si(idx)
        if si is not None:  # (M,) in the collator's mention order
            batch["ent_si"] = si
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}  # async from pinned memory
        plan = self.know.plan(batch, g, self.net.mlm.get_input_embeddings().weight, self.lam())
        if plan is not None:  # injected positions are scored by the decoding loss, not L_MLM
            batch["mlm_labels"] = batch["mlm_labels"].clone()
            batch["mlm_labels"][plan.rows, plan.cols] = -100
        batch["plan"] = plan
        return batch

    def loaded(self, micro):
        """collated()'s (batch, indices, generator) of micro-batch `micro` of this step from the DataLoader's
        workers (--loader-workers), which run ahead over k = step * --grad-accum + micro; the loader starts
        again at another k (a --resume, a caller that repeats a step). The generator is rebuilt from its
        state after collation, so the plan's negatives are drawn as the training thread would draw them."""
        k = self.step * self.cfg.data.grad_accum + micro
        if k != self.loader_k:
            self.close()  # its workers stop before the next ones start
            end = max(k + 1, self.cfg.optim.max_steps * self.cfg.data.grad_accum)
            batches = MicroBatches(self.store.path, self.collate, self.cfg, self.rank, self.world)
            self.loader = iter(torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=range(k, end), num_workers=self.cfg.run.loader_workers,
                multiprocessing_context="spawn",  # never fork a process that holds a model (and CUDA)
                pin_memory=self.device.type == "cuda"))
        batch, idx, state = next(self.loader)
        self.loader_k = k + 1
        g = torch.Generator()
        g.set_state(state)
        return batch, idx, g

    def close(self):
        """Stop the DataLoader's workers (--loader-workers), if any."""
        self.loader, self.loader_k = None, None  # the iterator's finaliser shuts its workers down

    def forward(self, batch, micro, attribution=None):
        """The loss of micro-batch `micro`; under DDP gradients are synchronised on the last one only.
        attribution: a routing.Attribution that watches this forward (out["acts"]: what it captured)."""
        sync = micro == self.cfg.data.grad_accum - 1
        watch = attribution.watch(self.net.mlm) if attribution is not None else nullcontext()
        with (self.wrapped.no_sync() if self.ddp and not sync else nullcontext()), self.autocast, watch as acts:
            out = self.wrapped(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], batch["plan"],
                               theta=self.cfg.injection.theta, return_hidden=True)
        out["acts"] = acts
        if not torch.isfinite(out["loss"]):
            raise self.non_finite(f"loss {out['loss'].item()} (micro-batch {micro})")
        return out

    def optimizer_step(self):
        """Clip, step at this step's learning rate, zero the gradients -> the learning rate."""
        o, lr = self.cfg.optim, lr_at(self.step, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], o.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def epoch_fraction(self):
        """Epochs of data seen so far (fractional)."""
        return self.step * self.global_batch / len(self.store)

    def lam(self):
        """Eq. (8)'s lambda at this step (memory_bank.lambda_for)."""
        return lambda_for(self.cfg.memory, self.step, self.cfg.optim.max_steps, self.epoch_fraction())

    # -- routing (Sec. 3.3) -------------------------------------------------------------------

    def routes_now(self):
        return self.router is not None and (self.paths is None or self.step % self.cfg.routing.route_every == 0)

    def start_routing(self):
        """From --route-warmup on, only the --route-scope parameters train, the FFN weights only at the
        knowledge paths (routing.Router); AdamW's moments carry over into moments for every FFN neuron,
        stepped only where selected (optim.from_adamw)."""
        r = self.cfg.routing
        self.router = routing.Router(self.net.mlm, r.route_scope, r.train_layernorm, r.train_head_bias)
        self.optimizer = from_adamw(self.optimizer, self.router)
        self.wrap()

    def route(self, batch, out=None):
        """Eq. (9)-(12): the knowledge paths of this and the next --route-every - 1 steps: the top
        --route-ratio FFN neurons of each layer by attribution (on out, this step's forward, when the
        --ig-form reads it), all-reduced over ranks (identical paths everywhere), or as many drawn at
        random (--route-select random). --ig-form loss-grad only arms the router: the backward that
        follows chooses them (routing.Router.arm). routed() logs them."""
        r, t0 = self.cfg.routing, time.time()
        k = max(1, round(r.route_ratio * self.router.sizes[0]))
        if self.attribution is None:  # --route-select random
            self.router.set_paths(routing.random_paths(len(self.router.sizes), self.router.sizes[0], k, self.cfg.run.seed,
                                                       self.step))
        elif self.attribution.in_backward:
            self.router.arm(k, dist.all_reduce if self.ddp else None)
        else:
            with self.autocast:
                attr = self.attribution(self.net.mlm, self.knowledge_prob(batch), out)  # (L, I)
            if self.ddp:
                dist.all_reduce(attr)
            self.router.set_paths(routing.select_paths(attr, ratio=r.route_ratio, threshold=r.route_threshold))
        self.routing_began = time.time() - t0, self.paths

    def routed(self):
        """After the backward of a routing step: its paths (what --resume restores) and one line to routing.jsonl
        (attr_s: the attribution's seconds before the backward; loss-grad's share of the backward is not split out)."""
        seconds, old = self.routing_began
        self.paths = [p.cpu() for p in self.router.paths]
        self.log_routing({"step": self.step, "attr_s": round(seconds, 3),
                          "selected": [len(p) for p in self.paths],
                          "jaccard_prev": None if old is None else round(routing.path_jaccard(old, self.paths), 4)})

    def knowledge_prob(self, batch):
        """P_x of Eq. (9) on a micro-batch, over its first --ig-batch sequences where the attribution runs a
        pass of its own (model.KnowledgeProb)."""
        return KnowledgeProb(self.net, batch, self.cfg.routing.ig_batch)

    def log_routing(self, rec):
        """Rank 0 appends rec to <output-dir>/routing.jsonl."""
        if self.master:
            with open(os.path.join(self.cfg.run.output_dir, "routing.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- checkpoints (checkpoint.py) ------------------------------------------------------------

    def save(self, name, training_state=True):
        """<output-dir>/<name>/: model + tokenizer [+ training_state.pt: everything --resume needs]."""
        rngs = checkpoint.rng_states(self.device, self.ddp, self.world) if training_state else None  # collective
        if self.master:
            st = None if not training_state else {
                "step": self.step, "elapsed": self.elapsed, "optimizer": self.optimizer.state_dict(), "rng": rngs,
                "config": self.cfg.flat(), "commit": common.git_commit(), "world": self.world,
                "global_batch": self.global_batch, "threads": torch.get_num_threads(), "paths": self.paths,
                **self.know.state_dict()}
            checkpoint.save(self.cfg.run.output_dir, name, self.net.mlm, self.tok, st)
        if training_state:
            self.saved_step = self.step

    def resume(self):
        """Continue exactly from <output-dir>'s checkpoint -> the run's recorded --max-steps."""
        out = self.cfg.run.output_dir
        st, ck = checkpoint.find_checkpoint(out)
        diff = checkpoint.differences(st, self.cfg.flat(), self.world, self.global_batch, self.cfg.run.deterministic,
                                      config.defaults())
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
        checkpoint.promote(out, ck, self.ddp, self.master)
        return st["config"]["max_steps"]

    def non_finite(self, what):
        """The one error for a non-finite value in a step: the step as metrics.jsonl counts it (from 1),
        and what is on disk."""
        ck = os.path.join(self.cfg.run.output_dir, "checkpoint")
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {ck}" if self.saved_step is not None
                else f"no checkpoint was written (--save-every {self.cfg.run.save_every})")
        return FloatingPointError(f"non-finite {what} at step {self.step + 1}; {kept}. "
                                  f"A lower --lr (now {self.cfg.optim.lr}) or --grad-clip may help.")


def start_logs(t, record):
    """After the resume is validated, never before: a fresh run starts fresh logs; a resumed one drops
    the lines written after its checkpoint (checkpoint.trim_log) and records the resume (and an
    extension of --max-steps) in config.json."""
    cfg, out = t.cfg, t.cfg.run.output_dir
    if not cfg.run.resume:
        for name in checkpoint.LOGS:  # a run that died before its first checkpoint left them
            open(os.path.join(out, name), "w").close()
        if t.warmup_reason:
            t.log_routing({"step": 0, "warmup": cfg.routing.route_warmup, "reason": t.warmup_reason})
        return record
    checkpoint.trim_log(os.path.join(out, "metrics.jsonl"), t.step)
    checkpoint.trim_log(os.path.join(out, "routing.jsonl"), t.step - 1)
    previous = json.load(open(os.path.join(out, "config.json"))) if os.path.exists(os.path.join(out, "config.json")) else {}
    record["commit"] = previous.get("commit", record["commit"])  # the run's first commit; each resume's below
    record["resumed"] = previous.get("resumed", []) + [{"step": t.step, "commit": common.git_commit()}]
    old_max = previous.get("config", {}).get("max_steps", cfg.optim.max_steps)
    if cfg.optim.max_steps != old_max:
        record["resumed"][-1]["max_steps"] = [old_max, cfg.optim.max_steps]
    return record


def train(cfg):
    """One run, holding <output-dir>/.pretrain.lock from before anything is written there to its end (rank 0:
    one run per --output-dir at a time; common.output_lock)."""
    master = int(os.environ.get("RANK", 0)) == 0
    with common.output_lock(cfg.run.output_dir, "pretrain", "pretrain.py: --output-dir") if master else nullcontext():
        _train(cfg)


def _train(cfg):
    checkpoint.prepare_output_dir(cfg.run)
    if cfg.run.deterministic:
        make_deterministic()
    t = Trainer(cfg)
    run, o, inj = cfg.run, cfg.optim, cfg.injection
    census = t.know.census()
    if t.know.injector is not None and census["injectable_mentions"] == 0:
        raise SystemExit(f"pretrain.py: --method {run.method} --injection {inj.injection}: nothing can be injected: "
                         f"{census['mentions']} linked mentions of {census['entities_linked']} entities in --data "
                         f"{cfg.data.data}, none with a KG triple that --injection {inj.injection} selects. Link "
                         f"entities (corpus.jsonl \"entities\" or KG aliases that occur in the text), or use --method mlm")
    if run.resume:
        old_max = t.resume()
        if old_max != o.max_steps and t.master:
            print(f"--resume: extending the run from --max-steps {old_max} to {o.max_steps} at step {t.step}: the "
                  f"linear learning-rate decay is recomputed for {o.max_steps} steps (warm-up {o.warmup_steps} "
                  f"steps as recorded), so the learning rate continues at {lr_at(t.step, o):.3g}"
                  + (f"; Eq. 8's --lambda-epochs {cfg.memory.lambda_epochs:g} now span {o.max_steps} steps"
                     if cfg.memory.lambda_epochs else ""), flush=True)
    if t.warmup_reason and t.master:
        print(f"routing: --model {run.model} has no trained MLM head (freshly initialised); all parameters train for "
              f"the first {cfg.routing.route_warmup} steps (--route-warmup), then routing starts", flush=True)
    startup = [None] * t.world  # seconds from each rank's start to its first step: how long ranks wait on each other
    if t.ddp:
        dist.all_gather_object(startup, round(time.time() - STARTED, 2))
    else:
        startup = [round(time.time() - STARTED, 2)]
    record = {"config": cfg.flat(), "commit": common.git_commit(), "world_size": t.world, "startup_s": startup,
              "global_batch": t.global_batch, "threads": torch.get_num_threads(), **census}
    if t.master:
        common.atomic_write_json(os.path.join(run.output_dir, "config.json"), start_logs(t, record))
        d = cfg.data
        print(f"{run.method}: {len(t.store)} sequences, global batch {t.global_batch} "
              f"({d.batch_size} x {d.grad_accum} accum x {t.world} procs), {o.max_steps} steps, device {t.device}",
              flush=True)
        if t.know.injector is not None:
            c = census
            print(f"{run.method}: {c['mentions']} linked mentions ({c['mentions'] / c['sequences']:.2f} per sequence), "
                  f"{c['entities_linked']} of {c['entities']} KG entities linked; --injection {inj.injection} may "
                  f"inject {c['injectable_mentions']} mentions "
                  f"({100 * c['injectable_mentions'] / max(1, c['mentions']):.1f}%)", flush=True)
        if "long_tail_words" in census:
            print(f"{run.method}: --long-tail-words: {census['long_tail_words']} word keys, "
                  f"{census['long_tail_word_occurrences']} occurrences in the corpus", flush=True)
    bar = tqdm(total=o.max_steps, initial=t.step, disable=not t.master, desc=run.method, dynamic_ncols=True)
    t0 = time.time()
    with open(os.path.join(run.output_dir, "metrics.jsonl"), "a") if t.master else nullcontext() as log, \
            closing(t):  # --loader-workers: the workers stop however the loop ends
        while t.step < o.max_steps:
            s0 = time.time()
            stats = t.train_step()
            dt = time.time() - s0
            t.elapsed += dt
            bar.update(1)
            if t.master and (t.step % run.log_every == 0 or t.step == o.max_steps or t.step == 1):
                rec = {"step": t.step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()},
                       "tokens_per_s": round(stats["tokens"] / dt, 1), "elapsed": round(t.elapsed, 3)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", mlm=f"{stats['l_mlm']:.3f}")
            if run.save_every and t.step % run.save_every == 0 and t.step < o.max_steps:
                t.save("checkpoint")
            if run.snapshot_every and t.step % run.snapshot_every == 0:
                t.save(f"step_{t.step:06d}", training_state=False)
    bar.close()
    t.save("checkpoint")
    t.save("final", training_state=False)
    if t.master:
        print(f"done: {t.step} steps in {time.time() - t0:.1f}s; model in {os.path.join(run.output_dir, 'final')}")
    if t.ddp:
        dist.barrier()  # no rank tears the group down while another is still saving or printing
        dist.destroy_process_group()


def main(argv=None):
    """The CLI: the project's own data and training errors print one line (--debug: the traceback)."""
    cfg = config.from_argv(argv, description=__doc__)
    try:
        train(cfg)
    except (data.DataError, FloatingPointError) as e:
        if cfg.run.debug:
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
