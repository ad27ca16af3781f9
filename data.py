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

Scale (Wikidata5M: 3.09M entities, 21M triples; Wikipedia: 26M sequences):
- load_kg parses the KG once with a columnar numpy reader (4 MiB of lines at a time, no Python
  object per triple) in a child process, into .npy files under a cache keyed by the files' stamps
  and the parser's source; every later load (each rank, each run) memory-maps them. Ids are looked
  up by binary search over fixed-width bytes (IdIndex), aliases are one UTF-8 buffer + offsets.
- build_dataset goes through `datasets` (Arrow files, memory-mapped): linking, tokenization and
  packing run in one map over blocks of 1000 lines with num_proc workers; each cache is keyed by
  every input (corpus stamp, KG key, tokenizer hash, max_len) and the source of the code that
  shapes it.
- mention_counts (entity frequency) is one vectorised pass over the Arrow column.
Measured figures: docs/measurements.md, "Scale"; synthetic Wikidata5M-shaped data: synth_kg.py.

Decisions:
- A corpus line without given spans is linked by AliasLinker: the longest case-sensitive alias
  match at word boundaries.
- Documents are packed into --seq-len sequences within blocks of 1000 lines, so the sequences do
  not depend on --num-proc.
- The data order and the MLM masking are functions of (seed, step, rank, micro-batch): a resume
  needs no data state.

A training batch (see MLMCollator) is a dict of tensors:
    input_ids (B,T), attention_mask (B,T), mlm_labels (B,T) (-100 = not predicted),
    ent_batch (M,), ent_start (M,), ent_end (M,)  token span [start, end) of mention m in row ent_batch[m]
    ent_id (M,)                                    KG entity index of mention m
Only mentions lying entirely inside a sequence are kept; one cut by truncation is dropped.

Tests: python -m pytest -q tests/test_data.py
"""
import json
import os
import re

import numpy as np

from common import DataError
from data_mini import mini_dir

KG_FILES = {  # our names, then Wikidata5M's own
    "entities": ("entities.txt", "wikidata5m_entity.txt"),
    "relations": ("relations.txt", "wikidata5m_relation.txt"),
    "triples": ("triples.txt", "wikidata5m_transductive_train.txt", "wikidata5m_all_triplet.txt"),
}


# -----------------------------------------------------------------------------
# Knowledge graph: parsed once by a columnar numpy reader into flat arrays, cached under the cache
# dir as .npy files that every later load (every rank of every run) memory-maps.

class StrTable:
    """A read-only sequence of strings stored as one UTF-8 byte buffer and (start, end) offsets.
    table[i] decodes string i; no Python object per string is kept."""

    def __init__(self, buf, start, end):
        self.buf, self.start, self.end = buf, start, end  # (B,) uint8, (N,) int64, (N,) int64

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        return self.buf[self.start[i]:self.end[i]].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class AliasTable:
    """Aliases per entity: table[i] -> list of str, table[i][0] the label. Entity i's aliases are
    strings ptr[i]:ptr[i + 1] of one StrTable."""

    def __init__(self, strings, ptr):
        self.strings, self.ptr = strings, ptr  # StrTable over all aliases, (E + 1,) int64

    def __len__(self):
        return len(self.ptr) - 1

    def __getitem__(self, i):
        return [self.strings[a] for a in range(self.ptr[i], self.ptr[i + 1])]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class IdIndex:
    """ID -> index lookup by binary search over the ids sorted as fixed-width bytes (numpy 'S'),
    a Mapping-like stand-in for a {QID: index} dict with no Python object per id."""

    def __init__(self, ids, order):
        self.sorted = ids[order]  # (N,) S{w} ids in byte order
        self.order = order  # (N,) index of each sorted id

    def lookup(self, keys):
        """keys: (n,) array of bytes ids (any 'S' width) -> (n,) int64 index, -1 where unknown."""
        keys = np.asarray(keys)
        if not len(self.sorted) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        return np.where(self.sorted[pos] == keys, self.order[pos], -1).astype(np.int64)

    def get(self, key, default=None):
        k = key.encode("utf-8")
        if not k or k.endswith(b"\0") or len(k) > self.sorted.dtype.itemsize:
            return default
        i = int(self.lookup(np.array([k]))[0])
        return default if i < 0 else i

    def __getitem__(self, key):
        i = self.get(key)
        if i is None:
            raise KeyError(key)
        return i

    def __contains__(self, key):
        return self.get(key) is not None

    def __len__(self):
        return len(self.sorted)


class KG:
    """A knowledge graph in flat arrays (see load_kg). entity_ids / entity_labels are StrTables,
    entity_aliases an AliasTable, entity_index an IdIndex (QID -> index); relations (822 in
    Wikidata5M) are plain lists and a dict. triples: (N, 3) int32 head, relation, tail indices.
    `key` identifies the parsed content (input files and parser version) for downstream caches;
    a KG pickles as its cache directory (datasets.map workers re-open the memory maps)."""

    def __init__(self, path):
        self.path = path
        load = lambda name: np.load(os.path.join(path, name + ".npy"), mmap_mode="r")
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        self.key = meta["key"]
        ids = load("entity_ids")  # (E,) S{w}
        self.entity_ids = StrTable(ids.view(np.uint8), np.arange(len(ids)) * ids.itemsize,
                                   np.arange(len(ids)) * ids.itemsize + load("entity_id_len"))
        alias_off = load("alias_off")  # (A + 1,)
        self.entity_aliases = AliasTable(StrTable(load("alias_buf"), alias_off[:-1], alias_off[1:]), load("alias_ptr"))
        ptr = self.entity_aliases.ptr
        self.entity_labels = StrTable(self.entity_aliases.strings.buf, alias_off[ptr[:-1]], alias_off[ptr[:-1] + 1])
        self.entity_index = IdIndex(ids, load("entity_order"))
        self.relation_ids, self.relation_aliases = meta["relation_ids"], meta["relation_aliases"]
        self.relation_index = {p: i for i, p in enumerate(self.relation_ids)}
        self.relation_labels = [a[0] for a in self.relation_aliases]
        self.triples = load("triples")  # (N, 3) int32

    def __reduce__(self):
        return KG, (self.path,)

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


CHUNK_BYTES = 1 << 22  # the columnar reader parses 4 MiB of whole lines at a time


def _tsv_chunks(path):
    """Columnar TSV reader: yield, per chunk of whole lines, (a, fs, fe, fline, fcol, nfields):
    a (B,) uint8 bytes of the chunk; for every field of every non-blank line its byte range
    [fs, fe) in a, 1-based line number fline and column fcol; nfields (F,) the field count of the
    field's line. Lines end at \n; a line's fields are split at \t."""
    line0 = 0
    with open(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(CHUNK_BYTES)
            b = rest + block
            cut = b.rfind(b"\n") + 1 if block else len(b)
            b, rest = b[:cut], b[cut:]
            if not b:
                if not block:
                    return
                continue
            try:
                b.decode("utf-8")
            except UnicodeDecodeError as e:
                n, col = line0 + b.count(b"\n", 0, e.start) + 1, e.start - b.rfind(b"\n", 0, e.start) - 1
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {col} of the line)") from None
            a = np.frombuffer(b, np.uint8)
            nl = np.flatnonzero(a == 10)  # (L,) line ends
            if not len(nl) or nl[-1] != len(a) - 1:
                nl = np.append(nl, len(a))  # last line without a newline
            fe = np.sort(np.concatenate([np.flatnonzero(a == 9), nl]))  # (F,) field ends
            fs = np.concatenate([[0], fe[:-1] + 1])  # (F,) field starts
            lidx = np.searchsorted(nl, fe)  # (F,) chunk-local line of each field
            nf = np.bincount(lidx, minlength=len(nl))  # (L,) fields per line
            fcol = np.arange(len(fe)) - (np.cumsum(nf) - nf)[lidx]
            line_start = np.concatenate([[0], nl[:-1] + 1])
            keep = (nl - line_start)[lidx] > 0  # blank lines have no fields
            yield a, fs[keep], fe[keep], line0 + lidx[keep] + 1, fcol[keep], nf[lidx[keep]]
            line0 += len(nl) if b.endswith(b"\n") else len(nl) - 1


def _gather(a, fs, fe):
    """Concatenate the byte ranges [fs, fe) of a -> (buf (sum len,) uint8, len (n,) int64)."""
    n = fe - fs
    idx = np.arange(int(n.sum())) + np.repeat(fs - (np.cumsum(n) - n), n)
    return a[idx], n


def _fixed_width(buf, n, width):
    """Ragged byte strings (buf, lengths n) -> (len(n),) S{width} array, null-padded (longer ones cut)."""
    out = np.zeros((len(n), max(width, 1)), np.uint8)
    m = np.minimum(n, width)
    row = np.repeat(np.arange(len(n)), m)
    col = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
    out[row, col] = buf[np.repeat(np.cumsum(n) - n, m) + col]
    return out.view(f"S{max(width, 1)}").ravel()


def _line_text(a, fs, fe):
    return a[fs:fe].tobytes().decode("utf-8", "replace")[:80]


def _read_aliases(path):
    """ID<TAB>alias... lines -> (ids (N,) S{w}, id_len (N,), alias_buf, alias_len (A,), alias_ptr (N+1,))."""
    ids, id_len, id_line, abuf, alen, count = [], [], [], [], [], []
    for a, fs, fe, line, col, nf in _tsv_chunks(path):
        bad = (nf < 2) | (fe == fs)
        if bad.any():
            n = int(line[bad][0])
            ls, le = fs[line == n][0], fe[line == n][-1]
            raise DataError(f"{path}:{n}: expected 'ID<TAB>alias[<TAB>alias...]' with non-empty "
                            f"fields, found {int(nf[line == n][0])} column(s): {_line_text(a, ls, le)!r}")
        first = col == 0
        b, n = _gather(a, fs[first], fe[first])
        ids.append(b)
        id_len.append(n)
        id_line.append(line[first])
        b, n = _gather(a, fs[~first], fe[~first])
        abuf.append(b)
        alen.append(n)
        count.append(nf[first] - 1)
    if not ids:
        raise DataError(f"{path}: empty; expected at least one 'ID<TAB>alias' line")
    id_len, id_line = np.concatenate(id_len), np.concatenate(id_line)
    keys = _fixed_width(np.concatenate(ids), id_len, int(id_len.max()))  # (N,) S{w}
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(dup):
        j = dup[np.argmin(id_line[order[dup + 1]])]  # the first repeat in file order
        raise DataError(f"{path}:{id_line[order[j + 1]]}: duplicate id {keys[order[j]].decode()!r} "
                        f"(first on line {id_line[order[j]]})")
    ptr = np.concatenate([[0], np.cumsum(np.concatenate(count))]).astype(np.int64)
    return keys, id_len, order, np.concatenate(abuf), np.concatenate(alen), ptr


def _ragged_strings(buf, n):
    off = np.concatenate([[0], np.cumsum(n)])
    return [buf[off[i]:off[i + 1]].tobytes().decode("utf-8") for i in range(len(n))]


def _parse_kg(kg_dir, out):
    """Parse the three KG files into .npy arrays and meta.json under out (see KG); load_kg runs it
    as `python data.py --parse-kg KG_DIR OUT` in a child process."""
    ent_path, rel_path, tri_path = (_find_kg_file(kg_dir, k) for k in ("entities", "relations", "triples"))
    ids, id_len, order, abuf, alen, aptr = _read_aliases(ent_path)
    rids, rid_len, rorder, rbuf, rlen, rptr = _read_aliases(rel_path)
    ralias = _ragged_strings(rbuf, rlen)
    rel_aliases = [ralias[rptr[i]:rptr[i + 1]] for i in range(len(rids))]
    ent_index, rel_index = IdIndex(ids, order), IdIndex(rids, rorder)
    rows = []
    for a, fs, fe, line, col, nf in _tsv_chunks(tri_path):
        if (nf != 3).any():
            n = int(line[nf != 3][0])
            ls, le = fs[line == n][0], fe[line == n][-1]
            raise DataError(f"{tri_path}:{n}: expected 3 tab-separated columns 'head<TAB>relation<TAB>tail', "
                            f"found {int(nf[line == n][0])}: {_line_text(a, ls, le)!r}")
        h, r, t = ((_gather(a, fs[col == c], fe[col == c])) for c in range(3))
        rel = np.where(r[1] <= rids.itemsize, rel_index.lookup(_fixed_width(*r, rids.itemsize)), -1)
        if (rel < 0).any():
            k = np.argmax(rel < 0)
            bad = a[fs[col == 1][k]:fe[col == 1][k]].tobytes().decode()
            raise DataError(f"{tri_path}:{line[col == 1][k]}: unknown relation {bad!r} (not in the relations file)")
        head = np.where(h[1] <= ids.itemsize, ent_index.lookup(_fixed_width(*h, ids.itemsize)), -1)
        tail = np.where(t[1] <= ids.itemsize, ent_index.lookup(_fixed_width(*t, ids.itemsize)), -1)
        # Wikidata5M's triples mention entities without aliases; those triples are unusable here
        ok = (head >= 0) & (tail >= 0)
        rows.append(np.stack([head[ok], rel[ok], tail[ok]], 1).astype(np.int32))
    save = lambda name, x: np.save(os.path.join(out, name + ".npy"), x)
    save("triples", np.concatenate(rows) if rows else np.zeros((0, 3), np.int32))
    save("entity_ids", ids)
    save("entity_id_len", id_len)
    save("entity_order", order)
    save("alias_buf", abuf)
    save("alias_off", np.concatenate([[0], np.cumsum(alen)]).astype(np.int64))
    save("alias_ptr", aptr)
    rel_ids = _ragged_strings(*_gather(rids.view(np.uint8), np.arange(len(rids)) * rids.itemsize,
                                       np.arange(len(rids)) * rids.itemsize + rid_len))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(dict(relation_ids=rel_ids, relation_aliases=rel_aliases), f)


def file_stamp(path):
    """What identifies an input file's version for the caches: real path, size, mtime (ns)."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def code_version(*objs):
    """Hash of the source of the functions/classes that shape a cache: editing them invalidates it."""
    import hashlib
    import inspect
    return hashlib.sha256("\n".join(inspect.getsource(o) for o in objs).encode()).hexdigest()[:16]


def _key(obj):
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def load_kg(kg_dir, cache_dir=None):
    """Read a KG in Wikidata5M's layout into flat arrays (KG), parsed once and cached.

    The parsed arrays live in cache_dir/kg-<key>/ (default data_cache/kg/ next to this file), key =
    hash of (real path, size, mtime) of the three KG files and of the parser's source code, so an
    edited KG file or parser is re-parsed. Processes that load the same KG at once (the ranks of a
    node) take a file lock: the first parses (in a child process), the others wait and memory-map
    its files, sharing the pages. A cache built for an older version of the same kg_dir is removed."""
    paths = [_find_kg_file(kg_dir, k) for k in ("entities", "relations", "triples")]
    cache_dir = os.path.join(MINI_ROOT, "kg") if cache_dir is None else cache_dir
    src = os.path.realpath(kg_dir)
    key = _key([[file_stamp(p) for p in paths], code_version(_tsv_chunks, _gather, _fixed_width, _read_aliases,
                                                             _parse_kg, IdIndex, KG)])
    final = os.path.join(cache_dir, "kg-" + key)
    if not os.path.exists(os.path.join(final, "meta.json")):
        import fcntl
        import shutil
        import tempfile
        os.makedirs(cache_dir, exist_ok=True)
        with open(final + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not os.path.exists(os.path.join(final, "meta.json")):
                tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-kg-")
                try:
                    # parse in a child process: its transient arrays (peak ~1.9x the KG files' bytes at
                    # 1/10 Wikidata5M) die with it instead of staying in this process's malloc arenas
                    import subprocess
                    import sys
                    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--parse-kg", kg_dir, tmp],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                        if last.startswith("DataError: "):
                            raise DataError(last[len("DataError: "):])
                        raise RuntimeError(f"data.py --parse-kg {kg_dir} failed:\n{r.stderr[-3000:]}")
                    with open(os.path.join(tmp, "meta.json")) as f:
                        meta = json.load(f)
                    with open(os.path.join(tmp, "meta.json"), "w") as f:
                        json.dump(dict(meta, key=key, kg_dir=src, files=[file_stamp(p) for p in paths]), f)
                    os.rename(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                for old in os.listdir(cache_dir):  # older parses of this kg_dir
                    m = os.path.join(cache_dir, old, "meta.json")
                    if old.startswith("kg-") and old != "kg-" + key and os.path.exists(m):
                        with open(m) as f:
                            if json.load(f).get("kg_dir") == src:
                                shutil.rmtree(os.path.join(cache_dir, old), ignore_errors=True)
                                if os.path.exists(os.path.join(cache_dir, old + ".lock")):
                                    os.remove(os.path.join(cache_dir, old + ".lock"))
    return KG(final)


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
        self.by_first = {}  # first word -> {alias: entity index}
        for e, aliases in enumerate(kg.entity_aliases):
            for a in aliases:
                if len(a) < min_len:
                    continue
                first = self._word.match(a)  # the same tokens link() scans ("Port-au-Prince" -> "Port")
                if first is not None:
                    self.by_first.setdefault(first.group(), {}).setdefault(a, e)
        # first word -> (alias lengths longest first, {alias: entity}): a position costs one dict lookup
        # per distinct length, not one comparison per alias (Wikidata has thousands of "John ..." aliases)
        self.by_first = {w: (sorted({len(a) for a in d}, reverse=True), d) for w, d in self.by_first.items()}
        self.kg = kg

    def link(self, text):
        """-> [{"id": QID, "start", "end"}] non-overlapping, sorted by start."""
        out, pos = [], 0
        for m in self._word.finditer(text):
            if m.start() < pos or m.group() not in self.by_first:
                continue
            lengths, aliases = self.by_first[m.group()]
            for n in lengths:
                end = m.start() + n
                e = aliases.get(text[m.start():end])
                if e is not None and (end == len(text) or not text[end].isalnum()):
                    out.append({"id": self.kg.entity_ids[e], "start": m.start(), "end": end})
                    pos = end
                    break
        return out


# -----------------------------------------------------------------------------
# Corpus

def parse_record(raw, n, path, kg, linker):
    """One corpus line -> {"text", "entities": [{"id", "start", "end"}]}, validated; raw is the line
    (None if it is not UTF-8), n its 1-based number. JSONL lines without "entities" and TXT lines
    (one document per line) are linked with `linker`."""
    if raw is None:
        raise DataError(f"{path}:{n}: not valid UTF-8 (expected a UTF-8 text file)")
    if not path.endswith(".jsonl"):
        text = raw.rstrip("\n")
        return {"text": text, "entities": linker.link(text)}
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); expected "
                        '{"text": ..., "entities": [{"id","start","end"}]}') from e
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise DataError(f'{path}:{n}: expected an object with a string "text" field')
    text = rec["text"]
    if "entities" not in rec:
        return {"text": text, "entities": linker.link(text)}
    for e in rec["entities"]:
        if not isinstance(e, dict) or not {"id", "start", "end"} <= set(e):
            raise DataError(f'{path}:{n}: each entity needs "id", "start", "end"; found {e!r}')
        if not isinstance(e["id"], str) or e["id"] not in kg.entity_index:
            raise DataError(f"{path}:{n}: unknown entity {e['id']!r} (not in the KG entities file)")
        if not (isinstance(e["start"], int) and isinstance(e["end"], int) and 0 <= e["start"] < e["end"] <= len(text)):
            raise DataError(f"{path}:{n}: entity span [{e['start']}, {e['end']}) is outside "
                            f"the text of length {len(text)}")
    return {"text": text, "entities": [{"id": e["id"], "start": e["start"], "end": e["end"]} for e in rec["entities"]]}


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


PACK_BLOCK = 1000  # corpus lines per block; sequences are packed within a block


def _corpus_lines(path, stamp):
    """datasets generator: the non-blank lines of a corpus file and their 1-based numbers, in blocks
    of PACK_BLOCK lines, one block per row (stamp, the file's size and mtime, is an argument only
    so that datasets' cache key changes with it)."""
    block = {"line": [], "raw": []}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    raw = line.decode("utf-8")
                except UnicodeDecodeError:
                    raw = None  # parse_record names the line
                block["line"].append(n)
                block["raw"].append(raw)
                if len(block["line"]) == PACK_BLOCK:
                    yield block
                    block = {"line": [], "raw": []}
    if block["line"]:
        yield block


_LINKERS = {}  # KG key -> AliasLinker, built once per process (each datasets.map worker builds its own)


def _preprocess(batch, tokenizer, kg, max_len, path):
    """datasets.map function (batched, num_proc workers): per block of lines, validate and link them
    (parse_record), tokenize them (tokenize_docs) and pack them into sequences (pack_docs)."""
    if kg.key not in _LINKERS:
        _LINKERS[kg.key] = AliasLinker(kg)
    out = {}
    for lines, raws in zip(batch["line"], batch["raw"]):
        recs = [parse_record(raw, n, path, kg, _LINKERS[kg.key]) for raw, n in zip(raws, lines)]
        docs = tokenize_docs({"text": [r["text"] for r in recs], "entities": [r["entities"] for r in recs]},
                             tokenizer, kg.entity_index)
        for k, v in pack_docs(docs, tokenizer.cls_token_id, tokenizer.sep_token_id, max_len).items():
            out.setdefault(k, []).extend(v)
    return out


def build_dataset(corpus_path, kg, tokenizer, max_len, cache_dir, num_proc=None):
    """Linked, tokenized, packed Arrow dataset under cache_dir. kg: a KG from load_kg.

    Two datasets passes, both cached: the corpus lines in blocks of PACK_BLOCK (keyed by the file's
    real path, size and mtime), then one map that validates, links, tokenizes and packs each block,
    in num_proc processes (each builds its own AliasLinker once). Documents are packed within their
    block, and datasets shards between rows (= blocks), so the sequences do not depend on num_proc.
    The map's cache key is the hash of the corpus file's stamp, the KG's key (its files and parser
    version), the tokenizer (datasets' own hash of it), max_len and the source code of every
    function that shapes the rows: changing any of them re-links, nothing else does."""
    import datasets
    from datasets.fingerprint import Hasher
    datasets.disable_progress_bars()
    if not os.path.exists(corpus_path):
        raise DataError(f"{corpus_path}: corpus file not found (expected JSONL or one document per line)")
    with open(corpus_path, "rb") as f:
        if not any(line.strip() for line in f):  # stops at the first non-blank line
            raise DataError(f"{corpus_path}: empty corpus (no non-blank lines)")
    stamp = file_stamp(corpus_path)
    lines = datasets.Dataset.from_generator(  # stamp as a string: a list in gen_kwargs is read as shards
        _corpus_lines, gen_kwargs=dict(path=corpus_path, stamp=json.dumps(stamp)), cache_dir=os.path.join(cache_dir, "hf"),
        features=datasets.Features({"line": datasets.List(datasets.Value("int64")),
                                    "raw": datasets.List(datasets.Value("string"))}))
    key = _key([stamp, kg.key, Hasher.hash(tokenizer), max_len, PACK_BLOCK,
                code_version(_corpus_lines, parse_record, AliasLinker, char_to_token_spans, tokenize_docs, pack_docs,
                             _preprocess)])
    ds = lines.map(_preprocess, batched=True, batch_size=1, remove_columns=lines.column_names,
                   fn_kwargs=dict(tokenizer=tokenizer, kg=kg, max_len=max_len, path=corpus_path),
                   num_proc=num_proc, new_fingerprint=key, desc="link+tokenize+pack")
    _LINKERS.pop(kg.key, None)  # a Wikidata5M-sized linker is GBs; training does not need it
    if len(ds) == 0:
        raise DataError(f"{corpus_path}: no sequences after tokenization (empty texts?)")
    return ds


def flat_column(ds, name, dtype=np.int64):
    """(N,) numpy array of a build_dataset list column (e.g. ent_id, ent_si) flattened over all rows, in
    row order, read in Arrow batches (nothing per row in Python)."""
    import pyarrow.compute as pc
    parts = [pc.list_flatten(b[name]).to_numpy(zero_copy_only=False)
             for b in ds.with_format("arrow").iter(batch_size=1 << 16)]
    parts = [p.astype(dtype) for p in parts if p.size]  # an all-empty batch flattens to a null-typed array
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def mention_counts(ds, num_entities):
    """Entity frequency (Sec. 3.1): (E,) int64 linked mentions per entity over a build_dataset
    dataset, one vectorised pass over its Arrow ent_id column (nothing per row in Python)."""
    ids = flat_column(ds, "ent_id")
    if ids.size and (ids.min() < 0 or ids.max() >= num_entities):
        raise DataError(f"dataset ent_id out of range [0, {num_entities}): found [{ids.min()}, {ids.max()}] "
                        "(a dataset built for another KG?)")
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


def word_counts(ds, plain):
    """Long-tail word frequency (Sec. 3.4): (V,) int64 occurrences of each token id as a whole word
    (whole_words) outside every linked mention span, over a build_dataset dataset, one vectorised
    pass per Arrow batch (nothing per row in Python)."""
    import pyarrow.compute as pc
    import torch
    counts = np.zeros(len(plain), dtype=np.int64)
    flat = lambda col: pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    for b in ds.with_format("arrow").iter(batch_size=1 << 14):
        ids, ws = flat(b["input_ids"]), flat(b["word_start"]).astype(bool)  # (N,) rows end to end
        lens = pc.list_value_length(b["input_ids"]).to_numpy().astype(np.int64)
        row0 = np.repeat(np.cumsum(lens) - lens, pc.list_value_length(b["ent_id"]).to_numpy().astype(np.int64))
        start, end = torch.from_numpy(flat(b["ent_start"]) + row0), torch.from_numpy(flat(b["ent_end"]) + row0)
        in_span = span_mask(torch.zeros_like(start), start, end, (1, ids.size))  # (1,N)
        # rows start with [CLS] and end with [SEP], so a row's neighbours never leak into the next
        word = whole_words(torch.from_numpy(ids)[None], torch.from_numpy(ws)[None], plain) & ~in_span  # (1,N)
        word = word[0].numpy()
        counts += np.bincount(ids[word], minlength=len(plain))
    return counts


MINI_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")  # where --data mini is built


def resolve_data(data, mini_root=MINI_ROOT):
    """--data mini | DIR -> (kg_dir, corpus_path). mini is built once under mini_root and reused."""
    if data == "mini":
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
                    word_start=ws, ent_batch=t(eb), ent_start=t(es), ent_end=t(ee), ent_id=t(ei))


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "--parse-kg":
        sys.exit("usage: python data.py --parse-kg KG_DIR OUT (load_kg runs this; see its docstring)")
    try:
        _parse_kg(sys.argv[2], sys.argv[3])
    except DataError as e:
        sys.exit(f"DataError: {e}")
