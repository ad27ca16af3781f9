"""The knowledge side of a run (TRELM Sec. 3.1-3.2): what each micro-batch injects, and the memory it reads.

Knowledge holds the corpus-level state a run builds once before its first step: entity frequency and
the long-tail (Sec. 3.1), SI(e) of every candidate mention and the "important" threshold (Eq. 1,
entity_importance.CorpusSI), Q for CKA's negatives (Eq. 2, cka.NegativeSampler), DKPLM's KG degree,
the long-tail words (--long-tail-words) and the memory bank (Sec. 3.2). Per micro-batch:

    plan = know.plan(batch, g, E, lam)     # before the forward: model.Plan, or None
    ...forward, backward...
    know.observe(batch, hidden)            # after it: Eq. (4)-(6) for every mention of a key in the bank

plan() chooses the mentions --injection selects (entity_importance.select_mentions), their span
positions and decoding targets (the entity's own tokens), draws CKA's negatives and reads the
memory for every key it mixes (Eq. 7's inputs; keys new to the bank are added first). Under DDP
plan() and observe() are collectives (the bank stays identical on every rank): every rank calls
them, with or without mentions.

| paper                          | here                                                   |
|--------------------------------|--------------------------------------------------------|
| entity frequency, long-tail    | freq (E,), long_tail (E,) bool                         |
| SI(e), "important" (Eq. 1)     | si: entity_importance.CorpusSI (si.values per mention) |
| h_e = E(t) - E(r)              | injector.embed (KnowledgeInjector)                     |
| Q (Eq. 2)                      | sampler (NegativeSampler)                              |
| M_local, M_global (Eq. 4-6)    | bank (MemoryBank): read before, observe after           |

Tests: python -m pytest -q tests/test_pretrain.py
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import data
from cka import NegativeSampler
from common import cache_key, code_version
from entity_importance import CorpusSI, KnowledgeInjector, entity_pool, kg_degree, long_tail_mask, score_rows, \
    select_mentions, semantic_importance, span_positions
from memory_bank import MemoryBank
from model import Plan, WordNotes


class Knowledge:
    """Which mentions of a micro-batch get knowledge injected, with what targets, negatives and memory
    (plan), and the memory-bank update after the forward (observe); the corpus-level state behind them
    (module docstring). inj, mem: the run's config.Injection and config.Memory; method: its
    config.Method; store: the prepared corpus (data.Store); SI scores are kept under cache/si/."""

    def __init__(self, inj, mem, method, kg, tok, store, mlm, device, *, seed, model_name, cache, rank, world):
        self.inj, self.mem, self.kg, self.tok, self.store, self.device = inj, mem, kg, tok, store, device
        self.model_name, self.cache, self.rank, self.world = model_name, cache, rank, world
        self.group = dist.group.WORLD if world > 1 else None
        self.injector = self.sampler = self.bank = self.long_tail_word = self.si = self.degree = None
        if inj.injection != "none":
            self.injector = KnowledgeInjector(kg, tok, seed=seed, entity_tokens=store.labels())
            self.freq = data.mention_counts(store, kg.num_entities)  # one pass over the ent_id column
            self.long_tail = torch.as_tensor(long_tail_mask(self.freq, inj.long_tail_percentile, inclusive=True))
            if inj.injection in ("important", "dkplm"):  # SI once over the corpus (Sec. 3.4), initial model
                self.si = CorpusSI(self.long_tail.numpy() & self.injector.has_knowledge.numpy(),
                                   inj.important_fraction, inj.si_window, inj.si_refresh)
                self.score_si(mlm)
            if inj.injection == "dkplm":
                self.degree = kg_degree(kg.triples, kg.num_entities)
        if method.sampler and inj.injection != "none":
            self.sampler = NegativeSampler(store.q_counts())
        if mem.memory_bank:
            self.bank = MemoryBank(mlm.config.hidden_size, window_k=mem.window_k, gamma=mem.gamma,
                                   dtype=torch.bfloat16 if mem.memory_dtype == "bf16" else torch.float32,
                                   device=mem.memory_device, context_only=mem.memory_window == "context")
        if mem.long_tail_words and mem.memory_bank:  # once over the corpus (Sec. 3.4), like entity frequency
            self.plain = data.plain_tokens(tok).to(device)  # (V,)
            self.word_freq = data.word_counts(store, self.plain.cpu())  # (V,)
            lt = long_tail_mask(self.word_freq, mem.word_percentile, inclusive=True) & \
                (self.word_freq >= mem.word_min_count)
            self.long_tail_word = torch.as_tensor(lt).to(device)  # (V,) bool

    # -- one micro-batch ---------------------------------------------------------------

    @torch.no_grad()
    def plan(self, batch, g, E, lam):
        """Sec. 3.1-3.2 for one micro-batch -> Plan, or None when it injects nothing: the mentions to
        inject (Fig. 3 strategies; SI from the corpus column), their span positions and decoding targets,
        CKA negatives from Q (drawn with g), the long-tail words, and the memory read for all of them,
        mixed with Eq. (8)'s `lam`. E: the input embedding table (V, H). Collective under DDP
        (the bank's ensure): every rank calls it, with or without mentions."""
        spans = self.spans(batch)  # (rows, cols, mention, targets, ent_id, sel) or None
        negatives = None
        if spans is not None and self.sampler is not None:
            negatives = self.sampler.sample(spans[3].cpu(), self.inj.negatives, generator=g).to(self.device)  # (P, K)
        words = self.words(batch) if self.long_tail_word is not None else None  # (rows, cols, key, shown)
        if spans is None and words is None:
            self.read_memory(None, None, E)  # a collective: this rank joins with no keys
            return None
        if spans is None:  # long-tail words and no injected entity: an empty entity plan
            z = torch.zeros(0, dtype=torch.long, device=self.device)
            spans = (z, z, z, z, z, z)
            negatives = None if self.sampler is None else z.new_zeros(0, self.inj.negatives)
        rows, cols, mention, targets, ent_id, sel = spans
        mem, word_mem = self.read_memory(spans, words, E)
        return Plan(rows, cols, mention, targets, ent_id=ent_id, sel=sel, negatives=negatives, mem=mem,
                    h_e=E[self.tok.mask_token_id].expand(len(sel), -1) if self.inj.no_injection else None,  # ablation
                    lam=lam, match_norm=self.mem.memory_scale == "embedding",
                    words=None if words is None else WordNotes(*words, mem=word_mem))

    def spans(self, batch):
        """The mentions --injection selects -> (rows, cols, mention (P,), targets (P,) the entity's own
        tokens, ent_id (S,), sel (S,)), or None."""
        eid = batch["ent_id"]
        if self.injector is None or len(eid) == 0:
            return None
        sel = select_mentions(self.inj.injection, eid, self.long_tail, si=batch.get("ent_si"),
                              si_threshold=None if self.si is None else self.si.threshold,
                              eligible=self.injector.injectable(eid), ent_batch=batch["ent_batch"], degree=self.degree,
                              at_least_mean=self.inj.dkplm_select == "at-least-mean")
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
        if self.mem.memory_init == "knowledge":
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

    # -- SI over the corpus (Eq. 1) ------------------------------------------------------

    def score_si(self, mlm):
        """SI(e) (Eq. 1) of every candidate mention by mlm (the initial model, or the current one under
        --si-refresh), each rank scoring its share of the store's shards (CorpusSI.score); the scores are
        kept under <cache>/si/<store>-<model, settings and code>/, so a restarted run reads them back."""
        W = mlm.get_input_embeddings().weight
        key = cache_key([self.model_name, list(W.shape), f"{float(W.detach().double().sum()):.10e}", self.inj.si_window,
                         self.tok.mask_token_id, code_version(semantic_importance, score_rows),
                         np.packbits(self.si.candidate).tobytes().hex()])
        directory = os.path.join(self.cache, "si", f"{self.store.meta['key']}-{key}")
        self.si.score(self.store, mlm.to(self.device), self.tok.mask_token_id, directory, self.rank, self.world)

    def refresh_si(self, mlm, epoch, step):
        """--si-refresh N: at the start of every N-th epoch, SI(e) of the corpus's candidates again with
        the current model, and a new threshold (docs/departures.md)."""
        if self.si is None or not self.si.due(epoch):
            return
        before = self.si.important()
        self.score_si(mlm)
        self.si.refreshed(epoch)
        if self.rank == 0:
            after = self.si.important()
            print(f"SI refreshed at epoch {self.si.epoch} (step {step}): {int(after.sum())} important mentions, "
                  f"Jaccard {(before & after).sum() / max(1, (before | after).sum()):.3f} with the previous set",
                  file=sys.stderr, flush=True)

    def batch_si(self, idx):
        """(M,) float32 SI of the mentions of sequences idx (the collator's mention order), or None."""
        return None if self.si is None else torch.from_numpy(self.si.values[self.store.mention_index(idx)])

    # -- checkpoint state and census ------------------------------------------------------

    def state_dict(self):
        return {"bank": self.bank.state_dict() if self.bank is not None else None,
                "si": None if self.si is None else self.si.state_dict()}

    def load_state_dict(self, st):
        """The bank, and the SI column a refresh before the checkpoint computed (its model is gone)."""
        if self.bank is not None:
            self.bank.load_state_dict(st["bank"])
        if self.si is not None:
            self.si.load_state_dict(st.get("si"), self.store)

    def census(self):
        """Over the whole corpus: sequences, linked mentions, entities linked, and the mentions --injection
        may inject (entity has a KG triple and is in the strategy's pool, entity_pool)."""
        c = {"sequences": len(self.store)}
        if self.injector is None:
            return c
        freq = torch.as_tensor(self.freq)  # (N_e,) linked mentions per entity
        ok = self.injector.injectable(torch.arange(len(freq))) & entity_pool(self.inj.injection, self.long_tail)
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
