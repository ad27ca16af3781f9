"""Which entity mentions get knowledge injected, and what is injected (TRELM Sec. 3.1, Eq. 1).

TRELM injects knowledge only for *important long-tail* entities: entities that are rare in the
pre-training corpus (long-tail) and whose removal changes the representation of their context most
(semantic importance, Eq. 1). For a selected mention of entity e with a KG triple (e, r, t), the
input embedding of every token of e's span is replaced by the pseudo token h_e = E(t) - E(r)
(TransE-style, as in DKPLM), where E(x) is the mean input word embedding of x's label tokens.

| paper                      | here                                                                  |
|----------------------------|-----------------------------------------------------------------------|
| entity frequency           | `data.mention_counts(store, E)` -> (E,), once over the corpus          |
| long-tail entities         | `long_tail_mask(freq, percentile, inclusive)` -> (E,) bool             |
| SI(e), Eq. 1               | `semantic_importance(...)` -> (M,); over the corpus: `CorpusSI`        |
| h_o, h_rep                 | context-pooled window of each mention, original / span replaced        |
| "important"                | `important_threshold(si, candidate, top_fraction)`, one corpus threshold |
| (e, r, t)                  | `KnowledgeInjector.triple` (E, 3), one triple per head entity          |
| h_e = E(t) - E(r)          | `KnowledgeInjector.embed(word_embeddings, ent_id)` -> (M, H)           |
| injection strategy, Fig. 3 | `select_mentions(strategy, ...)`: important, long-tail, frequent, all, none, dkplm |
| DKPLM's KC(e)              | `kg_degree(triples, E)` -> (E,)                                        |

Decisions (each explained in docs/departures.md, "Eq. 1" and "h_e"):
- Eq. 1 as SI = 1 - cos(h_o, h_rep), not the printed 1 / cos: the same ranking when cos > 0.
- h_rep replaces the whole span by ONE mask token; context tokens keep their position ids; both
  vectors are pooled over the context of a +-window token window (pretrain.py --si-window 8).
- SI is computed once over the corpus with the initial model (a dataset column, Sec. 3.4
  "throughout the corpus"), only for candidates: long-tail mentions whose entity has a triple.
- "important" = candidates whose SI is in the corpus-level top fraction (--important-fraction).
- One seeded triple per head entity; E = mean input embedding of the label's tokens; no new parameters.

Mentions come as flat tensors over the batch (see data.py): ent_batch (M,) row, ent_start (M,),
ent_end (M,) token span [start, end), ent_id (M,) KG entity index, ent_si (M,) their SI. How
pretrain.py uses it (knowledge.Knowledge):

    freq = data.mention_counts(store, E)                                  # once, (E,)
    lt = long_tail_mask(freq, 50.0, inclusive=True)                       # (E,) bool
    injector = KnowledgeInjector(kg, tokenizer, seed=0)
    si = CorpusSI(lt & injector.has_knowledge.numpy(), 0.5, window=8, refresh=0)  # candidates (E,)
    si.score(store, model, tokenizer.mask_token_id, directory, rank, world)  # once: si.values (M,), si.threshold
    # per batch:
    sel = select_mentions("important", ent_id, lt, si=ent_si, si_threshold=si.threshold,
                          eligible=injector.injectable(ent_id))           # (M,) bool
    row, col, mention, _ = span_positions(ent_batch, ent_start, ent_end, selected=sel)  # (P,) each
    h_e = injector.embed(model.get_input_embeddings().weight, ent_id[sel])  # (S, H), written at the spans

Tests: `python -m pytest -q tests/test_entity_importance.py`.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common

STRATEGIES = ("important", "long-tail", "frequent", "all", "none", "dkplm")
MAX_LABEL_TOKENS = 16  # h_e's E(x) averages at most this many tokens of a label


# ----------------------------------------------------------------------------- long tail

def long_tail_mask(freq, percentile=50.0, inclusive=False):
    """(E,) bool: entities that occur (freq > 0) and whose frequency is below the `percentile`-th
    percentile (numpy's default linear interpolation) of the frequencies of occurring entities.

    Ties: with inclusive=False (default) an entity whose frequency equals the threshold is *not*
    long-tail, so if every occurring entity has the same frequency none is long-tail. On Zipfian
    corpora where more than `percentile`% of entities occur once the threshold is 1 and the strict
    rule selects nothing; inclusive=True uses freq <= threshold instead. Frequent entities are
    `(freq > 0) & ~long_tail_mask(freq)`.
    """
    freq = np.asarray(freq)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"entity_importance.long_tail_mask: percentile must be in [0, 100], got {percentile}")
    occurring = freq > 0
    if not occurring.any():
        return np.zeros(freq.shape, dtype=bool)
    threshold = np.percentile(freq[occurring], percentile)
    below = freq <= threshold if inclusive else freq < threshold
    return occurring & below


# ----------------------------------------------------------------------------- semantic importance

def _encode(model, input_ids, attention_mask, position_ids):
    """Last hidden state (B, T, H) of the encoder under the MLM head (BERT or RoBERTa)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state


def semantic_importance(model, input_ids, attention_mask, ent_batch, ent_start, ent_end, mask_token_id,
                        window=None, chunk=None, eval_mode=True):
    """SI(e) = 1 - cos(h_o, h_rep) for each of M mentions -> (M,) float32, no gradients.

    Eq. (1) as printed: SI(e) = (|h_o| |h_rep|) / (h_o . h_rep) = 1 / cos(h_o, h_rep).

    Context window of mention j (row b = ent_batch[j], span [s, e) = [ent_start[j], ent_end[j])):
    the tokens [s - window, e + window) of row b, clipped to its real tokens (attention_mask 1,
    right padding; window None: the whole row), cut out as a sequence of its own, so every
    mention gets the same symmetric context whatever the other mentions of the batch. h_o is the
    last hidden state of that window mean-pooled over its *context* positions (the window without
    the span); h_rep the same for the sentence "with e being replaced": the whole span replaced by
    ONE mask token (the entity is one unit whatever its length), every context token keeping its
    original position id, pooled over the same context tokens. So SI measures how much the entity
    changes the representation of its context rather than its length (the measured length
    correlations of this and earlier forms: docs/departures.md, "Eq. 1"). A window with no context
    position gets SI 0. All 2M windows go through ONE no-grad forward, split into chunks of at most
    `chunk` rows (None: one piece).

    Relation to the printed Eq. 1: both are strictly decreasing in cos, so they rank mentions
    identically whenever cos > 0; 1 - cos is also defined (and still ordered) when cos <= 0, and it
    is 0 when the replacement leaves the representation unchanged.

    eval_mode: run with dropout off (the module's train/eval mode is restored afterwards), so SI
        is a deterministic function of the current weights.
    model: the bare masked LM (under DDP pass ddp.module: this forward must not go through the
        DDP wrapper, which would expect a matching backward).
    """
    M = ent_batch.numel()
    dev = input_ids.device
    if M == 0:
        return torch.zeros(0, device=dev)
    if (ent_start < 0).any() or (ent_start >= ent_end).any():
        raise ValueError("entity_importance.semantic_importance: every mention span needs 0 <= ent_start < ent_end")
    n = attention_mask.sum(1)[ent_batch]  # (M,) real tokens of each mention's row
    if (ent_end > n).any():
        raise ValueError("entity_importance.semantic_importance: a mention span ends after its row's real tokens")
    w = int(input_ids.shape[1]) if window is None else int(window)
    if w < 0:
        raise ValueError(f"entity_importance.semantic_importance: window must be >= 0 or None, got {window}")
    lo = (ent_start - w).clamp(min=0)  # (M,)
    hi = torch.minimum(ent_end + w, n)  # (M,)
    W = int((hi - lo).max())
    pos = lo[:, None] + torch.arange(W, device=dev)  # (M, W)
    valid = pos < hi[:, None]  # (M, W) real tokens of the window
    orig = input_ids[ent_batch[:, None], pos.clamp(max=input_ids.shape[1] - 1)]  # (M, W)
    span = (pos >= ent_start[:, None]) & (pos < ent_end[:, None])  # (M, W)
    ctx = valid & ~span  # (M, W) context positions, pooled in both copies
    # h_rep's input: the context tokens and one mask token at the span's first position, left-aligned
    # (stable sort: kept tokens first, in order), each with its position id in the original window
    keep = ctx | (pos == ent_start[:, None])  # (M, W)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (M, W)
    rep = torch.where(span, torch.full_like(orig, mask_token_id), orig).gather(1, order)  # (M, W)
    rep_valid = torch.arange(W, device=dev) < keep.sum(1, keepdim=True)  # (M, W)
    rep_ctx = ctx.gather(1, order) & rep_valid  # (M, W) the same context tokens as ctx
    off = getattr(model.base_model.embeddings, "padding_idx", None)  # RoBERTa counts positions from pad + 1
    off = 0 if off is None else off + 1
    at = off + torch.arange(W, device=dev).expand(M, W)  # (M, W) position ids of the original window
    ids, attn = torch.cat([orig, rep]), torch.cat([valid, rep_valid]).long()  # (2M, W)
    pos_ids = torch.cat([at, at.gather(1, order)])  # (2M, W)
    weight = torch.cat([ctx, rep_ctx]).float()  # (2M, W)
    step = ids.shape[0] if chunk is None else int(chunk)
    if step < 1:
        raise ValueError(f"entity_importance.semantic_importance: chunk must be >= 1 or None, got {chunk}")
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            hidden = torch.cat([_encode(model, ids[i:i + step], attn[i:i + step], pos_ids[i:i + step]).float()
                                for i in range(0, ids.shape[0], step)])  # (2M, W, H)
    finally:
        model.train(was_training)
    pooled = (hidden * weight.unsqueeze(-1)).sum(1)  # (2M, H); sums, the count cancels in cos
    h_o, h_rep = pooled[:M], pooled[M:]
    si = 1.0 - F.cosine_similarity(h_o, h_rep, dim=-1)  # Eq. (1), see docstring; (M,)
    return torch.where(ctx.sum(1) > 0, si, torch.zeros_like(si))


# ----------------------------------------------------------------------------- injection strategy

def important_threshold(si, candidate, top_fraction=0.5):
    """Corpus-level SI threshold of "important" (Sec. 3.4: important entities are identified
    "throughout the corpus"): the SI of the k-th highest scoring candidate mention of the whole
    corpus, k = ceil(top_fraction * n) of its n candidates (long-tail mentions with a triple).
    si, candidate: (N,) over every mention of the corpus. None when there is no candidate."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"entity_importance.important_threshold: top_fraction (--important-fraction) must be "
                         f"in (0, 1], got {top_fraction}")
    s = np.sort(np.asarray(si, dtype=np.float64)[np.asarray(candidate, dtype=bool)])[::-1]  # (n,) descending
    if s.size == 0:
        return None
    if np.isnan(s).any():
        raise ValueError("entity_importance.important_threshold: SI is NaN for a candidate mention")
    return float(s[math.ceil(top_fraction * s.size) - 1])


def kg_degree(triples, num_entities):
    """(E,) int64: number of triples each entity takes part in (as head or tail), DKPLM's KC(e)."""
    t = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
    return np.bincount(np.concatenate([t[:, 0], t[:, 2]]), minlength=num_entities).astype(np.int64)


def entity_pool(strategy, long_tail):
    """(E,) bool: the entities whose mentions `strategy` may inject, before SI and eligibility: the
    long-tail ones for "long-tail", "important" and "dkplm", the others for "frequent", all for "all"."""
    lt = long_tail if torch.is_tensor(long_tail) else torch.from_numpy(np.asarray(long_tail, dtype=bool))
    lt = lt.to(torch.bool)
    return {"none": torch.zeros_like(lt), "all": torch.ones_like(lt), "frequent": ~lt}.get(strategy, lt)


def select_mentions(strategy, ent_id, long_tail, si=None, si_threshold=None, eligible=None, ent_batch=None,
                    degree=None, at_least_mean=False):
    """(M,) bool: which mentions get knowledge injected (Fig. 3 strategies, and DKPLM's).

    strategy: "none" nothing; "all" every mention; "long-tail" mentions of long-tail entities;
      "frequent" mentions of the other entities (mentions come from the corpus, so their entities
      occur); "important" the long-tail mentions with SI >= si_threshold, the corpus-level
      threshold of `important_threshold`; "dkplm" DKPLM's knowledge-aware long-tail score
      KLT(e) = 1[e long-tail] * SI(e) * KC(e) (KC = `degree`, the entity's KG degree), selecting the
      mentions whose KLT is positive and above the mean KLT of the eligible mentions of their
      sequence (ent_batch); at_least_mean: at or above it (a sequence's only candidate is then selected:
      strictly above, it never is; --dkplm-select).
    si: (M,) SI per mention ("important", "dkplm"; only long-tail eligible mentions are read, others
      may be NaN). long_tail: (E,) bool over KG entities.
    eligible: optional (M,) bool, mentions that can be injected at all (see
      KnowledgeInjector.injectable); the result is ANDed with it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"entity_importance.select_mentions: strategy must be one of {STRATEGIES}, got {strategy!r}")
    dev = ent_id.device
    pool = entity_pool(strategy, long_tail).to(dev)[ent_id]  # (M,)
    ok = torch.ones_like(pool) if eligible is None else eligible.to(device=dev, dtype=torch.bool)
    if strategy in ("none", "all", "long-tail", "frequent"):
        return pool & ok
    lt = pool  # "important", "dkplm": the long-tail mentions
    if si is None:
        raise ValueError(f"entity_importance.select_mentions: strategy {strategy!r} needs si (M,), got None")
    si = si.to(dev).float()
    if strategy == "important":
        if si_threshold is None:
            return torch.zeros_like(lt)  # no candidate anywhere in the corpus
        return lt & ok & (si >= si_threshold)
    if ent_batch is None or degree is None:
        raise ValueError("entity_importance.select_mentions: strategy 'dkplm' needs ent_batch and degree")
    deg = torch.as_tensor(np.asarray(degree), dtype=torch.float32, device=dev)[ent_id]  # (M,)
    klt = torch.where(ok & lt, si * deg, torch.zeros_like(si))  # (M,) KLT(e); SI of other mentions unused
    rows = int(ent_batch.max()) + 1 if ent_batch.numel() else 0
    total = torch.zeros(rows, device=dev).index_add_(0, ent_batch, klt)  # (rows,)
    count = torch.zeros(rows, device=dev).index_add_(0, ent_batch, ok.float()).clamp(min=1)
    mean = (total / count)[ent_batch]
    return ok & (klt > 0) & (klt >= mean if at_least_mean else klt > mean)


def score_rows(store, shard, rows, mlm, mask_token_id, window, candidate, batch_size):
    """SI of the candidate mentions of sequences `rows` (a range of one store shard), by mlm on its device ->
    (M,) float32 over those sequences' mentions in store order, NaN for the mentions not scored. The
    sequences are padded into one (B, T) batch; each mention gets its own window (semantic_importance)."""
    dev = next(mlm.parameters()).device
    sh = store.shards[shard]
    seq, ment = np.asarray(sh["seq"][rows.start:rows.stop + 1], np.int64), np.asarray(sh["ment"][rows.start:rows.stop + 1], np.int64)
    n, counts = np.diff(seq), np.diff(ment)
    B, T = len(n), int(n.max())
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        ids[b, :n[b]] = torch.from_numpy(np.asarray(sh["tokens"][seq[b]:seq[b + 1]], np.int64))
        attn[b, :n[b]] = 1
    m0, m1 = int(ment[0]), int(ment[-1])
    eb = torch.repeat_interleave(torch.arange(B), torch.from_numpy(counts))  # (M,)
    es, ee = (torch.from_numpy(np.asarray(sh[k][m0:m1], np.int64)) for k in ("ent_start", "ent_end"))
    keep = torch.from_numpy(candidate[np.asarray(sh["ent_id"][m0:m1], np.int64)])  # (M,)
    si = torch.full((len(eb),), float("nan"))
    if keep.any():
        si[keep] = semantic_importance(mlm, ids.to(dev), attn.to(dev), eb[keep].to(dev), es[keep].to(dev),
                                       ee[keep].to(dev), mask_token_id, window=window, chunk=4 * batch_size).cpu()
    return si.numpy()


def score_shards(store, mlm, mask_token_id, window, candidate, directory, shards, batch_size=64, progress=True):
    """SI (Eq. 1) of every candidate mention of the given store shards, batch_size sequences at a time,
    each shard written to directory/shard-NNNNN.npy ((M_s,) float32, NaN: not a candidate) when done,
    atomically; a shard already there is skipped (a restarted run resumes). Nothing is forked."""
    from tqdm import tqdm
    todo = [s for s in shards if not os.path.exists(os.path.join(directory, f"shard-{s:05d}.npy"))]
    if todo:  # a read-only cache that holds every score is fine; one that must take new ones ends in one line
        common.writable_dir(directory, "--cache-dir")
    total = sum(len(store.shards[s]["seq"]) - 1 for s in todo)
    with tqdm(total=total, desc="SI(e) over the corpus", unit="seq", disable=not progress or not todo) as bar:
        for s in todo:
            N = len(store.shards[s]["seq"]) - 1
            parts = []
            for a in range(0, N, batch_size):
                parts.append(score_rows(store, s, range(a, min(a + batch_size, N)), mlm, mask_token_id, window,
                                        candidate, batch_size))
                bar.update(min(batch_size, N - a))
            common.atomic_write(os.path.join(directory, f"shard-{s:05d}.npy"),
                                lambda tmp, v=np.concatenate(parts).astype(np.float32): np.save(open(tmp, "wb"), v))


def shares(store, candidate, world):
    """The store's shards dealt to `world` ranks so that each scores about as many candidate mentions:
    -> [[shard, ...] per rank] (largest first to the least loaded rank; a function of the store alone)."""
    work = [int(candidate[np.asarray(sh["ent_id"], np.int64)].sum()) for sh in store.shards]
    out, load = [[] for _ in range(world)], [0] * world
    for s in sorted(range(len(work)), key=lambda s: (-work[s], s)):
        r = load.index(min(load))
        out[r].append(s)
        load[r] += work[s]
    return [sorted(x) for x in out]


class CorpusSI:
    """SI(e) (Eq. 1) over the corpus and its corpus-level threshold of "important" (Sec. 3.4: important
    entities are identified "throughout the corpus"): scored once with the initial model for every
    candidate mention, or again with the current model every `refresh` epochs (--si-refresh; our
    decision, docs/departures.md).

    candidate (E,) bool: entities whose mentions are scored (long-tail, with a triple); top_fraction:
    --important-fraction; window: --si-window (0 = the whole sequence); refresh: --si-refresh (0 = never).
    values (M,) float32: SI of every mention of the store in its order, NaN where not scored;
    threshold: the SI an "important" mention reaches (important_threshold); epoch: the epoch whose model
    scored SI (0: the initial model)."""

    def __init__(self, candidate, top_fraction, window, refresh, batch_size=64):
        self.candidate, self.top_fraction, self.window, self.refresh = candidate, top_fraction, window, refresh
        self.batch_size = batch_size
        self.values, self.threshold, self.epoch = None, None, 0

    def score(self, store, mlm, mask_token_id, directory, rank=0, world=1):
        """SI of every candidate mention of the store by mlm, at scale: this rank scores its share of the
        shards (shares) on mlm's device and writes each to `directory` (score_shards: a rerun skips what is
        there); every rank then reads every shard, so all use the same values. Under DDP (world > 1) the
        one collective comes after this rank's share: it waits only for the slowest share. A shard a rank
        cannot see on disk (no shared filesystem) comes from the rank that scored it."""
        import torch.distributed as dist
        mine = shares(store, self.candidate, world)[rank]
        score_shards(store, mlm, mask_token_id, self.window or None, self.candidate, directory, mine,
                     self.batch_size, progress=rank == 0)
        path = lambda s: os.path.join(directory, f"shard-{s:05d}.npy")
        got = {s: np.load(path(s)) for s in range(len(store.shards)) if os.path.exists(path(s))}
        if world > 1:
            missing = [None] * world
            dist.all_gather_object(missing, [s for s in range(len(store.shards)) if s not in got])
            wanted = set().union(*map(set, missing))
            if wanted:
                sent = [None] * world
                dist.all_gather_object(sent, {s: got[s] for s in mine if s in wanted})
                for part in sent:
                    got.update(part)
        self.values = np.concatenate([got[s] for s in range(len(store.shards))])
        self.set_threshold(store)

    def set_threshold(self, store):
        self.threshold = important_threshold(self.values.astype(np.float64), self.candidate[store.flat("ent_id")],
                                             self.top_fraction)

    def important(self):
        """(M,) bool over the store's mentions: SI at or above the threshold."""
        return self.values >= self.threshold

    def due(self, epoch):
        """A refresh is due at the start of epoch floor(epoch)."""
        return bool(self.refresh) and math.floor(epoch) >= self.epoch + self.refresh

    def refreshed(self, epoch):
        q = math.floor(epoch)
        self.epoch = q - q % self.refresh

    def state_dict(self):
        """None while SI is the initial model's (scored identically at start); after a refresh, the scores
        (their model is gone)."""
        return None if not self.epoch else {"epoch": self.epoch, "values": self.values}

    def load_state_dict(self, st, store):
        if st:
            self.epoch, self.values = st["epoch"], np.asarray(st["values"], np.float32)
            self.set_threshold(store)


# ----------------------------------------------------------------------------- h_e and injection

def _tokenize_labels(tokenizer, labels, max_tokens, chunk=65536):
    """Token ids of each label as a mid-sentence word (leading space: RoBERTa's 'Ġ' form; BERT
    WordPiece ignores it), no special tokens, truncated to max_tokens, tokenized `chunk` labels at a
    time -> (padded (N, L) int32, lens (N,) int64). int32 halves the tables at Wikidata5M scale."""
    ids = []
    for i in range(0, len(labels), chunk):
        batch = tokenizer([" " + s for s in labels[i:i + chunk]], add_special_tokens=False)["input_ids"]
        ids.extend(np.asarray(x[:max_tokens], dtype=np.int32) for x in batch)
    lens = np.array([len(x) for x in ids], dtype=np.int64)  # (N,)
    out = np.zeros((len(ids), max(int(lens.max(initial=0)), 1)), dtype=np.int32)  # (N, L), 0-padded
    if ids:
        out[np.arange(out.shape[1]) < lens[:, None]] = np.concatenate(ids)
    return torch.from_numpy(out), torch.from_numpy(lens)


class KnowledgeInjector:
    """One KG triple (e, r, t) per head entity and the pseudo token h_e = E(t) - E(r).

    Choice of triple: for every entity with at least one triple as head, one of its triples chosen
    uniformly at random with numpy.random.default_rng(seed) (one uniform draw per entity, in entity
    order, over its triples in file order), so the choice depends only on the KG and the seed.
    Entities whose chosen tail or relation label tokenizes to nothing have no knowledge.

    kg: an object with entity_ids, entity_labels, relation_labels, triples (np.int32 (N, 3):
        head, relation, tail indices), e.g. kg.KG. entity_tokens: (tokens (E, L) int32, lens (E,)) of every
        entity label tokenized as here (data.label_tables), or None: the chosen tails are tokenized here.
    Attributes: has_knowledge (E,) bool tensor; triple (E, 3) long, -1 rows where no knowledge.
    """

    def __init__(self, kg, tokenizer, seed=0, max_label_tokens=MAX_LABEL_TOKENS, entity_tokens=None):
        E = len(kg.entity_ids)
        tri = np.asarray(kg.triples, dtype=np.int64).reshape(-1, 3)  # (N, 3)
        if tri.size and (tri[:, [0, 2]].min() < 0 or tri[:, [0, 2]].max() >= E
                         or tri[:, 1].min() < 0 or tri[:, 1].max() >= len(kg.relation_labels)):
            raise ValueError("entity_importance.KnowledgeInjector: kg.triples holds an entity or relation "
                             f"index out of range (E={E}, R={len(kg.relation_labels)})")
        order = np.argsort(tri[:, 0], kind="stable")  # triples grouped by head, file order within
        counts = np.bincount(tri[:, 0], minlength=E)  # (E,)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (E,) offset of each head's group
        u = np.random.default_rng(seed).random(E)  # (E,) one draw per entity
        heads = np.nonzero(counts)[0]
        pick = order[first[heads] + np.floor(u[heads] * counts[heads]).astype(np.int64)]  # (K,)
        chosen = tri[pick]  # (K, 3)

        tails = np.unique(chosen[:, 2])
        if entity_tokens is None:
            tail_tok, tail_len = _tokenize_labels(tokenizer, [kg.entity_labels[t] for t in tails], max_label_tokens)
        else:  # every label tokenized once by the prepare step (data.label_tables): the tails' rows
            tail_len = torch.from_numpy(np.asarray(entity_tokens[1][tails], np.int64))  # (U,)
            width = max(int(tail_len.max()) if len(tail_len) else 0, 1)  # as _tokenize_labels pads them
            tail_tok = torch.from_numpy(np.asarray(entity_tokens[0][tails][:, :width], np.int32))  # (U, Lt)
        rel_tok, rel_len = _tokenize_labels(tokenizer, list(kg.relation_labels), max_label_tokens)
        tail_row = np.searchsorted(tails, chosen[:, 2])  # (K,) row in tail_tok
        ok = (tail_len[tail_row] > 0).numpy() & (rel_len[chosen[:, 1]] > 0).numpy()
        heads, chosen, tail_row = heads[ok], chosen[ok], tail_row[ok]

        self.triple = torch.full((E, 3), -1, dtype=torch.long)
        self.triple[heads] = torch.from_numpy(chosen)
        self.has_knowledge = self.triple[:, 0] >= 0  # (E,)
        self.tail_tok, self.tail_len = tail_tok, tail_len  # (U, Lt), (U,) unique chosen tails
        self.rel_tok, self.rel_len = rel_tok, rel_len  # (R, Lr), (R,)
        self.tail_of = torch.full((E,), -1, dtype=torch.long)  # (E,) entity -> row of tail_tok
        self.tail_of[heads] = torch.from_numpy(tail_row)
        self._on = {}  # device -> tensors moved there

    def _tables(self, device):
        if device not in self._on:
            self._on[device] = [t.to(device) for t in (self.has_knowledge, self.triple, self.tail_of,
                                                        self.tail_tok, self.tail_len, self.rel_tok, self.rel_len)]
        return self._on[device]

    def injectable(self, ent_id):
        """(M,) bool: the mention's entity has a triple, i.e. can be injected."""
        return self._tables(ent_id.device)[0][ent_id]

    def embed(self, word_embeddings, ent_id):
        """h_e = E(t) - E(r) -> (M, H), differentiable w.r.t. word_embeddings (V, H).
        Every ent_id must be injectable (select with eligible=injectable(ent_id))."""
        has, triple, tail_of, tail_tok, tail_len, rel_tok, rel_len = self._tables(word_embeddings.device)
        ent_id = ent_id.to(word_embeddings.device)
        if not bool(has[ent_id].all()):
            bad = ent_id[~has[ent_id]][:5].tolist()
            raise ValueError(f"entity_importance.KnowledgeInjector.embed: entities {bad} have no KG triple; "
                             "AND the selection with injectable(ent_id)")
        t_rows = tail_of[ent_id]  # (M,)
        r_rows = triple[ent_id, 1]  # (M,)
        return (_mean_embedding(word_embeddings, tail_tok[t_rows], tail_len[t_rows])
                - _mean_embedding(word_embeddings, rel_tok[r_rows], rel_len[r_rows]))

    def relation_embed(self, word_embeddings, ent_id):
        """E(r) of each entity's chosen triple -> (M, H), differentiable w.r.t. word_embeddings."""
        _, triple, _, _, _, rel_tok, rel_len = self._tables(word_embeddings.device)
        r_rows = triple[ent_id.to(word_embeddings.device), 1]  # (M,)
        if bool((r_rows < 0).any()):
            raise ValueError("entity_importance.KnowledgeInjector.relation_embed: an entity has no KG triple")
        return _mean_embedding(word_embeddings, rel_tok[r_rows], rel_len[r_rows])


def _mean_embedding(W, tok, lens):
    """Mean of W rows over the first lens[i] ids of tok[i]: W (V, H), tok (M, L), lens (M,) -> (M, H)."""
    m = (torch.arange(tok.shape[1], device=tok.device) < lens.unsqueeze(1)).to(W.dtype)  # (M, L)
    return (F.embedding(tok, W) * m.unsqueeze(-1)).sum(1) / lens.unsqueeze(1).to(W.dtype)  # (M, H)


def _expand_spans(ent_start, ent_end, idx):
    """Mentions idx (S,) -> (mention (P,), offset_in_span (P,)), one entry per span token."""
    lens = ent_end[idx] - ent_start[idx]  # (S,)
    if (lens <= 0).any() or (ent_start[idx] < 0).any():
        raise ValueError("entity_importance: every mention span needs 0 <= ent_start < ent_end")
    mention = torch.repeat_interleave(idx, lens)  # (P,)
    begin = torch.cumsum(lens, 0) - lens  # (S,) first entry of each span in the flat list
    offset = torch.arange(mention.numel(), device=idx.device) - torch.repeat_interleave(begin, lens)  # (P,)
    return mention, offset


def span_positions(ent_batch, ent_start, ent_end, selected=None):
    """Token positions of the (selected) mention spans, expanded without a loop over mentions.

    Returns (row (P,), col (P,), mention (P,), offset_in_span (P,)), P = total span length, spans in
    mention order and left to right: position p is token offset_in_span[p] of mention[p] (an index
    into the M mentions) at input position (row[p], col[p]); its CKA target is input_ids[row, col]
    of the un-injected input, the i-th original token of e. Selected spans must not overlap.
    """
    idx = torch.arange(ent_batch.numel(), device=ent_batch.device)
    if selected is not None:
        idx = idx[selected.to(torch.bool)]
    mention, offset = _expand_spans(ent_start, ent_end, idx)
    row, col = ent_batch[mention], ent_start[mention] + offset
    if row.numel():
        key = row * (int(col.max()) + 1) + col
        if torch.unique(key).numel() != key.numel():
            raise ValueError("entity_importance.span_positions: selected mention spans overlap; "
                             "select at most one mention per token")
    return row, col, mention, offset
