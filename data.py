"""Pre-training data (TRELM Sec. 4.1): knowledge graph, corpus, entity linking, tokenization,
span mapping, the step-indexed data order and the MLM collator.

Inputs (a --data DIR holds both):
  KG in Wikidata5M's layout, DIR/kg/:
    entities.txt   QID<TAB>alias<TAB>alias...    (Wikidata5M: wikidata5m_entity.txt)
    relations.txt  PID<TAB>alias<TAB>alias...    (wikidata5m_relation.txt)
    triples.txt    head<TAB>relation<TAB>tail    (wikidata5m_transductive_train.txt)
  Corpus, DIR/corpus.jsonl: {"text": str, "entities": [{"id": QID, "start": int, "end": int}]}
    with character offsets [start, end); a line without "entities" is linked by AliasLinker.
    DIR/corpus.txt (one document per line) is linked the same way.
`--data mini` builds the embedded default from real facts and text that pip packages ship
(data_mini.py), cached under the output directory.

Preprocessing goes through `datasets` (Arrow files, memory-mapped, cached by fingerprint, num_proc)
so the same code serves the embedded default and a 26M-sequence Wikipedia corpus.

A training batch (see MLMCollator) is a dict of tensors:
    input_ids (B,T), attention_mask (B,T), mlm_labels (B,T) (-100 = not predicted),
    ent_batch (M,), ent_start (M,), ent_end (M,)  token span [start, end) of mention m in row ent_batch[m]
    ent_id (M,)                                    KG entity index of mention m
Only mentions lying entirely inside a sequence are kept; one cut by truncation is dropped.
"""
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

KG_FILES = {  # our names, then Wikidata5M's own
    "entities": ("entities.txt", "wikidata5m_entity.txt"),
    "relations": ("relations.txt", "wikidata5m_relation.txt"),
    "triples": ("triples.txt", "wikidata5m_transductive_train.txt", "wikidata5m_all_triplet.txt"),
}


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what was expected."""


# -----------------------------------------------------------------------------
# Knowledge graph

@dataclass
class KG:
    entity_ids: list            # QIDs, index = entity index
    entity_aliases: list        # list[list[str]]; entity_aliases[i][0] is the label
    relation_ids: list
    relation_aliases: list
    triples: np.ndarray         # (N, 3) int32: head, relation, tail indices
    entity_index: dict = field(default_factory=dict)
    relation_index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.entity_index = {q: i for i, q in enumerate(self.entity_ids)}
        self.relation_index = {p: i for i, p in enumerate(self.relation_ids)}

    @property
    def entity_labels(self):
        return [a[0] for a in self.entity_aliases]

    @property
    def relation_labels(self):
        return [a[0] for a in self.relation_aliases]

    @property
    def num_entities(self):
        return len(self.entity_ids)


def _find_kg_file(kg_dir, kind):
    for name in KG_FILES[kind]:
        path = os.path.join(kg_dir, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{kg_dir}: no {kind} file; expected one of {', '.join(KG_FILES[kind])} "
                    f"(Wikidata5M layout: https://deepgraphlearning.github.io/project/wikidata5m)")


def _tsv_rows(path):
    """Yield (line number, tab-separated columns) of the non-blank lines of a file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line:
                yield n, line.split("\t")


def _read_aliases(path):
    ids, aliases, seen = [], [], {}
    for n, cols in _tsv_rows(path):
        if len(cols) < 2 or not cols[0] or not all(cols[1:]):
            shown = "\t".join(cols)[:80]
            raise DataError(f"{path}:{n}: expected 'ID<TAB>alias[<TAB>alias...]' with non-empty "
                            f"fields, found {len(cols)} column(s): {shown!r}")
        if cols[0] in seen:
            raise DataError(f"{path}:{n}: duplicate id {cols[0]!r} (first on line {seen[cols[0]]})")
        seen[cols[0]] = n
        ids.append(cols[0])
        aliases.append(cols[1:])
    if not ids:
        raise DataError(f"{path}: empty; expected at least one 'ID<TAB>alias' line")
    return ids, aliases


def load_kg(kg_dir):
    """Read a KG in Wikidata5M's layout into compact arrays (ids int32, never Python objects per triple)."""
    ent_ids, ent_alias = _read_aliases(_find_kg_file(kg_dir, "entities"))
    rel_ids, rel_alias = _read_aliases(_find_kg_file(kg_dir, "relations"))
    kg = KG(ent_ids, ent_alias, rel_ids, rel_alias, np.zeros((0, 3), np.int32))
    path = _find_kg_file(kg_dir, "triples")
    rows = []
    for n, cols in _tsv_rows(path):
        if len(cols) != 3:
            shown = "\t".join(cols)[:80]
            raise DataError(f"{path}:{n}: expected 3 tab-separated columns 'head<TAB>relation<TAB>tail', "
                            f"found {len(cols)}: {shown!r}")
        h, r, t = cols
        if r not in kg.relation_index:
            raise DataError(f"{path}:{n}: unknown relation {r!r} (not in the relations file)")
        # Wikidata5M's triples mention entities without aliases; those triples are unusable here
        if h in kg.entity_index and t in kg.entity_index:
            rows.append((kg.entity_index[h], kg.relation_index[r], kg.entity_index[t]))
    kg.triples = np.asarray(rows, dtype=np.int32).reshape(-1, 3)
    return kg


# -----------------------------------------------------------------------------
# Entity linking

class AliasLinker:
    """Longest-match alias linker.

    Rules: matching is case-sensitive ("Paris" links, "paris" does not: KG labels carry their
    case, and lowercase matches of names are mostly common words); an alias matches only at word
    boundaries (it starts at a word and no letter or digit follows it); aliases shorter than
    `min_len` characters are ignored (they link noise: "a", "US"). Scanning left to right, the
    longest alias starting at a position wins and matches do not overlap. Aliases shared by several
    entities go to the entity listed first in the KG (a documented, deterministic choice).
    """

    _word = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def __init__(self, kg, min_len=3):
        self.by_first = {}  # first word -> [(alias, entity index)] longest first
        for e, aliases in enumerate(kg.entity_aliases):
            for a in aliases:
                if len(a) < min_len:
                    continue
                first = self._word.match(a)  # the same tokens link() scans ("Port-au-Prince" -> "Port")
                if first is not None:
                    self.by_first.setdefault(first.group(), {}).setdefault(a, e)
        self.by_first = {w: sorted(d.items(), key=lambda x: -len(x[0])) for w, d in self.by_first.items()}
        self.kg = kg

    def link(self, text):
        """-> [{"id": QID, "start", "end"}] non-overlapping, sorted by start."""
        out, pos = [], 0
        for m in self._word.finditer(text):
            if m.start() < pos:
                continue
            for alias, e in self.by_first.get(m.group(), ()):
                end = m.start() + len(alias)
                if text.startswith(alias, m.start()) and (end == len(text) or not text[end].isalnum()):
                    out.append({"id": self.kg.entity_ids[e], "start": m.start(), "end": end})
                    pos = end
                    break
        return out


# -----------------------------------------------------------------------------
# Corpus

def utf8_lines(f, path):
    """The lines of text file f (opened as UTF-8); bytes that are not UTF-8 raise a DataError naming
    the line (found by re-reading the file as bytes: text-mode decoding works in chunks)."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        with open(path, "rb") as raw:
            for n, line in enumerate(raw, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise DataError(f"{path}:{n}: not UTF-8 (byte 0x{line[bad.start]:02x} at column {bad.start + 1}); "
                                    "expected UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8)") from e
        raise DataError(f"{path}: not UTF-8 ({e.reason}); expected UTF-8 text") from e


def read_corpus(path, kg, linker=None):
    """Validate and yield records {"text", "entities": [{"id", "start", "end"}]} from JSONL or TXT.
    Unlinked lines are linked with `linker` (an AliasLinker over `kg`)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: corpus file not found (expected JSONL or one document per line)")
    jsonl = path.endswith(".jsonl")
    n_docs = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(utf8_lines(f, path), 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); expected "
                                    '{"text": ..., "entities": [{"id","start","end"}]}') from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f'{path}:{n}: expected an object with a string "text" field')
            else:
                rec = {"text": line.rstrip("\n")}
            text = rec["text"]
            if "entities" in rec:
                ents = rec["entities"]
                for e in ents:
                    if not isinstance(e, dict) or not {"id", "start", "end"} <= set(e):
                        raise DataError(f'{path}:{n}: each entity needs "id", "start", "end"; found {e!r}')
                    if e["id"] not in kg.entity_index:
                        raise DataError(f"{path}:{n}: unknown entity {e['id']!r} (not in the KG entities file)")
                    if not (isinstance(e["start"], int) and isinstance(e["end"], int)
                            and 0 <= e["start"] < e["end"] <= len(text)):
                        raise DataError(f"{path}:{n}: entity span [{e['start']}, {e['end']}) is outside "
                                        f"the text of length {len(text)}")
            elif linker is not None:
                ents = linker.link(text)
            else:
                ents = []
            n_docs += 1
            yield {"text": text, "entities": [{"id": e["id"], "start": e["start"], "end": e["end"]} for e in ents]}
    if n_docs == 0:
        raise DataError(f"{path}: empty corpus (no non-blank lines)")


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


def tokenize_and_pack(batch, tokenizer, entity_index, max_len):
    """datasets.map function (batched): tokenize, map spans, pack whole documents greedily into
    sequences of at most max_len tokens with the model's special tokens. A document longer than a
    sequence is cut into pieces; a mention crossing a cut is dropped, never half-kept."""
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
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

    for ids, offs, text, ents in zip(enc["input_ids"], enc["offset_mapping"], batch["text"], batch["entities"]):
        if not ids:
            continue
        # a token starts a word if whitespace (or the text start) precedes it
        ws = [1 if (s == 0 or text[s - 1].isspace()) else 0 for s, _ in offs]
        spans = char_to_token_spans(offs, ents)
        for lo in range(0, len(ids), room):
            hi = min(lo + room, len(ids))
            if len(cur["ids"]) + (hi - lo) > room:
                flush()
            base = len(cur["ids"])
            cur["ids"] += ids[lo:hi]
            cur["ws"] += ws[lo:hi]
            for s, e, i in spans:
                if lo <= s and e <= hi:
                    cur["es"].append(base + s - lo)
                    cur["ee"].append(base + e - lo)
                    cur["ei"].append(entity_index[ents[i]["id"]])
    flush()
    return out


def build_dataset(corpus_path, kg, tokenizer, max_len, cache_dir, num_proc=None):
    """Linked, tokenized, packed Arrow dataset, cached by fingerprint under cache_dir."""
    import datasets
    datasets.disable_progress_bars()
    linker = AliasLinker(kg)
    raw_path = os.path.join(cache_dir, "linked_" + os.path.basename(corpus_path).rsplit(".", 1)[0] + ".jsonl")
    if not os.path.exists(raw_path) or os.path.getmtime(raw_path) < os.path.getmtime(corpus_path):
        from common import atomic_write

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in read_corpus(corpus_path, kg, linker):
                    f.write(json.dumps(rec) + "\n")
        atomic_write(raw_path, write)
    features = datasets.Features({"text": datasets.Value("string"), "entities": datasets.List(
        {"id": datasets.Value("string"), "start": datasets.Value("int64"), "end": datasets.Value("int64")})})
    ds = datasets.load_dataset("json", data_files=raw_path, split="train", features=features,
                               cache_dir=os.path.join(cache_dir, "hf"))
    ds = ds.map(tokenize_and_pack, batched=True, batch_size=1000, remove_columns=ds.column_names,
                fn_kwargs=dict(tokenizer=tokenizer, entity_index=kg.entity_index, max_len=max_len),
                num_proc=num_proc, desc="tokenize+pack")
    if len(ds) == 0:
        raise DataError(f"{corpus_path}: no sequences after tokenization (empty texts?)")
    return ds


MINI_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")  # where --data mini is built


def resolve_data(data, mini_root=MINI_ROOT):
    """--data mini | DIR -> (kg_dir, corpus_path). mini is built once under mini_root and reused."""
    if data == "mini":
        from data_mini import mini_dir
        d = mini_dir(mini_root)
    else:
        d = data
        if not os.path.isdir(d):
            raise DataError(f"--data {data}: not a directory (expected 'mini' or a DIR with kg/ and corpus.jsonl)")
    for name in ("corpus.jsonl", "corpus.txt"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, "kg"), os.path.join(d, name)
    raise DataError(f"--data {data}: {d} has no corpus.jsonl or corpus.txt")


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
        self.tok = tokenizer
        self.mlm_prob = mlm_prob
        self.whole_word = whole_word
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, examples, generator):
        B, T = len(examples), max(len(e["input_ids"]) for e in examples)
        ids = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        ws = torch.zeros((B, T), dtype=torch.bool)
        eb, es, ee, ei = [], [], [], []
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            attn[b, :n] = 1
            ws[b, :n] = torch.tensor(e["word_start"], dtype=torch.bool)
            eb += [b] * len(e["ent_id"])
            es += e["ent_start"]
            ee += e["ent_end"]
            ei += e["ent_id"]
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
        t = lambda x: torch.tensor(x, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=attn, mlm_labels=labels, orig_ids=labels.where(chosen, ids),
                    ent_batch=t(eb), ent_start=t(es), ent_end=t(ee), ent_id=t(ei))
