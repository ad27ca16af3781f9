"""Pre-training data (TRELM Sec. 4.1): the prepare step, the prepared store, the data order and the MLM collator.

    python data.py prepare --corpus PATH --kg DIR --model NAME --seq-len N --out DIR [--num-proc N]
    torchrun --nproc_per_node=8 pretrain.py --data DIR ...      # DIR: the prepared store (no tokenization)

The prepare step (run once, before training, as nanoGPT's prepare scripts) reads a corpus in any
layout of corpus.py (our corpus.jsonl / .txt, Wikidata5M's wikidata5m_text.txt, WikiExtractor --json
output with or without --links, the Hugging Face wikimedia/wikipedia parquet files) and a KG in
Wikidata5M's layout (kg.py); links, tokenizes and packs it with --num-proc worker processes, and
writes a store of memory-mapped numpy files in compact dtypes, in shards, each written atomically:

    DIR/store.json                 tokenizer, sequence length, KG key, corpus, counts; written last
    DIR/q_counts.npy, label_tokens.npy, label_lens.npy   the KG's entity labels tokenized once (label_tables)
    DIR/shard-00000/tokens.npy     (T,) uint16 when the vocabulary fits (else uint32): every sequence,
                                   [CLS] ... [SEP], end to end
                   seq.npy         (N + 1,) int32 token offset of each sequence
                   word_start.npy  (ceil(T / 8),) uint8: 1 bit per token, set where a word starts
                   ment.npy        (N + 1,) int32 offset of each sequence's mentions
                   ent_start.npy, ent_end.npy  (M,) uint16 token span [start, end) inside its sequence
                   ent_id.npy      (M,) int32 KG entity index
A killed prepare, rerun, finishes only the missing shards. Why numpy files and not `datasets`: the
columns are fixed-width arrays that every rank memory-maps as they are (no Arrow list columns, no
Python object per row, no copy of the text), and one .npy per column and shard is the simplest
atomic unit; `datasets` still reads the parquet layout (corpus.py).

`--data mini` (the embedded default, data_mini.py) and a `--data DIR` holding kg/ and corpus.jsonl or
corpus.txt are prepared on first use, into the cache (cache_root: --cache-dir, $TRELM_CACHE, or
data_cache/ here), under a file lock: concurrent processes wait on the lock, not on each other's
collectives. A prepared DIR (store.json) is read as it is.

Decisions:
- Documents are packed into --seq-len sequences within blocks of PACK_BLOCK documents, so the sequences
  do not depend on --num-proc; a shard holds SHARD_BLOCKS blocks (the unit of writing and resuming).
- A document longer than a sequence is cut into pieces; a mention crossing a cut is dropped.
- The data order and the MLM masking are functions of (seed, step, rank, micro-batch): a resume
  needs no data state.

A training batch (see MLMCollator) is a dict of tensors:
    input_ids (B,T), attention_mask (B,T), mlm_labels (B,T) (-100 = not predicted), orig_ids (B,T),
    word_start (B,T), ent_batch (M,), ent_start (M,), ent_end (M,)  token span [start, end) of mention m
    in row ent_batch[m], ent_id (M,) KG entity index of mention m

Tests: python -m pytest -q tests/test_data.py tests/test_readers.py tests/test_prepare.py
"""
import argparse
import fcntl
import gc
import json
import os
import shutil
import sys
import time

import numpy as np

import corpus as corpora
from common import DataError, cache_key, cache_root, code_version, file_stamp, writable_dir
from data_mini import mini_dir
from cka import label_token_counts
from entity_importance import MAX_LABEL_TOKENS, _tokenize_labels
from kg import AliasLinker, load_kg

PACK_BLOCK = 1000  # documents per block; sequences are packed within a block
SHARD_BLOCKS = 100  # blocks per shard: the unit written atomically and resumed
FORMAT = 1  # store.json "format"


# -----------------------------------------------------------------------------
# Tokenization and packing (a block of documents at a time, in the prepare workers)

def char_to_token_spans(offsets, entities):
    """Map character spans to token spans. offsets: [(s, e)] per token (no special tokens).
    A token belongs to an entity if its characters overlap the entity's. -> [(tok_start, tok_end, i)]
    with exclusive tok_end, sorted by start, for every entity that covers at least one token; of
    mentions whose token spans overlap (nested annotations) only the first one by start (the shorter at
    equal starts) is kept."""
    starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    ends = np.asarray([o[1] for o in offsets], dtype=np.int64)
    spans = []
    for i, e in enumerate(entities):
        hit = np.nonzero((starts < e["end"]) & (ends > e["start"]) & (ends > starts))[0]
        if len(hit):
            spans.append((int(hit[0]), int(hit[-1]) + 1, i))
    out = []
    for s, e, i in sorted(spans):
        if not out or s >= out[-1][1]:
            out.append((s, e, i))
    return out


def tokenize_docs(batch, tokenizer, entity_index):
    """Tokenize documents and map their mentions to token spans: batch {"text", "entities"} ->
    per document ids, ws (1 where a token starts a word), es/ee (token span [start, end) of each
    mention), ei (KG entity index); no special tokens."""
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True)
    out = {"ids": [], "ws": [], "es": [], "ee": [], "ei": []}
    for ids, offs, text, ents in zip(enc["input_ids"], enc["offset_mapping"], batch["text"], batch["entities"]):
        # a token starts a word if whitespace (or the text start) precedes it
        out["ws"].append([1 if (s == 0 or text[s - 1].isspace()) else 0 for s, _ in offs])
        spans = char_to_token_spans(offs, ents)
        out["ids"].append(ids)
        out["es"].append([s for s, _, _ in spans])
        out["ee"].append([e for _, e, _ in spans])
        out["ei"].append([entity_index[ents[i]["id"]] for _, _, i in spans])
    return out


def pack_docs(batch, cls, sep, max_len):
    """Pack tokenized documents (tokenize_docs) greedily into
    sequences of at most max_len tokens with the model's special tokens cls and sep. A document
    longer than a sequence is cut into pieces; a mention crossing a cut is dropped, never half-kept."""
    room = max_len - 2
    out = {"input_ids": [], "word_start": [], "ent_start": [], "ent_end": [], "ent_id": []}
    cur = {"ids": [], "ws": [], "es": [], "ee": [], "ei": []}

    def flush():
        if cur["ids"]:
            out["input_ids"].append([cls] + cur["ids"] + [sep])
            out["word_start"].append([0] + cur["ws"] + [0])
            out["ent_start"].append([s + 1 for s in cur["es"]])  # +1 for the leading [CLS]/<s>
            out["ent_end"].append([e + 1 for e in cur["ee"]])
            out["ent_id"].append(list(cur["ei"]))
            for v in cur.values():
                v.clear()

    for ids, ws, es, ee, ei in zip(batch["ids"], batch["ws"], batch["es"], batch["ee"], batch["ei"]):
        for lo in range(0, len(ids), room):
            hi = min(lo + room, len(ids))
            if len(cur["ids"]) + (hi - lo) > room:
                flush()
            base = len(cur["ids"])
            cur["ids"] += ids[lo:hi]
            cur["ws"] += ws[lo:hi]
            for s, e, i in zip(es, ee, ei):
                if lo <= s and e <= hi:
                    cur["es"].append(base + s - lo)
                    cur["ee"].append(base + e - lo)
                    cur["ei"].append(i)
    flush()
    return out


def store_key(stamps, kg, tok, seq_len, shard_blocks=SHARD_BLOCKS, alias_linker=True, titles=None):
    """What a store is prepared from: the corpus files' stamps, the KG's key, the tokenizer, the sequence
    length, the blocking, the linking flags and the source of the code that shapes it."""
    return cache_key([stamps, kg.key, tokenizer_key(tok), seq_len, PACK_BLOCK, shard_blocks, alias_linker,
                      None if titles is None else file_stamp(titles),
                      code_version(corpora.parse, corpora.link, corpora.strip_anchors, AliasLinker, char_to_token_spans,
                                   tokenize_docs, pack_docs, _prepare_block, _arrays, _write_shard, label_tables,
                                   label_token_counts, _tokenize_labels)])


def tokenizer_key(tok):
    """What identifies a tokenizer for a store: class, vocabulary and special tokens."""
    return cache_key([type(tok).__name__, sorted(tok.get_vocab().items()), tok.all_special_ids,
                      tok.cls_token_id, tok.sep_token_id])


_WORKER = {}  # what the prepare workers share (set before the pool forks): kg, linker, tokenizer, ...


def _prepare_block(job):
    """One block of documents -> its packed sequences as arrays, and its mention counts by source."""
    layout, units = job
    w = _WORKER
    docs = [corpora.parse(layout, ref, raw, w["kg"], w["linker"], w["titles"]) for ref, raw in units]
    sources = {}
    for d in docs:
        for e in d["entities"]:
            sources[e["source"]] = sources.get(e["source"], 0) + 1
    toks = tokenize_docs({"text": [d["text"] for d in docs], "entities": [d["entities"] for d in docs]},
                         w["tok"], w["kg"].entity_index)
    packed = pack_docs(toks, w["tok"].cls_token_id, w["tok"].sep_token_id, w["seq_len"])
    kept = sum(len(x) for x in packed["ent_id"])
    return _arrays(packed, w["token_dtype"]), sources, kept


def _arrays(packed, token_dtype):
    """pack_docs lists -> flat arrays in the store's dtypes."""
    lens = [len(x) for x in packed["input_ids"]]
    counts = [len(x) for x in packed["ent_id"]]
    flat = lambda k, dt: np.fromiter((v for x in packed[k] for v in x), dt, sum(lens if k in ("input_ids", "word_start")
                                                                                  else counts))
    return {"tokens": flat("input_ids", token_dtype), "word_start": flat("word_start", bool),
            "lens": np.asarray(lens, np.int64), "counts": np.asarray(counts, np.int64),
            "ent_start": flat("ent_start", np.uint16), "ent_end": flat("ent_end", np.uint16),
            "ent_id": flat("ent_id", np.int32)}


def _write_shard(out, index, blocks):
    """The blocks of one shard -> out/shard-NNNNN/ (written in a temp dir, then renamed)."""
    cat = lambda k: np.concatenate([b[k] for b in blocks])
    final = os.path.join(out, f"shard-{index:05d}")
    tmp = os.path.join(out, f".shard-{index:05d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lens, counts = cat("lens"), cat("counts")
    if lens.sum() >= 1 << 31:
        raise DataError(f"shard {index}: {lens.sum()} tokens do not fit int32 offsets; prepare with a smaller --shard-docs")
    arrays = {"tokens": cat("tokens"), "seq": np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
              "word_start": np.packbits(cat("word_start")), "ment": np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
              "ent_start": cat("ent_start"), "ent_end": cat("ent_end"), "ent_id": cat("ent_id")}
    for k, v in arrays.items():
        np.save(os.path.join(tmp, k + ".npy"), v)
    os.rename(tmp, final)
    return {"sequences": len(lens), "tokens": int(lens.sum()), "mentions": int(counts.sum())}


def prepare(corpus_path, kg_dir, tok, seq_len, out, num_proc=None, titles=None, alias_linker=True,
            shard_blocks=SHARD_BLOCKS, kg_cache=None, quiet=False):
    """Link, tokenize and pack a corpus (any layout of corpus.py) into a store at `out` (module
    docstring); shards already written are kept (a killed prepare resumes). -> the store.json record."""
    t0 = time.time()
    layout, files = corpora.detect(corpus_path)
    kg = load_kg(kg_dir, kg_cache)
    t_kg = time.time()
    stamps = [file_stamp(f) for f in files]
    key = store_key(stamps, kg, tok, seq_len, shard_blocks, alias_linker, titles)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "store.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("key") == key:
            return meta
        raise DataError(f"--out {out}: holds a store prepared from other inputs (corpus, KG, tokenizer, --seq-len or "
                        f"code); choose another --out or delete it")
    marker = os.path.join(out, "inputs.json")  # a partial store: its shards must come from these inputs
    if os.path.exists(marker) and json.load(open(marker)).get("key") != key and \
            any(n.startswith("shard-") for n in os.listdir(out)):
        raise DataError(f"--out {out}: holds part of a store prepared from other inputs; delete it or choose another --out")
    with open(marker, "w") as f:
        json.dump({"key": key}, f)
    vocab = len(tok)
    _WORKER.update(kg=kg, tok=tok, seq_len=seq_len, token_dtype=np.uint16 if vocab <= 1 << 16 else np.uint32,
                   titles=corpora.read_titles(titles) if titles else None,
                   linker=AliasLinker(kg) if alias_linker else _NoLinker())
    t_linker = time.time()
    shards, sources, kept = [], {}, 0
    done = lambda i: os.path.isdir(os.path.join(out, f"shard-{i:05d}"))

    def jobs():  # blocks of shards still to write, in order; the others are read past
        block = []
        for n, unit in enumerate(corpora.units(layout, files)):
            block.append(unit)
            if len(block) == PACK_BLOCK:
                if not done(n // PACK_BLOCK // shard_blocks):
                    yield layout, block
                block = []
        if block and not done(n // PACK_BLOCK // shard_blocks):
            yield layout, block
    pool = None
    if num_proc and num_proc > 1:
        import multiprocessing
        gc.freeze()  # the linker's objects stay shared with the forked workers (no GC writes to their pages)
        pool = multiprocessing.get_context("fork").Pool(num_proc)
    try:
        results = pool.imap(_prepare_block, jobs()) if pool else map(_prepare_block, jobs())
        shard, n_blocks, index = [], 0, 0
        while done(index):
            index += 1
        for arrays, src, k in results:
            shard.append(arrays)
            for s, c in src.items():
                sources[s] = sources.get(s, 0) + c
            kept += k
            if len(shard) == shard_blocks:
                _write_shard(out, index, shard)
                shard, index = [], index + 1
                while done(index):
                    index += 1
            n_blocks += 1
        if shard:
            _write_shard(out, index, shard)
    finally:
        if pool:
            pool.close()
            pool.join()
        _WORKER.clear()
        gc.unfreeze()
    t_shards = time.time()
    for k, v in label_tables(kg, tok).items():  # (E,) or (V,): small beside the shards
        np.save(os.path.join(out, k + ".npy"), v)
    names = sorted(n for n in os.listdir(out) if n.startswith("shard-"))
    for n in names:
        s = Store.shard_counts(os.path.join(out, n))
        shards.append(dict(name=n, **s))
    tokens = sum(s["tokens"] for s in shards)
    if tokens == 0:
        raise DataError(f"{corpus_path}: no sequences after tokenization (empty texts?)")
    disk = sum(os.path.getsize(os.path.join(out, n, f)) for n in names for f in os.listdir(os.path.join(out, n)))
    meta = {"format": FORMAT, "key": key, "layout": layout, "corpus": stamps, "kg_dir": os.path.abspath(kg_dir),
            "kg_key": kg.key, "tokenizer": tokenizer_key(tok), "vocab_size": vocab, "seq_len": seq_len,
            "token_dtype": np.dtype(_token_dtype(vocab)).name, "shards": shards,
            "sequences": sum(s["sequences"] for s in shards), "tokens": tokens,
            "mentions": sum(s["mentions"] for s in shards), "bytes_per_token": round(disk / tokens, 4),
            "disk_bytes": disk}
    if sources:  # this run's documents only (a resumed prepare counts the shards it wrote)
        meta["mention_sources_linked"] = sources
        meta["mentions_kept_in_sequences"] = kept
    meta["seconds"] = dict(total=round(time.time() - t0, 1), kg=round(t_kg - t0, 1), linker=round(t_linker - t_kg, 1),
                           shards=round(t_shards - t_linker, 1), labels=round(time.time() - t_shards, 1))
    # per KG: kg (a parse, then cached), linker, labels; per token: shards
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    os.remove(marker)
    if not quiet:
        print(census_line(meta), flush=True)
    return meta


def _token_dtype(vocab):
    return np.uint16 if vocab <= 1 << 16 else np.uint32


class _NoLinker:
    """--no-alias-linker: mentions come from the corpus's own spans and anchors only."""
    min_len = 3

    def link(self, text):
        return []


def label_tables(kg, tok):
    """Every entity label tokenized once (as a mid-sentence word, no special tokens), for the knowledge side
    of every run on the store: Q's token counts over the whole labels (Eq. 2, cka.label_token_counts) and
    the labels cut at h_e's MAX_LABEL_TOKENS (entity_importance.KnowledgeInjector). At Wikidata5M's 4.8M
    labels this is minutes of tokenizer time a rank would otherwise spend before its first step."""
    tokens, lens = _tokenize_labels(tok, kg.entity_labels[:], MAX_LABEL_TOKENS)
    return {"q_counts": label_token_counts(kg, tok, len(tok)), "label_tokens": tokens.numpy(), "label_lens": lens.numpy()}


def census_line(meta):
    src = meta.get("mention_sources_linked", {})
    by = ", ".join(f"{k} {v:,}" for k, v in sorted(src.items()))
    return (f"prepared {meta['layout']} corpus: {meta['sequences']:,} sequences of <= {meta['seq_len']} tokens, "
            f"{meta['tokens']:,} tokens, {meta['mentions']:,} mentions in sequences" + (f" (linked: {by})" if by else "")
            + f", {len(meta['shards'])} shard(s), {meta['bytes_per_token']:.2f} bytes per token on disk")


# -----------------------------------------------------------------------------
# The prepared store (read by every rank, memory-mapped)

class Store:
    """A prepared store (module docstring), its shards memory-mapped and read as one sequence list.

    len(store), store.rows(idx) -> [{"input_ids", "word_start", "ent_start", "ent_end", "ent_id"}] (numpy);
    store.flat(name) a column over every sequence in order; store.mention_index(idx) the positions of
    the sequences' mentions in that order (a per-mention array such as SI is indexed by them)."""

    COLUMNS = ("tokens", "seq", "word_start", "ment", "ent_start", "ent_end", "ent_id")

    def __init__(self, path):
        meta_path = os.path.join(path, "store.json")
        if not os.path.exists(meta_path):
            raise DataError(f"--data {path}: not a prepared store (no store.json; a prepare that did not finish? "
                            f"run `python data.py prepare ... --out {path}` again)")
        self.path, self.meta = path, json.load(open(meta_path))
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: store format {self.meta.get('format')}, this code reads {FORMAT}; prepare again")
        self.shards = [{k: np.load(os.path.join(path, s["name"], k + ".npy"), mmap_mode="r") for k in self.COLUMNS}
                       for s in self.meta["shards"]]
        self.seq0 = np.cumsum([0] + [len(s["seq"]) - 1 for s in self.shards])  # (S + 1,) first sequence of each shard
        self.ment0 = np.cumsum([0] + [len(s["ent_id"]) for s in self.shards])  # (S + 1,) first mention of each shard

    @staticmethod
    def shard_counts(shard_dir):
        seq = np.load(os.path.join(shard_dir, "seq.npy"), mmap_mode="r")
        return {"sequences": len(seq) - 1, "tokens": int(seq[-1]),
                "mentions": len(np.load(os.path.join(shard_dir, "ent_id.npy"), mmap_mode="r"))}

    def __len__(self):
        return int(self.seq0[-1])

    def locate(self, i):
        """Global sequence index -> (shard, local index)."""
        s = int(np.searchsorted(self.seq0, i, side="right")) - 1
        return s, i - int(self.seq0[s])

    def rows(self, idx):
        out = []
        for i in idx:
            s, j = self.locate(int(i))
            sh = self.shards[s]
            a, b = int(sh["seq"][j]), int(sh["seq"][j + 1])
            m0, m1 = int(sh["ment"][j]), int(sh["ment"][j + 1])
            bits = np.unpackbits(sh["word_start"][a // 8:(b + 7) // 8])[a % 8:a % 8 + b - a].astype(bool)
            out.append({"input_ids": np.asarray(sh["tokens"][a:b], np.int64), "word_start": bits,
                        "ent_start": np.asarray(sh["ent_start"][m0:m1], np.int64),
                        "ent_end": np.asarray(sh["ent_end"][m0:m1], np.int64),
                        "ent_id": np.asarray(sh["ent_id"][m0:m1], np.int64)})
        return out

    def mention_index(self, idx):
        """(M,) positions, in the order of store.flat("ent_id"), of the mentions of sequences idx."""
        parts = []
        for i in idx:
            s, j = self.locate(int(i))
            sh = self.shards[s]
            parts.append(np.arange(int(sh["ment"][j]), int(sh["ment"][j + 1])) + int(self.ment0[s]))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def flat(self, name, dtype=np.int64):
        """(M,) ent_start / ent_end / ent_id over every mention, or (T,) tokens over every token, in order."""
        return np.concatenate([np.asarray(s[name], dtype) for s in self.shards])

    def labels(self):
        """(tokens (E, L) int32, lens (E,)) of every entity label (label_tables), memory-mapped."""
        return tuple(np.load(os.path.join(self.path, k + ".npy"), mmap_mode="r") for k in ("label_tokens", "label_lens"))

    def q_counts(self):
        """(V,) int64 token counts over the entity labels: Q of Eq. 2 (label_tables)."""
        return np.load(os.path.join(self.path, "q_counts.npy"))

    def check_tokenizer(self, tok, flag="--model"):
        if tokenizer_key(tok) != self.meta["tokenizer"]:
            raise DataError(f"--data {self.path}: prepared with another tokenizer than {flag}'s (store.json "
                            f"'tokenizer' {self.meta['tokenizer']}); prepare it again with this --model")


def mention_counts(store, num_entities):
    """Entity frequency (Sec. 3.1): (E,) int64 linked mentions per entity over the store."""
    ids = store.flat("ent_id")
    if ids.size and (ids.min() < 0 or ids.max() >= num_entities):
        raise DataError(f"store ent_id out of range [0, {num_entities}): found [{ids.min()}, {ids.max()}] "
                        "(a store prepared with another KG?)")
    return np.bincount(ids, minlength=num_entities).astype(np.int64)


def plain_tokens(tokenizer):
    """(V,) bool over the vocabulary: tokens that may be a word, i.e. not special and with a letter
    or digit once the subword markers (WordPiece "##", byte-level BPE "\u0120", SentencePiece
    "\u2581") are stripped; punctuation-only tokens are not plain."""
    import torch
    special = set(tokenizer.all_special_ids)
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i not in special and any(ch.isalnum() for ch in (n or "").lstrip("#\u0120\u2581"))
                         for i, n in enumerate(names)], dtype=torch.bool)


def whole_words(ids, word_start, plain):
    """(B,T) bool: tokens that are a whole word by themselves (the long-tail word candidates of
    Sec. 3.4): a plain token (plain (V,), plain_tokens) that starts a word (word_start, or a non-plain
    token before it, e.g. "(") and is not continued (the next token starts a word or is not plain,
    e.g. "," or [SEP]). A word split into several pieces is not a candidate. ids, word_start (B,T)."""
    import torch
    p = plain[ids]  # (B,T)
    cut = word_start | ~p  # (B,T) a word boundary lies before this token
    start = torch.ones_like(p)
    start[:, 1:] = word_start[:, 1:] | ~p[:, :-1]
    end = torch.ones_like(p)
    end[:, :-1] = cut[:, 1:]
    return p & start & end


def span_mask(ent_batch, ent_start, ent_end, shape):
    """(B,T) bool: positions inside any mention span [start, end) of row ent_batch (spans may
    overlap). ent_batch, ent_start, ent_end (M,) int64; shape = (B, T)."""
    import torch
    b, t = shape
    edge = torch.zeros(b, t + 1, dtype=torch.int64, device=ent_start.device)  # +1 at a start, -1 at an end
    edge.index_put_((ent_batch, ent_start), torch.ones_like(ent_start), accumulate=True)
    edge.index_put_((ent_batch, ent_end), -torch.ones_like(ent_end), accumulate=True)
    return edge.cumsum(dim=1)[:, :t] > 0

def word_counts(store, plain):
    """Long-tail word frequency (Sec. 3.4): (V,) int64 occurrences of each token id as a whole word
    (whole_words) outside every linked mention span, over the store, one vectorised pass per shard."""
    import torch
    counts = np.zeros(len(plain), dtype=np.int64)
    for sh in store.shards:
        ids = np.asarray(sh["tokens"], np.int64)  # (T,) every sequence end to end
        ws = np.unpackbits(np.asarray(sh["word_start"]))[:ids.size].astype(bool)
        row0 = np.repeat(np.asarray(sh["seq"][:-1], np.int64), np.diff(np.asarray(sh["ment"])))  # (M,)
        start = torch.from_numpy(np.asarray(sh["ent_start"], np.int64) + row0)
        end = torch.from_numpy(np.asarray(sh["ent_end"], np.int64) + row0)
        in_span = span_mask(torch.zeros_like(start), start, end, (1, ids.size))  # (1,T)
        # sequences start with [CLS] and end with [SEP], so a sequence's neighbours never leak into the next
        word = whole_words(torch.from_numpy(ids)[None], torch.from_numpy(ws)[None], plain) & ~in_span  # (1,T)
        counts += np.bincount(ids[word[0].numpy()], minlength=len(plain))
    return counts


# -----------------------------------------------------------------------------
# --data: a prepared store, or raw data prepared on first use into the cache

def open_data(data, tok, seq_len, cache_dir=None, num_proc=None):
    """--data mini | DIR (kg/ + corpus.jsonl or corpus.txt) | a prepared store -> (Store, kg_dir). Raw data
    is prepared on first use under <cache root>/prepared/<its key>/, under a file lock: a process that
    finds another preparing it waits on the lock (no collective), then reads the store."""
    root = cache_root(cache_dir)
    if data != "mini" and os.path.exists(os.path.join(data, "store.json")):
        store = Store(data)
        if store.meta["seq_len"] != seq_len:
            raise DataError(f"--data {data}: prepared with --seq-len {store.meta['seq_len']}, not {seq_len}")
        if not os.path.isdir(store.meta["kg_dir"]):
            raise DataError(f"--data {data}: its KG {store.meta['kg_dir']} (store.json 'kg_dir') is not there")
        store.check_tokenizer(tok)
        return store, store.meta["kg_dir"]
    kg_dir, corpus_path = resolve_data(data, root)
    kg_cache = os.path.join(root, "kg")
    layout, files = corpora.detect(corpus_path)
    key = store_key([file_stamp(f) for f in files], load_kg(kg_dir, kg_cache), tok, seq_len)
    out = os.path.join(root, "prepared", f"{os.path.basename(os.path.dirname(corpus_path))}-{key}")
    if not os.path.exists(os.path.join(out, "store.json")):
        writable_dir(os.path.dirname(out), "--cache-dir")
        with open(out + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            prepare(corpus_path, kg_dir, tok, seq_len, out, num_proc=num_proc, kg_cache=kg_cache, quiet=True)
    return Store(out), kg_dir


def resolve_data(data, root=None):
    """--data mini | DIR -> (kg_dir, corpus_path). mini is built once under the cache root and reused."""
    if data == "mini":
        d = mini_dir(cache_root(root))
    else:
        d = data
        if not os.path.isdir(d):
            raise DataError(f"--data {data}: not a directory (expected 'mini', a prepared store, or a DIR with kg/ "
                            f"and corpus.jsonl)")
    for name in ("corpus.jsonl", "corpus.txt"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, "kg"), os.path.join(d, name)
    raise DataError(f"--data {data}: {d} has no store.json (a prepared store), corpus.jsonl or corpus.txt")


# -----------------------------------------------------------------------------
# Step-indexed data order: the position in the data is a function of the step alone, which makes
# resume exact and gives each rank its own shard of every global batch.

def global_batch_indices(step, n, global_batch, seed):
    """Dataset indices of global batch `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, off = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[off:off + global_batch - len(out)].tolist())
    return out


def micro_batch_indices(step, micro, rank, n, micro_batch, accum, world, seed):
    """Indices of micro-step `micro` of rank `rank` at optimizer step `step`."""
    g = global_batch_indices(step, n, micro_batch * accum * world, seed)
    k = (micro * world + rank) * micro_batch
    return g[k:k + micro_batch]


class MLMCollator:
    """Pad examples into a batch and apply dynamic MLM masking (BERT's 80/10/10 rule).

    mlm_prob of the real tokens are chosen (whole words if whole_word); of those 80% become the
    mask token, 10% a random token, 10% stay. Special tokens are never chosen. Randomness comes
    from the torch.Generator passed in, so a batch is a function of (seed, step, rank, micro).
    """

    def __init__(self, tokenizer, mlm_prob=0.15, whole_word=False):
        import torch  # here, not at the top: the KG parser child (python data.py --parse-kg) needs numpy only
        self.tok = tokenizer
        self.mlm_prob = mlm_prob
        self.whole_word = whole_word
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, examples, generator):
        import torch
        B, T = len(examples), max(len(e["input_ids"]) for e in examples)
        ids = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        ws = torch.zeros((B, T), dtype=torch.bool)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[b, :n] = torch.as_tensor(e["input_ids"])
            attn[b, :n] = 1
            ws[b, :n] = torch.as_tensor(e["word_start"], dtype=torch.bool)
        ment = lambda k: torch.as_tensor(np.concatenate([np.asarray(e[k], np.int64) for e in examples]))  # (M,)
        labels = ids.clone()
        candidates = attn.bool() & ~torch.isin(ids, self.special)  # (B, T)
        if self.whole_word:
            # draw per word, spread to its continuation tokens
            word = torch.cumsum((ws | ~candidates).long(), dim=1)  # (B, T) word number per token
            p = torch.rand((B, T), generator=generator)
            first = torch.where(ws & candidates, p, torch.full_like(p, 2.0))
            word_p = torch.full((B, T + 1), 2.0).scatter_reduce(1, word, first, "amin")
            chosen = candidates & (word_p.gather(1, word) < self.mlm_prob)
        else:
            chosen = candidates & (torch.rand((B, T), generator=generator) < self.mlm_prob)
        labels[~chosen] = -100
        r = torch.rand((B, T), generator=generator)
        ids[chosen & (r < 0.8)] = self.tok.mask_token_id
        rand_pos = chosen & (r >= 0.8) & (r < 0.9)
        ids[rand_pos] = torch.randint(len(self.tok), (int(rand_pos.sum()),), generator=generator)
        counts = torch.tensor([len(e["ent_id"]) for e in examples])
        return dict(input_ids=ids, attention_mask=attn, mlm_labels=labels, orig_ids=labels.where(chosen, ids),
                    word_start=ws, ent_batch=torch.repeat_interleave(torch.arange(B), counts), ent_start=ment("ent_start"),
                    ent_end=ment("ent_end"), ent_id=ment("ent_id"))


def get_parser():
    p = argparse.ArgumentParser(prog="data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="link, tokenize and pack a corpus into a store (once, before training)")
    a.add_argument("--corpus", required=True, help="a corpus in any layout of corpus.py (file or folder)")
    a.add_argument("--kg", required=True, help="KG folder in Wikidata5M's layout (kg.py)")
    a.add_argument("--model", default="minilm", help="the model whose tokenizer packs the store (pretrain.py --model)")
    a.add_argument("--seq-len", type=int, default=128, help="sequence length (pretrain.py --seq-len)")
    a.add_argument("--out", required=True, help="the store's folder (pretrain.py --data)")
    a.add_argument("--num-proc", type=int, default=1, help="worker processes (each links, tokenizes and packs blocks)")
    a.add_argument("--titles", default=None, help="'Title<TAB>Q-id' lines: Wikipedia anchors and page titles -> Wikidata")
    a.add_argument("--no-alias-linker", action="store_true", help="mentions from given spans and anchors only")
    a.add_argument("--shard-docs", type=int, default=PACK_BLOCK * SHARD_BLOCKS,
                   help=f"documents per shard (a multiple of {PACK_BLOCK}): the unit written atomically and resumed")
    a.add_argument("--cache-dir", default=None, help="where the parsed KG is cached (default: $TRELM_CACHE or data_cache/)")
    return p


def main(argv=None):
    """`python data.py prepare ...` (the module docstring); bad input ends in one line."""
    args = get_parser().parse_args(argv)
    if not 8 <= args.seq_len <= 4096:
        raise SystemExit(f"data.py: --seq-len: expected 8..4096, got {args.seq_len}")
    if args.num_proc < 1:
        raise SystemExit(f"data.py: --num-proc: expected a positive integer, got {args.num_proc}")
    if args.shard_docs < PACK_BLOCK or args.shard_docs % PACK_BLOCK:
        raise SystemExit(f"data.py: --shard-docs: expected a positive multiple of {PACK_BLOCK}, got {args.shard_docs}")
    if args.titles and not os.path.isfile(args.titles):
        raise SystemExit(f"data.py: --titles {args.titles}: no such file")
    from common import load_tokenizer
    tok = load_tokenizer(args.model)
    try:
        prepare(args.corpus, args.kg, tok, args.seq_len, args.out, args.num_proc, args.titles,
                not args.no_alias_linker, args.shard_docs // PACK_BLOCK,
                kg_cache=os.path.join(cache_root(args.cache_dir), "kg"))
    except DataError as e:
        raise SystemExit(f"data.py: {e}") from None


if __name__ == "__main__":
    main()
