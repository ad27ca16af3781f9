"""The knowledge graph (TRELM Sec. 4.1: Wikidata5M) and the alias linker.

    kg = load_kg("DIR/kg")          # parsed once (a child process), cached as .npy, memory-mapped after
    kg.entity_index["Q42"], kg.entity_aliases[i], kg.triples   # (N, 3) int32 head, relation, tail
    AliasLinker(kg).link(text)      # [{"id", "start", "end"}]: longest alias match at word boundaries

Layout (Wikidata5M's release, https://deepgraphlearning.github.io/project/wikidata5m, or our names):
    entities   wikidata5m_entity.txt   (entities.txt)    Q-id<TAB>alias<TAB>alias...  (first = label)
    relations  wikidata5m_relation.txt (relations.txt)   P-id<TAB>alias<TAB>alias...
    triples    triples.txt, else wikidata5m_all_triplet.txt, else the split files of one setting read
               together: wikidata5m_transductive_{train,valid,test}.txt, else wikidata5m_inductive_*.txt
               (head<TAB>relation<TAB>tail). Every triple is knowledge to inject: link prediction's
               held-out splits mean nothing to pre-training, so all of them are read.
Triples that name an entity without an alias line are dropped (Wikidata5M has such triples); an
unknown relation, a malformed line, a duplicate id or bytes that are not UTF-8 raise DataError naming
file:line. The release's wikidata5m_text.txt (Q-id<TAB>description) is a corpus: corpus.py reads it.

Scale (3.09M entities, 21M triples): a columnar numpy reader parses 4 MiB of whole lines at a time
(no Python object per triple) in a child process (`python kg.py --parse-kg`), into .npy files under
a cache keyed by the files' stamps and the parser's source; every later load (each rank, each run)
memory-maps them. Ids are looked up by binary search over fixed-width bytes (IdIndex), aliases are one
UTF-8 buffer + offsets. Measured: docs/measurements.md, "Scale". This module imports no torch.

Tests: python -m pytest -q tests/test_data.py tests/test_readers.py
"""
import json
import os
import re

import numpy as np

from common import DataError, cache_key, cache_root, code_version, file_stamp, writable_dir

KG_FILES = {  # our names, then Wikidata5M's own
    "entities": ("entities.txt", "wikidata5m_entity.txt"),
    "relations": ("relations.txt", "wikidata5m_relation.txt"),
}
TRIPLE_FILES = (  # the first group with a file present is read whole (every file of it that exists)
    ("triples.txt",), ("wikidata5m_all_triplet.txt",),
    tuple(f"wikidata5m_transductive_{s}.txt" for s in ("train", "valid", "test")),
    tuple(f"wikidata5m_inductive_{s}.txt" for s in ("train", "valid", "test")),
)


# -----------------------------------------------------------------------------
# Flat arrays

# dir as .npy files that every later load (every rank of every run) memory-maps.

class StrTable:
    """A read-only sequence of strings stored as one UTF-8 byte buffer and (start, end) offsets.
    table[i] decodes string i; no Python object per string is kept."""

    def __init__(self, buf, start, end):
        self.buf, self.start, self.end = buf, start, end  # (B,) uint8, (N,) int64, (N,) int64

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.buf[self.start[i]:self.end[i]].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, idx):
        """[str] of the strings at idx (an int array), decoded from one copy of the bytes they span: per
        string no numpy indexing (millions of labels at Wikidata5M scale)."""
        idx = np.asarray(idx, np.int64)
        if not idx.size:
            return []
        start, end = np.asarray(self.start[idx], np.int64), np.asarray(self.end[idx], np.int64)
        lo = int(start.min())
        raw = self.buf[lo:int(end.max())].tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip((start - lo).tolist(), (end - lo).tolist())]


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


def kg_files(kg_dir):
    """-> (entities path, relations path, [triple paths]) of a KG directory (module docstring)."""
    if not os.path.isdir(kg_dir):
        raise DataError(f"{kg_dir}: no such KG directory (expected {KG_FILES['entities'][1]}, "
                        f"{KG_FILES['relations'][1]} and triples in Wikidata5M's layout)")
    found = []
    for kind in ("entities", "relations"):
        hit = [os.path.join(kg_dir, n) for n in KG_FILES[kind] if os.path.exists(os.path.join(kg_dir, n))]
        if not hit:
            raise DataError(f"{kg_dir}: no {kind} file; expected one of {', '.join(KG_FILES[kind])} "
                            f"(Wikidata5M layout: https://deepgraphlearning.github.io/project/wikidata5m)")
        found.append(hit[0])
    for group in TRIPLE_FILES:
        hit = [os.path.join(kg_dir, n) for n in group if os.path.exists(os.path.join(kg_dir, n))]
        if hit:
            return found[0], found[1], hit
    raise DataError(f"{kg_dir}: no triples file; expected triples.txt, wikidata5m_all_triplet.txt or "
                    f"wikidata5m_transductive_train.txt (Wikidata5M layout)")


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
    as `python kg.py --parse-kg KG_DIR OUT` in a child process."""
    ent_path, rel_path, tri_paths = kg_files(kg_dir)
    ids, id_len, order, abuf, alen, aptr = _read_aliases(ent_path)
    rids, rid_len, rorder, rbuf, rlen, rptr = _read_aliases(rel_path)
    ralias = _ragged_strings(rbuf, rlen)
    rel_aliases = [ralias[rptr[i]:rptr[i + 1]] for i in range(len(rids))]
    ent_index, rel_index = IdIndex(ids, order), IdIndex(rids, rorder)
    rows = []
    for tri_path, (a, fs, fe, line, col, nf) in ((p, c) for p in tri_paths for c in _tsv_chunks(p)):
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


def load_kg(kg_dir, cache_dir=None):
    """Read a KG in Wikidata5M's layout into flat arrays (KG), parsed once and cached.

    The parsed arrays live in cache_dir/kg-<key>/ (default: kg/ under common.cache_root()), key = hash of (real path, size, mtime) of the KG files and of the parser's source code, so an
    edited KG file or parser is re-parsed. Processes that load the same KG at once (the ranks of a
    node) take a file lock: the first parses (in a child process), the others wait and memory-map
    its files, sharing the pages. A cache built for an older version of the same kg_dir is removed."""
    ent_path, rel_path, tri_paths = kg_files(kg_dir)
    paths = [ent_path, rel_path, *tri_paths]
    cache_dir = os.path.join(cache_root(), "kg") if cache_dir is None else cache_dir
    src = os.path.realpath(kg_dir)
    key = cache_key([[file_stamp(p) for p in paths], code_version(_tsv_chunks, _gather, _fixed_width, _read_aliases,
                                                             _parse_kg, IdIndex, KG)])
    final = os.path.join(cache_dir, "kg-" + key)
    if not os.path.exists(os.path.join(final, "meta.json")):
        import fcntl
        import shutil
        import tempfile
        writable_dir(cache_dir, "--cache-dir")  # a parse to cache: one line if it cannot be written
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
                        raise RuntimeError(f"kg.py --parse-kg {kg_dir} failed:\n{r.stderr[-3000:]}")
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
        self.min_len = min_len
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


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "--parse-kg":
        sys.exit("usage: python kg.py --parse-kg KG_DIR OUT (load_kg runs this; see its docstring)")
    try:
        _parse_kg(sys.argv[2], sys.argv[3])
    except DataError as e:
        sys.exit(f"DataError: {e}")
