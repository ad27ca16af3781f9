"""Fine-tuning evaluations of TRELM: relation extraction (Table 5), entity typing (Table 4), GLUE (Table 3).

One fine-tuning loop serves every task: the pre-trained encoder (`model.base_model` of the masked
LM in --model-dir; its MLM head is dropped), a fresh two-layer head on pooled hidden states,
AdamW with linear warmup and decay, a fixed number of epochs, then the final model is scored on
dev and on test where the test split has labels. `--seeds 1,2,3` repeats the whole run per seed
and reports mean and sample std, the paper's "±". Run through evaluate.py (the CLI):

    python evaluate.py --task fewrel --model-dir runs/trelm/final --seeds 1,2,3
    python evaluate.py --task tacred --model-dir D --data-dir /path/to/tacred   # LDC2018T24 json
    python evaluate.py --task open-entity --model-dir D
    python evaluate.py --task glue --glue-tasks CoLA,MRPC,RTE,SST-2 --model-dir D

Training defaults are sized for a 2-core CPU and the default MiniLM (a few minutes per task, see
TASK_DEFAULTS: FewRel and GLUE train on 2,000 / 1,000 rows); dev and test sets are scored in full
(--eval-limit 0); `--train-limit 0` trains on every row, as for the paper's numbers. The GLUE
average is the paper's Table 3 AVG (glue_average): each task's main metric x 100, MNLI-m and -mm
as two columns. Results: <output-dir>/<task>.json (GLUE: glue-<TASK>.json per task and glue.json),
paths in them as common.portable_path writes them (relative to the repository or ../shared/data/...).

The benchmark files (formats, readers, where they are found) are finetune_data.py's; a file that
does not follow its official format ends the run with one line naming the file, the line or record,
and the format expected.

Relation extraction (--task tacred|fewrel), on TACRED rows (inclusive entity spans). Entity markers
are four new special tokens [E1] [/E1] (subject) and [E2] [/E2] (object), added to the tokenizer
(never split, never lower-cased; BERT WordPiece and RoBERTa BPE alike) with the embedding matrix
resized (new rows drawn around the mean of the old ones). The head reads the concatenated final
states of [E1] and [E2] ("entity start", Baldini Soares et al. 2019); `--pool cls` reads [CLS].
Score: the official TACRED scorer (micro P/R/F1 that ignores `no_relation`; precision is 1.0 when
nothing but no_relation is predicted, recall 0.0 when the gold has no relation, as in score.py).
FewRel is converted to TACRED rows and split per relation (--fewrel-split, --split-seed); it has no
no_relation class, so the same scorer gives micro P = R = F1 = accuracy.

Entity typing (--task open-entity). Choi et al. (2018) crowd data; gold = y_str intersected with
the 9 general types (ERNIE's Open Entity setting). The mention is wrapped in [E1] [/E1]; one sigmoid
per type, binary cross-entropy; predicted set = types with probability > --threshold. Metrics:
loose-micro P/R/F1 (Table 4), strict accuracy, loose-macro P/R/F1 (Ling and Weld 2012 definitions).

GLUE (--task glue). glue_data tsv files, or the `datasets` GLUE loader with --glue-source hf (needs
internet). Head on [CLS]; STS-B is a regression (one output, MSE). Dev metrics: CoLA Matthews corr.;
SST-2, QNLI, RTE, WNLI, MNLI-m/mm accuracy; MRPC, QQP accuracy and F1; STS-B Pearson and Spearman.
Test labels are not public.

Symbols and names:
| symbol | meaning | name here |
|---|---|---|
| h_[E1], h_[E2] | final hidden states at the start markers (B, H) | `pooled` (B, P*H), P = len(pos) |
| W_1, W_2 | head: tanh(W_1 x) then W_2 | `Finetuner.dense`, `Finetuner.out` |
| p_t = sigma(z_t) | per-type probability (typing) | `torch.sigmoid(out)` |
| P, R, F1 | micro precision, recall, F1 | `prf(correct, guessed, gold)` |
"""
import argparse
import math
import os
import random
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import lama
from finetune_data import (FEWREL_FORMAT, GENERAL_TYPES, GLUE, fewrel_to_tacred, find_data, glue_task, load_glue,
                           read_json, read_open_entity, read_tacred)

NO_RELATION = "no_relation"
MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")  # subject open/close, object open/close

# CPU-sized training defaults (2 cores, MiniLM-L6-H384, batch 16); every one is a flag. Dev and test
# sets are always scored in full by default (eval_limit 0), so scores compare with published ones.
TASK_DEFAULTS = {
    "tacred": dict(epochs=3, lr=5e-5, max_seq_len=128, train_limit=0, eval_limit=0),
    "fewrel": dict(epochs=2, lr=5e-5, max_seq_len=128, train_limit=2000, eval_limit=0),
    "open-entity": dict(epochs=2, lr=5e-5, max_seq_len=128, train_limit=0, eval_limit=0),
    "glue": dict(epochs=2, lr=5e-5, max_seq_len=128, train_limit=1000, eval_limit=0),
}
DEFAULT_BATCH_SIZE = 16


def add_args(parser):
    """Add the fine-tuning flags to evaluate.py's parser (which owns --task, --model-dir, --data-dir,
    --output-dir, --seed, --batch-size). Flags left at None take the task's TASK_DEFAULTS."""
    g = parser.add_argument_group("fine-tuning (tacred, fewrel, open-entity, glue)")
    g.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 1,2,3; mean and std are reported (default: --seed)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (task default in TASK_DEFAULTS)")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 5e-5)")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on biases, LayerNorms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--max-seq-len", type=int, default=None, help="tokens per example incl. special tokens")
    g.add_argument("--train-limit", type=int, default=None,
                   help="use this many training rows, drawn with --split-seed (0 = all; default: TASK_DEFAULTS, "
                        "fewrel 2000, glue 1000, else all)")
    g.add_argument("--eval-limit", type=int, default=None,
                   help="score this many rows of each dev/test split, drawn with --split-seed (default 0 = all)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the FewRel split and of --train-limit/--eval-limit subsets; fixed across "
                        "--seeds so the reported std is training randomness only")
    g.add_argument("--pool", choices=("entity-start", "cls"), default="entity-start",
                   help="relation/typing head input: concatenated start-marker states or [CLS]")
    g.add_argument("--threshold", type=float, default=0.5, help="open-entity: predict types with p > this")
    g.add_argument("--fewrel-file", default="val_wiki.json", help="FewRel file under --data-dir")
    g.add_argument("--fewrel-split", default="70,10,20", help="FewRel train,dev,test percentages per relation")
    g.add_argument("--glue-tasks", default="CoLA,MRPC,RTE,SST-2",
                   help="comma-separated: CoLA,SST-2,MRPC,QQP,STS-B,MNLI,QNLI,RTE,WNLI")
    g.add_argument("--glue-source", choices=("files", "hf"), default="files",
                   help="glue_data tsv files, or the `datasets` GLUE loader when files are missing (internet)")
    return parser


# ----------------------------------------------------------------------------- encoding

def add_markers(tok):
    """Register MARKERS as special tokens (idempotent); returns {marker: id}."""
    tok.add_tokens([m for m in MARKERS if m not in tok.get_vocab()], special_tokens=True)
    return {m: tok.convert_tokens_to_ids(m) for m in MARKERS}


def insert_markers(words, spans):
    """Insert marker words around inclusive spans [(start, end, open, close)]: `open` before words[start],
    `close` after words[end]. Nested spans close in reverse order of opening."""
    out = []
    for i, w in enumerate(words):
        out += [s[2] for s in sorted((s for s in spans if s[0] == i), key=lambda s: -s[1])]
        out.append(w)
        out += [s[3] for s in sorted((s for s in spans if s[1] == i), key=lambda s: -s[0])]
    return out


def encode_words(tok, words, marker_ids):
    """Token ids of pre-split words (markers map to their own ids). Byte-level BPE tokenizers
    (RoBERTa) get a space before every word, as with add_prefix_space=True."""
    prefix = " " if tok.tokenize(" the") != tok.tokenize("the") else ""
    plain = [prefix + w for w in words if w not in marker_ids]
    pieces = iter(tok(plain, add_special_tokens=False)["input_ids"] if plain else [])
    ids = []
    for w in words:
        ids += [marker_ids[w]] if w in marker_ids else next(pieces)
    return ids


def _window_start(n, lo, hi, length):
    """Start of a `length`-token window inside [0, n) centred on [lo, hi]."""
    return max(0, min(lo - (length - (hi - lo + 1)) // 2, n - length))


def truncate(ids, marked, starts, length):
    """At most `length` ids keeping, in order of preference: every marker position (`marked`) in one
    window; the start markers (`starts`) in one window; a window around each start marker."""
    n = len(ids)
    if n <= length:
        return ids
    for lo, hi in ((min(marked), max(marked)), (min(starts), max(starts))):
        if hi - lo + 1 <= length:
            s = _window_start(n, lo, hi, length)
            return ids[s:s + length]
    a, b, half = min(starts), max(starts), length // 2
    sa, sb = _window_start(n, a, a, half), _window_start(n, b, b, length - half)
    return ids[sa:sa + half] + ids[sb:sb + length - half]


def encode_marked(tok, words, spans, marker_ids, max_len, pool):
    """input_ids [CLS] ... [SEP] with markers, and the pooled positions: the open markers of `spans`
    (pool='entity-start') or [0] ([CLS])."""
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"{type(tok).__name__}: needs cls and sep tokens (BERT [CLS]/[SEP], RoBERTa <s>/</s>)")
    ids = encode_words(tok, insert_markers(words, spans), marker_ids)
    opens = [marker_ids[s[2]] for s in spans]
    marker_set = set(marker_ids.values())
    marked = [i for i, t in enumerate(ids) if t in marker_set]
    starts = [ids.index(m) for m in opens]
    ids = [tok.cls_token_id] + truncate(ids, marked, starts, max_len - 2) + [tok.sep_token_id]
    return ids, ([ids.index(m) for m in opens] if pool == "entity-start" else [0])


def relation_features(tok, rows, label_index, marker_ids, max_len, pool):
    feats = []
    for r in rows:
        spans = [(r["subj_start"], r["subj_end"], "[E1]", "[/E1]"), (r["obj_start"], r["obj_end"], "[E2]", "[/E2]")]
        ids, pos = encode_marked(tok, r["token"], spans, marker_ids, max_len, pool)
        feats.append(dict(input_ids=ids, pos=pos, label=label_index[r["relation"]]))
    return feats


def typing_features(tok, rows, marker_ids, max_len, pool):
    feats = []
    for r in rows:
        ids, pos = encode_marked(tok, r["words"], [(r["start"], r["end"], "[E1]", "[/E1]")], marker_ids, max_len, pool)
        feats.append(dict(input_ids=ids, pos=pos, label=[float(t in r["types"]) for t in GENERAL_TYPES]))
    return feats


def glue_features(tok, rows, spec, max_len):
    feats = []
    for a, b, y in rows:
        enc = tok(a, b, truncation=True, max_length=max_len) if b is not None else \
            tok(a, truncation=True, max_length=max_len)
        f = dict(input_ids=enc["input_ids"], pos=[0], label=y if spec.labels is None else spec.labels.index(y))
        if "token_type_ids" in enc:
            f["token_type_ids"] = enc["token_type_ids"]
        feats.append(f)
    return feats


def collate(feats, pad_id):
    """Pad a list of features into tensors: input_ids, attention_mask, token_type_ids (B, T), pos (B, P),
    label (B,) long for classes, (B,) float for regression, (B, C) float for multi-label."""
    B, T = len(feats), max(len(f["input_ids"]) for f in feats)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        attention_mask[i, :n] = 1
        if "token_type_ids" in f:
            token_type_ids[i, :n] = torch.tensor(f["token_type_ids"])
    labels = [f["label"] for f in feats]
    label = torch.tensor(labels, dtype=torch.long if isinstance(labels[0], int) else torch.float)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pos=torch.tensor([f["pos"] for f in feats]),
                 label=label)
    if "token_type_ids" in feats[0]:
        batch["token_type_ids"] = token_type_ids
    return batch


# ----------------------------------------------------------------------------- model and loop

class Finetuner(nn.Module):
    """Encoder + head: out = W_2 dropout(tanh(W_1 dropout(x))), x = concatenated hidden states at `pos`."""

    def __init__(self, encoder, n_pool, n_out):
        super().__init__()
        H, p = encoder.config.hidden_size, encoder.config.hidden_dropout_prob
        self.encoder = encoder
        self.drop = nn.Dropout(p)
        self.dense = nn.Linear(n_pool * H, H)
        self.out = nn.Linear(H, n_out)

    def forward(self, input_ids, attention_mask, pos, token_type_ids=None):
        kw = dict(token_type_ids=token_type_ids) if token_type_ids is not None else {}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, H)
        pooled = h.gather(1, pos[:, :, None].expand(-1, -1, h.size(-1))).flatten(1)  # (B, P, H) -> (B, P*H)
        return self.out(self.drop(torch.tanh(self.dense(self.drop(pooled)))))  # (B, C)


def loss_fn(kind, out, label):
    """kind: 'single' (softmax CE), 'multi' (sigmoid BCE per type), 'regression' (MSE on out[:, 0])."""
    if kind == "single":
        return F.cross_entropy(out, label)
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(out, label)
    return F.mse_loss(out[:, 0], label)


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train(net, feats, kind, args, seed, pad_id, device, desc="train"):
    """AdamW + linear warmup/decay for args.epochs epochs over shuffled batches (torch Generator(seed)).
    Returns {"steps", "train_loss" (mean of the last epoch)}."""
    from transformers import get_linear_schedule_with_warmup
    gen = torch.Generator().manual_seed(seed)
    B = args.batch_size
    total = args.epochs * math.ceil(len(feats) / B)
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([dict(params=[p for n, p in params if not no_decay(n)], weight_decay=args.weight_decay),
                             dict(params=[p for n, p in params if no_decay(n)], weight_decay=0.0)], lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, round(args.warmup * total), total)
    net.train()
    bar = tqdm(total=total, desc=desc, mininterval=5)
    for epoch in range(args.epochs):
        losses = []
        for idx in torch.randperm(len(feats), generator=gen).split(B):
            batch = _to(collate([feats[i] for i in idx.tolist()], pad_id), device)
            label = batch.pop("label")
            loss = loss_fn(kind, net(**batch), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return dict(steps=total, train_loss=float(np.mean(losses)))


@torch.no_grad()
def predict(net, feats, batch_size, pad_id, device):
    """Head outputs (N, C) as numpy, in the order of `feats` (batched by length to save padding)."""
    net.eval()
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    out = [None] * len(feats)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = _to(collate([feats[i] for i in idx], pad_id), device)
        batch.pop("label")
        for i, row in zip(idx, net(**batch).float().cpu().numpy()):
            out[i] = row
    return np.stack(out) if out else np.zeros((0, 0))


# ----------------------------------------------------------------------------- metrics

def prf(correct, guessed, gold):
    """Micro P/R/F1 with the TACRED scorer's conventions: P = 1 with no guesses, R = 0 with no gold."""
    p = correct / guessed if guessed > 0 else 1.0
    r = correct / gold if gold > 0 else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def tacred_score(gold, pred, no_relation=NO_RELATION):
    """Official TACRED score: a prediction other than no_relation is a guess, a gold label other than
    no_relation is gold, a guess equal to its gold is correct; micro P/R/F1 over those, plus per relation."""
    correct, guessed, gold_n = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred):
        if p != no_relation:
            guessed[p] += 1
        if g != no_relation:
            gold_n[g] += 1
            correct[g] += int(g == p)
    p, r, f1 = prf(sum(correct.values()), sum(guessed.values()), sum(gold_n.values()))
    per = {}
    for rel in sorted(set(guessed) | set(gold_n)):
        rp, rr, rf = prf(correct[rel], guessed[rel], gold_n[rel])
        per[rel] = dict(precision=rp, recall=rr, f1=rf, correct=correct[rel], guessed=guessed[rel], gold=gold_n[rel])
    return dict(precision=p, recall=r, f1=f1, accuracy=float(np.mean([g == q for g, q in zip(gold, pred)]))), per


def typing_metrics(gold, pred, types=GENERAL_TYPES):
    """Entity typing on lists of label sets. Loose micro: P = sum|p&g| / sum|p| (0 if nothing predicted),
    R = sum|p&g| / sum|g|. Strict accuracy: share of examples with p == g. Loose macro: P = mean of
    |p&g|/|p| over examples with p non-empty, R = mean of |p&g|/|g| over examples with g non-empty."""
    gold, pred = [set(g) for g in gold], [set(p) for p in pred]
    inter = [len(g & p) for g, p in zip(gold, pred)]
    n_pred, n_gold = sum(len(p) for p in pred), sum(len(g) for g in gold)
    f1 = lambda p, r: 2 * p * r / (p + r) if p + r > 0 else 0.0
    mp = sum(inter) / n_pred if n_pred else 0.0
    mr = sum(inter) / n_gold if n_gold else 0.0
    ap = [i / len(p) for i, p in zip(inter, pred) if p]
    ar = [i / len(g) for i, g in zip(inter, gold) if g]
    Mp, Mr = (float(np.mean(ap)) if ap else 0.0), (float(np.mean(ar)) if ar else 0.0)
    metrics = dict(precision=mp, recall=mr, f1=f1(mp, mr), strict_acc=float(np.mean([g == p for g, p in zip(gold, pred)])),
                   macro_precision=Mp, macro_recall=Mr, macro_f1=f1(Mp, Mr))
    per = {}
    for t in types:
        c = sum(1 for g, p in zip(gold, pred) if t in g and t in p)
        npred, ngold = sum(t in p for p in pred), sum(t in g for g in gold)
        tp, tr = (c / npred if npred else 0.0), (c / ngold if ngold else 0.0)
        per[t] = dict(precision=tp, recall=tr, f1=f1(tp, tr), correct=c, predicted=npred, gold=ngold)
    return metrics, per


def glue_metrics(spec, gold, pred):
    """Official GLUE dev metrics. gold/pred: label indices (classification) or scores (STS-B)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    out = {}
    for m in spec.metrics:
        if m == "mcc":
            out[m] = float(matthews_corrcoef(gold, pred))
        elif m == "acc":
            out[m] = float(accuracy_score(gold, pred))
        elif m == "f1":
            out[m] = float(f1_score(gold, pred, pos_label=1))  # positive class "1" (paraphrase / duplicate)
        elif m == "pearson":
            out[m] = float(pearsonr(pred, gold)[0])
        elif m == "spearman":
            out[m] = float(spearmanr(pred, gold)[0])
    return out


def summarize(per_seed):
    """{split: {metric: {"mean", "std" (sample std, 0 for one seed), "values"}}} over seeds."""
    out = {}
    for split in per_seed[0]["metrics"]:
        out[split] = {}
        for name in per_seed[0]["metrics"][split]:
            v = [s["metrics"][split][name] for s in per_seed]
            out[split][name] = dict(mean=float(np.mean(v)), std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                    values=v)
    return out


# ----------------------------------------------------------------------------- runs

def subsample(rows, limit, seed):
    """`limit` rows drawn without replacement with Random(seed), in file order (0 or None: all)."""
    if not limit or limit >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


def seed_list(args):
    """--seeds "1,2,3" -> [1, 2, 3] (default: [--seed]), or one line naming --seeds and what was expected."""
    try:
        seeds = [int(s) for s in str(args.seeds).split(",")] if args.seeds else [args.seed]
    except ValueError:
        seeds = []
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds):
        raise SystemExit(f"--seeds: expected comma-separated integers in [0, 2**32) like 1,2,3, got {args.seeds!r}")
    return seeds


def check(args):
    """This file's flags (evaluate.main calls it before any data is read; None = TASK_DEFAULTS): one line
    naming the flag and the range it must lie in."""
    def bad(flag, expected, got):
        raise SystemExit(f"{flag}: expected {expected}, got {got}")
    seed_list(args)
    for flag, lo, note in (("epochs", 1, ""), ("max_seq_len", 8, " (room for the markers)"), ("split_seed", 0, ""),
                           ("train_limit", 0, " (0: all rows)"), ("eval_limit", 0, " (0: all rows)")):
        v = getattr(args, flag)
        if v is not None and v < lo:
            bad("--" + flag.replace("_", "-"), f"an integer >= {lo}{note}", v)
    for flag in ("lr", "warmup", "weight_decay", "max_grad_norm", "threshold"):
        v = getattr(args, flag)
        if v is not None and not math.isfinite(v):
            bad("--" + flag.replace("_", "-"), "a finite number", v)
    if args.lr is not None and args.lr <= 0:
        bad("--lr", "a learning rate > 0", args.lr)
    if not 0 <= args.warmup <= 1:
        bad("--warmup", "a fraction of the steps in [0, 1]", args.warmup)
    if args.weight_decay < 0:
        bad("--weight-decay", "a value >= 0", args.weight_decay)
    if args.max_grad_norm <= 0:
        bad("--max-grad-norm", "a norm > 0 (clipping to 0 zeroes every gradient)", args.max_grad_norm)
    if not 0 < args.threshold < 1:
        bad("--threshold", "a probability in (0, 1)", args.threshold)
    try:
        percents = [int(x) for x in args.fewrel_split.split(",")]
    except ValueError:
        percents = []
    if len(percents) != 3 or sum(percents) != 100 or min(percents) < 0:
        bad("--fewrel-split", "three percentages >= 0 summing to 100, like 70,10,20", repr(args.fewrel_split))
    if not [glue_task(t) for t in args.glue_tasks.split(",") if t.strip()]:
        bad("--glue-tasks", "comma-separated GLUE tasks, like CoLA,RTE", repr(args.glue_tasks))
    common.resolve_model(args.model_dir, "--model-dir")


def resolve(args, task):
    """A copy of args (checked: check) with the task's defaults filled in and --seeds parsed to a list."""
    cfg = argparse.Namespace(**vars(args))
    for k, v in TASK_DEFAULTS[task].items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if getattr(cfg, "batch_size", None) is None:
        cfg.batch_size = DEFAULT_BATCH_SIZE
    cfg.seeds = seed_list(cfg)
    cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def run_seeds(cfg, tok, train_feats, eval_feats, n_pool, n_out, kind, score, desc):
    """For each seed: fresh encoder from --model-dir (embeddings resized to the tokenizer), fresh head,
    train, predict every eval split, score(split, outputs) -> (metrics, detail)."""
    if not train_feats:
        raise SystemExit(f"{desc}: no training rows (--train-limit {cfg.train_limit})")
    runs = []
    for seed in cfg.seeds:
        common.seed_everything(seed)
        model, _ = common.load_mlm(cfg.model_dir, flag="--model-dir")
        if len(tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))  # new marker rows: mean-resizing of the old rows
        net = Finetuner(model.base_model, n_pool, n_out).to(cfg.device)
        t0 = time.time()
        stats = train(net, train_feats, kind, cfg, seed, tok.pad_token_id, cfg.device, desc=f"{desc} seed {seed}")
        t1 = time.time()
        metrics, detail = {}, {}
        for split, feats in eval_feats.items():
            metrics[split], detail[split] = score(split, predict(net, feats, 2 * cfg.batch_size, tok.pad_token_id,
                                                                  cfg.device))
        runs.append(dict(seed=seed, metrics=metrics, detail=detail, train_seconds=round(t1 - t0, 2),
                         eval_seconds=round(time.time() - t1, 2), **stats))
        print(f"{desc} seed {seed}: " + ", ".join(f"{s} {k} {v:.4f}" for s, m in metrics.items() for k, v in m.items()))
    return runs


def _write(cfg, task, runs, data, head):
    """One results JSON: resolved config, seeds, metrics summarized over seeds, per-seed runs with the
    per-class detail, and what data was read (source, labels, sizes used and full sizes). Paths are
    recorded as common.portable_path writes them (evaluate.py's path flags: lama.PATH_FLAGS); the flags
    are the resolved ones, --seeds aside (the record's `seed`)."""
    config = dict(common.recorded_config(cfg, lama.PATH_FLAGS, drop=("seeds",)), head=head,
                  std="sample std over seeds (ddof=1)")
    data = dict(data, source=common.portable_path(data["source"]))
    return common.write_result(cfg.output_dir, task, common.portable_path(cfg.model_dir), config, cfg.seeds,
                               summarize(runs), per_seed=runs, data=data)


def _pooled(cfg):
    return "[CLS]" if cfg.pool == "cls" else "the start markers' states"


def relation_extraction(args, task):
    cfg = resolve(args, task)
    if task == "tacred":
        d = find_data(cfg, ("", "tacred", "tacred_sample"), ("train.json", "dev.json", "test.json"))
        splits = {s: read_tacred(os.path.join(d, f"{s}.json")) for s in ("train", "dev", "test")}
        source = d
    else:
        d = find_data(cfg, ("", "fewrel"), (cfg.fewrel_file,))
        source = os.path.join(d, cfg.fewrel_file)
        percents = tuple(int(x) for x in cfg.fewrel_split.split(","))  # checked: check
        splits = fewrel_to_tacred(read_json(source, FEWREL_FORMAT), cfg.split_seed, percents, source)
    labels = sorted({r["relation"] for rows in splits.values() for r in rows})
    if NO_RELATION in labels:
        labels = [NO_RELATION] + [l for l in labels if l != NO_RELATION]
    label_index = {l: i for i, l in enumerate(labels)}
    rows = {"train": subsample(splits["train"], cfg.train_limit, cfg.split_seed)}
    rows.update({s: subsample(splits[s], cfg.eval_limit, cfg.split_seed) for s in ("dev", "test")})
    _, tok = common.load_mlm(cfg.model_dir, flag="--model-dir")
    marker_ids = add_markers(tok)
    feats = {s: relation_features(tok, r, label_index, marker_ids, cfg.max_seq_len, cfg.pool) for s, r in rows.items()}

    def score(split, out):
        return tacred_score([r["relation"] for r in rows[split]], [labels[i] for i in out.argmax(1)])

    runs = run_seeds(cfg, tok, feats["train"], {s: feats[s] for s in ("dev", "test")},
                     2 if cfg.pool == "entity-start" else 1, len(labels), "single", score, task)
    data = dict(source=source, labels=labels, sizes={s: len(r) for s, r in rows.items()},
                full_sizes={s: len(r) for s, r in splits.items()})
    return _write(cfg, task, runs, data, head=f"tanh MLP on {_pooled(cfg)}, markers {' '.join(MARKERS)}")


def run_tacred(args):
    return relation_extraction(args, "tacred")


def run_fewrel(args):
    return relation_extraction(args, "fewrel")


def run_open_entity(args):
    cfg = resolve(args, "open-entity")
    d = find_data(cfg, ("", "crowd", "open_entity/crowd"), ("train.json", "dev.json", "test.json"))
    full = {s: read_open_entity(os.path.join(d, f"{s}.json")) for s in ("train", "dev", "test")}
    rows = {"train": subsample(full["train"], cfg.train_limit, cfg.split_seed)}
    rows.update({s: subsample(full[s], cfg.eval_limit, cfg.split_seed) for s in ("dev", "test")})
    _, tok = common.load_mlm(cfg.model_dir, flag="--model-dir")
    marker_ids = add_markers(tok)
    feats = {s: typing_features(tok, r, marker_ids, cfg.max_seq_len, cfg.pool) for s, r in rows.items()}

    def score(split, out):
        prob = 1 / (1 + np.exp(-out))  # (N, 9) sigmoid per type
        pred = [[t for t, p in zip(GENERAL_TYPES, row) if p > cfg.threshold] for row in prob]
        return typing_metrics([r["types"] for r in rows[split]], pred)

    runs = run_seeds(cfg, tok, feats["train"], {s: feats[s] for s in ("dev", "test")}, 1, len(GENERAL_TYPES),
                     "multi", score, "open-entity")
    data = dict(source=d, types=list(GENERAL_TYPES), sizes={s: len(r) for s, r in rows.items()},
                full_sizes={s: len(r) for s, r in full.items()},
                untyped_train_rows=sum(not r["types"] for r in rows["train"]))
    return _write(cfg, "open-entity", runs, data, head=f"tanh MLP on {_pooled(cfg)}, markers [E1] [/E1]")


def run_glue(args):
    cfg = resolve(args, "glue")
    specs = [glue_task(t) for t in cfg.glue_tasks.split(",") if t.strip()]
    _, tok = common.load_mlm(cfg.model_dir, flag="--model-dir")
    summary, paths = {}, []
    for spec in specs:
        full, source = load_glue(cfg, spec)
        rows = {s: subsample(r, cfg.train_limit if s == "train" else cfg.eval_limit, cfg.split_seed)
                for s, r in full.items()}
        feats = {s: glue_features(tok, r, spec, cfg.max_seq_len) for s, r in rows.items()}
        kind = "regression" if spec.labels is None else "single"

        def score(split, out, spec=spec, kind=kind, feats=feats):
            gold = [f["label"] for f in feats[split]]
            pred = out[:, 0] if kind == "regression" else out.argmax(1)
            return glue_metrics(spec, gold, pred), {}

        runs = run_seeds(cfg, tok, feats["train"], {s: feats[s] for s in spec.dev}, 1,
                         1 if kind == "regression" else len(spec.labels), kind, score, spec.name)
        data = dict(source=source, labels=spec.labels, sizes={s: len(r) for s, r in rows.items()},
                    full_sizes={s: len(r) for s, r in full.items()})
        paths.append(_write(cfg, f"glue-{spec.name}", runs, data, head="tanh MLP on [CLS]"))
        summary[spec.name] = summarize(runs)
    columns, average = glue_average(summary)
    return common.write_result(cfg.output_dir, "glue", common.portable_path(cfg.model_dir),
                               common.recorded_config(cfg, lama.PATH_FLAGS, drop=("seeds",)),
                               cfg.seeds, summary, columns=columns, average=average, average_definition=GLUE_AVERAGE,
                               files=[common.portable_path(p) for p in paths])


GLUE_AVERAGE = ("mean over columns of each task's main metric x 100 (CoLA Matthews corr., STS-B Pearson, "
                "every other task accuracy; MNLI-m and MNLI-mm are two columns), as the paper's Table 3 AVG")


def glue_average(summary):
    """{task: {dev split: {metric: {"mean"}}}} -> ({column: main metric x 100}, their mean): the
    paper's Table 3 AVG. Its RoBERTa row (MNLI 87.5 / 87.3, QQP 91.9, ..., RTE 78.7) gives 86.4 this
    way (nine columns); averaging MNLI first, or MRPC / QQP accuracy with F1, would not."""
    columns = {}
    for task, splits in summary.items():
        main = GLUE[task].metrics[0]  # mcc, acc or pearson
        for split, metrics in splits.items():
            name = task if len(splits) == 1 else task + "-" + {"dev_matched": "m", "dev_mismatched": "mm"}[split]
            columns[name] = 100 * metrics[main]["mean"]
    return columns, float(np.mean(list(columns.values())))


TASKS = {"tacred": run_tacred, "fewrel": run_fewrel, "open-entity": run_open_entity, "glue": run_glue}
