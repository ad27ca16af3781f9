"""The configuration of a pretrain.py run: its command line, checked and resolved once into frozen groups.

    cfg = config.from_argv(["--method", "trelm", "--route-scope", "strict"])
    cfg.routing.route_every, cfg.memory.gamma, cfg.optim.lr    # each component reads its own group
    cfg.flat()                                                 # {flag: value}: config.json, checkpoints

One group per concern, each a frozen dataclass whose fields are the flags' argparse names (so a field
is found by its flag: --route-every -> cfg.routing.route_every):

| group      | paper            | what                                                          |
|------------|------------------|---------------------------------------------------------------|
| run        |                  | method, model, output dir, seed, devices, logging, resume,    |
|            |                  | speed (--attention, --compile, --loader-workers)              |
| data       | Sec. 4.1         | corpus + KG, sequence length, batch, MLM masking               |
| optim      | Sec. 4.1         | steps, AdamW, linear warm-up and decay                         |
| injection  | Sec. 3.1, Eq. 1-3| which mentions get h_e, SI(e), CKA (theta, K)                  |
| memory     | Sec. 3.2, Eq. 4-8| the knowledge-augmented memory bank and lambda's decay          |
| routing    | Sec. 3.3, Eq. 9-12| attribution (--ig-form), knowledge paths, the scope that trains |

Every default that depends on something else is filled here and nowhere later: the --method row of
METHOD_TABLE (--injection, the memory bank and routing on or off), --output-dir, the warm-up's 6% of
--max-steps (the recorded run's warm-up when --resume extends --max-steps), and --route-warmup (0, or
--route-every when the model's MLM head is freshly initialised: routing freezes the head, so it must
learn first). Every flag is checked against its range and the others before anything is loaded;
a bad one ends the run in one line naming it.
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import common
from entity_importance import STRATEGIES
from routing import FORMS, SCOPES


@dataclass(frozen=True)
class Method:
    """What a --method does; a new baseline is one row of METHOD_TABLE (plus a model.DECODERS entry if it
    decodes its spans in a new way).
    injection  default --injection strategy (entity_importance.select_mentions)
    decoding   what the injected spans are trained to predict: a model.DECODERS key, or "none"
    loss       how L_MLM and the decoding loss combine: a model.LOSSES key
    sampler    CKA negatives from Q (Eq. 2); bank  memory bank (Sec. 3.2); routing  knowledge paths (Sec. 3.3)"""
    injection: str
    decoding: str
    loss: str
    sampler: bool
    bank: bool
    routing: bool


METHOD_TABLE = {
    "trelm": Method(injection="important", decoding="cka", loss="theta", sampler=True, bank=True, routing=True),
    "dkplm": Method(injection="dkplm", decoding="plain", loss="sum", sampler=False, bank=False, routing=False),
    "mlm": Method(injection="none", decoding="none", loss="mlm", sampler=False, bank=False, routing=False),
}
METHODS = tuple(METHOD_TABLE)
LOSSES_OF_DKPLM = ("sum", "theta")  # --dkplm-loss: model.LOSSES keys


def method_of(cfg):
    """The Method a run trains: its METHOD_TABLE row, with DKPLM's readings (--dkplm-loss, --dkplm-decoder)."""
    row = METHOD_TABLE[cfg.run.method]
    if cfg.run.method == "dkplm":
        row = replace(row, loss=cfg.injection.dkplm_loss, decoding=cfg.injection.dkplm_decoder)
    return row

# --preset: the paper's setting on 8 GPUs. TRELM states the model, the data (26M Wikipedia sequences +
# Wikidata5M) and the hardware (8 x A100-80G) but no optimisation setting; the values below come from
# DKPLM's released code and RoBERTa, each with its source in docs/departures.md ("Presets").
PAPER_STEPS = 4 * -(-26_000_000 // 256)  # 4 epochs of the paper's 26M sequences at a global batch of 256 (32 x 8 GPUs)
PRESETS = {
    name: dict(model=model, seq_len=128, batch_size=32, grad_accum=1, lr=1e-4, max_steps=PAPER_STEPS,
               warmup_steps=PAPER_STEPS // 10)
    for name, model in (("roberta-base", "roberta-base"), ("bert-base", "bert-base-uncased"))
}


@dataclass(frozen=True)
class Run:
    method: str
    model: str
    preset: Optional[str]
    output_dir: str
    seed: int
    save_every: int
    snapshot_every: int
    log_every: int
    resume: bool
    overwrite: bool
    debug: bool
    deterministic: bool
    device: str
    ddp_timeout: float
    attention: str
    compile: bool
    loader_workers: int


@dataclass(frozen=True)
class Data:
    data: str
    cache_dir: Optional[str]
    seq_len: int
    batch_size: int
    grad_accum: int
    mlm_prob: float
    whole_word_mask: bool
    num_proc: Optional[int]


@dataclass(frozen=True)
class Optim:
    max_steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class Injection:
    injection: str
    no_injection: bool
    long_tail_percentile: float
    important_fraction: float
    si_window: int
    si_refresh: int
    si_batch: int
    theta: float
    negatives: int
    kg_grad: str
    dkplm_loss: str
    dkplm_decoder: str
    dkplm_select: str


@dataclass(frozen=True)
class Memory:
    memory_bank: bool  # resolved: the method has a bank, and it is neither ablated nor without injection
    no_memory_bank: bool
    window_k: int
    gamma: float
    lambda0: float
    beta: float
    lambda_q: str
    lambda_epochs: float
    memory_scale: str
    memory_init: str
    memory_window: str
    long_tail_words: bool
    word_percentile: float
    word_min_count: int
    memory_dtype: str
    memory_device: str


@dataclass(frozen=True)
class Routing:
    routing: bool  # resolved: the method routes and --no-routing is not given
    no_routing: bool
    ig_steps: int
    route_scope: str
    route_select: str
    ig_form: str
    ig_chunk: int
    ig_memory_mb: float
    ig_batch: int
    route_every: int
    route_warmup: int
    route_ratio: float
    route_threshold: Optional[float]
    train_layernorm: bool
    train_head_bias: bool


GROUPS = {"run": Run, "data": Data, "optim": Optim, "injection": Injection, "memory": Memory, "routing": Routing}
GROUP_OF = {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}  # flag dest -> its group


@dataclass(frozen=True)
class Config:
    """A resolved run configuration (from_argv): one frozen group per concern."""
    run: Run
    data: Data
    optim: Optim
    injection: Injection
    memory: Memory
    routing: Routing

    def flat(self):
        """{flag dest: value} over every group: what config.json and checkpoints record, and what a
        --resume compares (checkpoint.differences)."""
        return {k: v for g in GROUPS for k, v in asdict(getattr(self, g)).items()}

    def replace(self, **changes):
        """A copy with some flags changed (by their dest names), each in its own group."""
        unknown = set(changes) - set(GROUP_OF)
        if unknown:
            raise TypeError(f"config.replace: no such flag(s) {sorted(unknown)}")
        by_group = {}
        for k, v in changes.items():
            by_group.setdefault(GROUP_OF[k], {})[k] = v
        return replace(self, **{g: replace(getattr(self, g), **c) for g, c in by_group.items()})


def get_parser(description=None):
    p = argparse.ArgumentParser(prog="pretrain.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    a = g.add_argument
    a("--method", default="trelm", choices=METHODS)
    a("--model", default=common.DEFAULT_MODEL, help="HF masked-LM id or local dir; 'minilm' = the packaged MiniLM-L6-H384")
    a("--preset", default=None, choices=tuple(PRESETS),
      help="the paper's setting for 8 GPUs (PRESETS: model, --seq-len, --batch-size, --lr, --warmup-steps, "
           "--max-steps; sources in docs/departures.md); flags given on the command line win")
    a("--output-dir", default=None, help="default: runs/<method>")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=100, help="write checkpoint/ (for --resume) every N steps (0: at the end only)")
    a("--snapshot-every", type=int, default=0, help="also keep step_NNNNNN/ model dirs every N steps (efficiency curves)")
    a("--log-every", type=int, default=10, help="a metrics.jsonl line every N steps (and at steps 1 and the last)")
    a("--resume", action="store_true", help="continue exactly from <output-dir>/checkpoint (every run-changing flag "
      "must match the checkpoint's)")
    a("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a previous run "
      "(deletes its checkpoint/, final/, step_*/ and metrics.jsonl)")
    a("--debug", action="store_true", help="print the full traceback of data and training errors")
    a("--deterministic", action="store_true",
      help="bitwise repeatable: torch.use_deterministic_algorithms (CPU index_put_ accumulate is otherwise "
           "a threaded atomic add), the thread count recorded and checked on --resume")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--ddp-timeout", type=float, default=120.0,
      help="minutes a DDP collective may wait for the slowest rank (torch.distributed's default is 10 for nccl)")
    a("--attention", default="sdpa", choices=("sdpa", "eager"),
      help="the attention kernel (transformers' attn_implementation): sdpa = torch's scaled_dot_product_attention "
           "(fused kernels on GPU; what transformers picks for BERT and RoBERTa), eager = matmul, softmax, matmul")
    a("--compile", action="store_true",
      help="torch.compile the model wrapper (model.KnowledgeMLM; needs a C++ compiler on CPU, triton on GPU); the "
           "first steps, and the first after routing starts, spend their time compiling")
    a("--loader-workers", type=int, default=0,
      help="processes that collate the micro-batches ahead of the training thread (a torch DataLoader, spawned; "
           "pinned memory on CUDA); batches and knowledge plans are bitwise those of 0 (the training thread collates)")
    g = p.add_argument_group("data (Sec. 4.1)")
    a = g.add_argument
    a("--data", default="mini", help="a store prepared by `python data.py prepare`, 'mini' (the embedded default) or "
                                     "a DIR with kg/ and corpus.jsonl or corpus.txt (both prepared on first use)")
    a("--cache-dir", default=None, help=f"the caches' root (embedded data, parsed KGs, stores prepared on first use, "
                                        f"SI scores); default ${common.CACHE_ENV} or data_cache/ in this repository")
    a("--seq-len", type=int, default=128)
    a("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient sync on the last only)")
    a("--mlm-prob", type=float, default=0.15, help="share of tokens MLM masks (80/10/10)")
    a("--whole-word-mask", action="store_true")
    a("--num-proc", type=int, default=None, help="processes for corpus preprocessing (datasets.map)")
    g = p.add_argument_group("optimisation")
    a = g.add_argument
    a("--max-steps", type=int, default=250, help="optimizer steps")
    a("--lr", type=float, default=3e-4, help="peak learning rate (3e-4 beat 1e-4 on the default MiniLM, measured)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up; default 6%% of --max-steps")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g = p.add_argument_group("noise-aware knowledge injection and CKA (Sec. 3.1, Eq. 1-3)")
    a = g.add_argument
    a("--injection", default=None, choices=STRATEGIES,
      help="which mentions get h_e (default: important for trelm, dkplm = DKPLM's long-tail score for dkplm)")
    a("--no-injection", action="store_true",
      help="ablation (Table 6): the chosen spans show the mask embedding only (no h_e, no memory); CKA still trains on them")
    a("--long-tail-percentile", type=float, default=50.0, help="long-tail = occurring entities with frequency at or below this percentile")
    a("--important-fraction", type=float, default=0.5,
      help="'important' = long-tail mentions whose SI is in this top fraction of the corpus's candidates")
    a("--si-window", type=int, default=8, help="SI(e) is computed on +-N tokens around the mention (0 = whole sequence)")
    a("--si-refresh", type=int, default=0,
      help="recompute SI(e) over the corpus with the current model every N epochs (0 = never: SI of the initial model)")
    a("--si-batch", type=int, default=64, help="sequences per SI(e) batch (each rank scores its share of the shards)")
    a("--theta", type=float, default=0.5, help="Eq. 3: L = theta*L_MLM + (1-theta)*L_CKA (--dkplm-loss theta: L_dec)")
    a("--negatives", type=int, default=16, help="K negatives per target drawn from Q (Eq. 2)")
    a("--kg-grad", default="on", choices=("on", "off"),
      help="h_e = E(t) - E(r) (and DKPLM's relation) takes gradients into the word embeddings (on), or is read from "
           "them detached (off: as DKPLM's code, whose KG tables are frozen)")
    a("--dkplm-loss", default="sum", choices=tuple(LOSSES_OF_DKPLM),
      help="DKPLM: L_MLM + L_dec as its released code (sum), or theta * L_MLM + (1 - theta) * L_dec (theta)")
    a("--dkplm-decoder", default="plain", choices=("plain", "relation"),
      help="DKPLM: decode the entity tokens from h (plain), or from h * r_hat through the same MLM head (relation: "
           "the study's DKPLM before issue 33, 7 points of probe score below plain MLM; docs/departures.md)")
    a("--dkplm-select", default="at-least-mean", choices=("at-least-mean", "above-mean"),
      help="DKPLM: KLT at least its sequence's mean, or strictly above it (above-mean: a sequence's only candidate "
           "is never injected)")
    g = p.add_argument_group("knowledge-augmented memory bank (Sec. 3.2, Eq. 4-8)")
    a = g.add_argument
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
    g = p.add_argument_group("dynamic knowledge routing (Sec. 3.3, Eq. 9-12)")
    a = g.add_argument
    a("--no-routing", action="store_true")
    a("--ig-steps", type=int, default=20, help="m, Riemann steps of integrated gradients")
    a("--route-scope", default="ffn", choices=SCOPES,
      help="what trains while routed besides the knowledge paths (Eq. 12): ffn everything but the FFN neurons "
           "outside the paths (the default: the reading closest to the paper's claims in the study, "
           "results/frontier.md), blocks the embeddings and MLM head (inside the Transformer blocks only the "
           "paths), strict nothing (only the paths; the first study's reading)")
    a("--route-select", default="attr", choices=("attr", "random"),
      help="attr: the top neurons by attribution (Eq. 9-11); random: as many per layer drawn at random at each "
           "routing (the control: does attribution matter?)")
    a("--ig-form", default="layer", choices=FORMS,
      help="layer: Eq. 11 as printed, one layer scaled at a time; joint: all layers scaled together (not Eq. 11); "
           "target: all layers scaled only at the positions where P_x is defined; first-order: activation x "
           "dP_x/dv on the training forward itself (one Riemann step at alpha = 1)")
    a("--ig-chunk", type=int, default=0, help="alpha steps stacked per IG forward (0: as many as --ig-memory-mb allows)")
    a("--ig-memory-mb", type=float, default=1024.0, help="activation memory bound of one stacked IG forward (estimate)")
    a("--ig-batch", type=int, default=8, help="sequences of the micro-batch the attribution runs on (0 = all)")
    a("--route-every", type=int, default=100,
      help="re-route every N steps (measured, docs/measurements.md: successive path sets overlap at the batch-to-batch "
           "level, Jaccard about 0.1, at N = 10, 25 and 100 alike)")
    a("--route-warmup", type=int, default=None,
      help="steps of full-parameter training before the first routing (default: 0, or --route-every when the "
           "model's MLM head is freshly initialised, e.g. MiniLM: routing freezes the head, so it must learn first)")
    a("--route-ratio", type=float, default=0.1, help="top fraction of FFN neurons per layer")
    a("--route-threshold", type=float, default=None,
      help="instead of --route-ratio: keep neurons >= t * layer max, t in (0, 1]")
    a("--train-layernorm", action="store_true", help="LayerNorms also train while routing")
    a("--train-head-bias", action="store_true", help="MLM-head bias also trains while routing")
    return p


def check(ns):
    """Every flag against its range and the others; a bad one ends the run in one line naming it."""
    def bad(flag, msg):
        raise SystemExit(f"pretrain.py: {flag}: {msg}")
    for flag in ("lr", "weight_decay", "grad_clip", "theta", "mlm_prob", "lambda0", "gamma", "beta", "lambda_epochs",
                 "important_fraction", "long_tail_percentile", "word_percentile", "route_ratio", "route_threshold",
                 "ig_memory_mb"):
        v = getattr(ns, flag)
        if v is not None and not math.isfinite(v):  # nan passes every comparison below
            bad("--" + flag.replace("_", "-"), f"expected a finite number, got {v}")
    for flag in ("max_steps", "batch_size", "grad_accum", "ig_steps", "route_every", "log_every", "word_min_count",
                 "si_batch"):
        if getattr(ns, flag) < 1:
            bad("--" + flag.replace("_", "-"), f"expected a positive integer, got {getattr(ns, flag)}")
    for flag in ("negatives", "window_k", "si_window", "ig_batch", "si_refresh", "ig_chunk", "save_every",
                 "snapshot_every", "warmup_steps", "route_warmup", "seed", "loader_workers"):
        v = getattr(ns, flag)
        if v is not None and v < 0:
            bad("--" + flag.replace("_", "-"), f"expected an integer >= 0, got {v}")
    if ns.seed >= 2 ** 32:
        bad("--seed", f"expected an integer in [0, 2**32) (numpy's seed range), got {ns.seed}")
    if ns.warmup_steps is not None and ns.warmup_steps > ns.max_steps:
        bad("--warmup-steps", f"expected <= --max-steps ({ns.max_steps}): the learning rate would never reach "
                              f"--lr, got {ns.warmup_steps}")
    if not (math.isfinite(ns.ddp_timeout) and ns.ddp_timeout > 0):
        bad("--ddp-timeout", f"expected minutes > 0, got {ns.ddp_timeout}")
    if ns.num_proc is not None and ns.num_proc < 1:
        bad("--num-proc", f"expected a positive integer, got {ns.num_proc}")
    if not 8 <= ns.seq_len <= 4096:
        bad("--seq-len", f"expected 8..4096, got {ns.seq_len}")
    if not 0.0 < ns.mlm_prob < 1.0:
        bad("--mlm-prob", f"expected a share in (0, 1) (at 0 L_MLM is 0 at every step), got {ns.mlm_prob}")
    for flag in ("theta", "lambda0", "gamma"):
        if not 0.0 <= getattr(ns, flag) <= 1.0:
            bad("--" + flag.replace("_", "-"), f"expected a value in [0, 1], got {getattr(ns, flag)}")
    if not 0.0 < ns.important_fraction <= 1.0:
        bad("--important-fraction", f"expected (0, 1] (at 0 no mention is important), got {ns.important_fraction}")
    if METHOD_TABLE[ns.method].sampler and ns.negatives < 1:
        bad("--negatives", f"expected >= 1 with --method {ns.method} (Eq. 2 with no negative is L_CKA = 0 at every "
                           f"step), got {ns.negatives}")
    if ns.lr <= 0:
        bad("--lr", f"expected > 0, got {ns.lr}")
    if ns.weight_decay < 0 or ns.grad_clip < 0:
        bad("--weight-decay/--grad-clip", f"expected non-negative values, got {ns.weight_decay}, {ns.grad_clip}")
    if ns.beta < 1:
        bad("--beta", f"expected >= 1 (Eq. 8: lambda0 / beta^q; 1 = no decay), got {ns.beta}")
    if ns.lambda_epochs < 0:
        bad("--lambda-epochs", f"expected a finite number >= 0 (0: the real epochs), got {ns.lambda_epochs}")
    if ns.ig_memory_mb <= 0:
        bad("--ig-memory-mb", f"expected > 0, got {ns.ig_memory_mb}")
    if not 0.0 < ns.route_ratio <= 1.0:
        bad("--route-ratio", f"expected (0, 1], got {ns.route_ratio}")
    if ns.route_threshold is not None:
        if not 0.0 < ns.route_threshold <= 1.0:
            bad("--route-threshold", f"expected (0, 1] (a share of each layer's largest attribution: above 1 "
                                     f"nothing is selected), got {ns.route_threshold}")
        if ns.route_select == "random":
            bad("--route-threshold", "selects by attribution; --route-select random draws --route-ratio of each layer")
    for flag in ("long_tail_percentile", "word_percentile"):
        if not 0.0 < getattr(ns, flag) <= 100.0:
            bad("--" + flag.replace("_", "-"), f"expected (0, 100], got {getattr(ns, flag)}")
    if ns.resume and ns.overwrite:
        bad("--resume/--overwrite", "pass one: --resume continues the run in --output-dir, --overwrite deletes it")
    if ns.method != "dkplm":
        for flag, default in (("dkplm_loss", "sum"), ("dkplm_decoder", "plain"), ("dkplm_select", "at-least-mean")):
            if getattr(ns, flag) != default:
                bad("--" + flag.replace("_", "-"), f"is a DKPLM reading; not valid with --method {ns.method}")
    if ns.method == "mlm" and ns.kg_grad != "on":
        bad("--kg-grad", "--method mlm injects nothing")
    if ns.method != "trelm":
        allowed = ("no_injection",) if ns.method == "dkplm" else ()  # DKPLM with the mask embedding at its spans
        for flag in ("no_injection", "no_memory_bank", "no_routing"):
            if getattr(ns, flag) and flag not in allowed:
                bad("--" + flag.replace("_", "-"), f"is a TRELM ablation; not valid with --method {ns.method}")
        if ns.long_tail_words:
            bad("--long-tail-words", f"adds memory-bank keys (TRELM only); not valid with --method {ns.method}")
    if ns.method == "mlm" and ns.injection not in (None, "none"):
        bad("--injection", "--method mlm injects nothing; use --method trelm or dkplm")
    for flag in ("device", "memory_device"):
        if getattr(ns, flag) == "cuda":
            import torch
            if not torch.cuda.is_available():
                bad("--" + flag.replace("_", "-"), "cuda: no CUDA device is available here; expected cpu")
    if ns.compile:
        missing = compile_missing(ns.device)
        if missing:
            bad("--compile", missing)
    try:  # the model's position embeddings bound --seq-len (a hub id not in the cache: load_mlm says so later)
        from transformers import AutoConfig
        mc = AutoConfig.from_pretrained(common.resolve_model(ns.model), local_files_only=True)
    except (OSError, ValueError):
        mc = None
    positions = getattr(mc, "max_position_embeddings", None)
    if positions and "roberta" in mc.model_type:
        positions -= mc.pad_token_id + 1  # RoBERTa's positions start after its padding index
    if positions and ns.seq_len > positions:
        bad("--seq-len", f"expected <= {positions} (the positions of --model {ns.model}), got {ns.seq_len}")


def compile_missing(device):
    """What torch.compile's default backend (Inductor) lacks on --device `device` -> a sentence, or None:
    triton for CUDA kernels, a C++ compiler ($CXX, g++, c++ or clang++) for CPU kernels."""
    import importlib.util
    import shutil
    import torch
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton (pip install triton)"
    if any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        return None
    return "torch.compile on CPU needs a C++ compiler ($CXX, g++, c++ or clang++ on PATH); none found"


def recorded_warmup(ns):
    """--resume raising --max-steps keeps the recorded run's warm-up (its default is 6% of --max-steps,
    which would otherwise move with it) -> that warm-up, or None (not an extension, or nothing recorded)."""
    path = os.path.join(ns.output_dir, "config.json")
    if not (ns.resume and os.path.exists(path)):
        return None
    old = json.load(open(path)).get("config", {})
    return old.get("warmup_steps") if ns.max_steps > old.get("max_steps", ns.max_steps) else None


def resolve(ns):
    """Checked flags (argparse.Namespace) -> Config, with every dependent default filled (module docstring)."""
    check(ns)
    v = dict(vars(ns))
    row = METHOD_TABLE[ns.method]
    v["injection"] = ns.injection or row.injection
    v["output_dir"] = ns.output_dir or os.path.join("runs", ns.method)
    if ns.warmup_steps is None:
        v["warmup_steps"] = recorded_warmup(argparse.Namespace(**v)) or max(1, int(0.06 * ns.max_steps))
    v["memory_bank"] = row.bank and not ns.no_memory_bank and not ns.no_injection and v["injection"] != "none"
    v["routing"] = row.routing and not ns.no_routing
    if ns.route_warmup is None:
        v["route_warmup"] = 0 if common.has_mlm_head(ns.model) else ns.route_every
    return Config(**{g: cls(**{f.name: v[f.name] for f in fields(cls)}) for g, cls in GROUPS.items()})


def from_argv(argv=None, description=None):
    """The command line (default: sys.argv) -> a resolved Config; description: --help's text. A --preset's
    values become the defaults, so every flag given on the command line wins."""
    p = get_parser(description)
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return resolve(p.parse_args(argv))


def defaults():
    """{flag dest: default}: what a flag added after a checkpoint was written meant before it existed."""
    p = get_parser()
    return {a.dest: a.default for a in p._actions if a.dest != "help"}
