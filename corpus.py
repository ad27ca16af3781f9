"""The corpus layouts the prepare step reads (TRELM Sec. 4.1: English Wikipedia, entities aligned to Wikidata5M).

    layout, units = open_corpus(path)           # the layout is chosen by what the path holds
    for ref, raw in units: doc = parse(layout, ref, raw, kg, linker, titles)   # {"text", "entities"}

| layout         | what the path holds                                   | mentions                         |
|----------------|-------------------------------------------------------|----------------------------------|
| jsonl          | corpus.jsonl: {"text", "entities": [{"id","start","end"}]} | given; a line without: linker |
| txt            | corpus.txt: one document per line                     | alias linker                     |
| wikidata5m     | wikidata5m_text.txt: Q-id<TAB>description              | the subject's own aliases, linker |
| wikiextractor  | WikiExtractor --json output: {"id","url","title","text"} per line, a file or its folder (AA/wiki_00 ...); with --links the text keeps <a href="Title">anchor</a> | anchors (through --titles), the subject's aliases, linker |
| parquet        | the Hugging Face wikimedia/wikipedia parquet files (id, url, title, text), read with datasets | the subject's aliases (through --titles), linker |

A --data DIR with kg/ and corpus.jsonl or corpus.txt is read as jsonl / txt. Mentions from anchors win
over the alias linker where both cover a character (ERNIE and KEPLER build their data from anchors);
the page's subject (Wikidata5M's Q-id, or the title mapped by --titles: lines 'Title<TAB>Q-id') takes
the matches of its own aliases in its own text before the linker does, so an alias several entities
share resolves to the page's entity. Each entity of a document carries its source ("link", "subject",
"alias" or "given") for the census. A malformed line raises DataError naming file:line and the layout.

The reading is cheap and sequential (the main process); parsing, linking and tokenization run in the
prepare workers (data.py), one block of documents at a time.
"""
import glob
import html
import json
import os
import re
from urllib.parse import unquote

from common import DataError

LAYOUTS = ("jsonl", "txt", "wikidata5m", "wikiextractor", "parquet")
ANCHOR = re.compile(r'<a href="([^"]*)">(.*?)</a>', re.S)
WIKIEXTRACTOR_KEYS = {"id", "url", "title"}  # and "text": a line without it is refused by parse()


# ----------------------------------------------------------------------------- which layout

def _first_line(path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                return line.decode("utf-8", "replace")
    return ""


def detect(path):
    """-> (layout, [files]) for a corpus path (module docstring), or DataError saying what was found."""
    if os.path.isdir(path):
        for name in ("corpus.jsonl", "corpus.txt", "wikidata5m_text.txt"):
            if os.path.exists(os.path.join(path, name)):
                return detect(os.path.join(path, name))
        parquet = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if parquet:
            return "parquet", parquet
        wiki = sorted(glob.glob(os.path.join(path, "**", "wiki_[0-9]*"), recursive=True))
        if wiki:
            return detect_file(wiki[0])[0], wiki
        raise DataError(f"--corpus {path}: a folder with no corpus.jsonl, corpus.txt, wikidata5m_text.txt, *.parquet "
                        f"or WikiExtractor output (AA/wiki_00 ...); found {sorted(os.listdir(path))[:8]}")
    if not os.path.exists(path):
        raise DataError(f"{path}: corpus file not found (expected one of the layouts of corpus.py: {', '.join(LAYOUTS)})")
    return detect_file(path)


def detect_file(path):
    if path.endswith(".parquet"):
        return "parquet", [path]
    first = _first_line(path)
    if not first:
        raise DataError(f"{path}: empty corpus (no non-blank lines)")
    if os.path.basename(path) == "wikidata5m_text.txt" or re.match(r"Q\d+\t", first):
        return "wikidata5m", [path]
    if first.lstrip().startswith("<doc "):
        raise DataError(f"{path}:1: WikiExtractor's <doc> format; extract with --json (and --links for anchors)")
    if first.lstrip().startswith("{"):
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            rec = None  # the jsonl reader names the line
        if isinstance(rec, dict) and WIKIEXTRACTOR_KEYS <= set(rec):
            return "wikiextractor", [path]
        return "jsonl", [path]
    return ("jsonl" if path.endswith(".jsonl") else "txt"), [path]


# ----------------------------------------------------------------------------- reading (main process)

def units(layout, files):
    """The documents of the corpus in order, as (ref, raw): ref = (file, line or row) names the document in
    errors, raw what parse() reads (a line, or (title, text) of a parquet row)."""
    if layout == "parquet":
        yield from _parquet_rows(files)
        return
    for path in files:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw = line.decode("utf-8")
                    except UnicodeDecodeError:
                        raw = None  # parse() names the line
                    yield (path, n), raw


def _parquet_rows(files):
    """(title, text) of every row, file by file, streamed by `datasets` (no Arrow copy of the corpus)."""
    import datasets
    datasets.disable_progress_bars()
    for path in files:
        rows = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        for n, row in enumerate(rows, 1):
            if not isinstance(row.get("text"), str) or not isinstance(row.get("title"), str):
                raise DataError(f"{path}: row {n}: expected string 'title' and 'text' columns (wikimedia/wikipedia)")
            yield (path, n), (row["title"], row["text"])


# ----------------------------------------------------------------------------- parsing (workers)

def parse(layout, ref, raw, kg, linker, titles=None):
    """One document -> {"text", "entities": [{"id", "start", "end", "source"}]}, validated and linked."""
    path, n = ref
    if raw is None:
        raise DataError(f"{path}:{n}: not valid UTF-8 (expected a UTF-8 text file)")
    if layout == "txt":
        text = raw.rstrip("\n")
        return {"text": text, "entities": _tag(linker.link(text), "alias")}
    if layout == "jsonl":
        return _our_jsonl(raw, path, n, kg, linker)
    if layout == "wikidata5m":
        qid, sep, text = raw.rstrip("\n").partition("\t")
        if not sep or not re.fullmatch(r"Q\d+", qid):
            raise DataError(f"{path}:{n}: expected 'Q-id<TAB>description' (Wikidata5M's wikidata5m_text.txt), "
                            f"found {raw[:60]!r}")
        return {"text": text, "entities": link(text, [], kg.entity_index.get(qid), kg, linker)}
    if layout == "parquet":
        title, text = raw
        return {"text": text, "entities": link(text, [], _subject(title, titles, kg), kg, linker)}
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); expected WikiExtractor --json lines "
                        '{"id", "url", "title", "text"}') from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not isinstance(rec.get("title"), str):
        raise DataError(f'{path}:{n}: expected a WikiExtractor --json object with string "title" and "text"')
    text, anchors = strip_anchors(rec["text"])
    links = [(s, e, _subject(t, titles, kg)) for s, e, t in anchors]
    return {"text": text, "entities": link(text, [(s, e, i) for s, e, i in links if i is not None],
                                          _subject(rec["title"], titles, kg), kg, linker)}


def _our_jsonl(raw, path, n, kg, linker):
    """Our corpus.jsonl line: given spans are validated; a line without "entities" is linked."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); expected "
                        '{"text": ..., "entities": [{"id","start","end"}]}') from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise DataError(f'{path}:{n}: expected an object with a string "text" field')
    text = rec["text"]
    if "entities" not in rec:
        return {"text": text, "entities": _tag(linker.link(text), "alias")}
    for e in rec["entities"]:
        if not isinstance(e, dict) or not {"id", "start", "end"} <= set(e):
            raise DataError(f'{path}:{n}: each entity needs "id", "start", "end"; found {e!r}')
        if not isinstance(e["id"], str) or e["id"] not in kg.entity_index:
            raise DataError(f"{path}:{n}: unknown entity {e['id']!r} (not in the KG entities file)")
        if not (isinstance(e["start"], int) and isinstance(e["end"], int) and 0 <= e["start"] < e["end"] <= len(text)):
            raise DataError(f"{path}:{n}: entity span [{e['start']}, {e['end']}) is outside "
                            f"the text of length {len(text)}")
    return {"text": text, "entities": [{"id": e["id"], "start": e["start"], "end": e["end"], "source": "given"}
                                       for e in rec["entities"]]}


def strip_anchors(text):
    """WikiExtractor --links text -> (plain text, [(start, end, title)]): each <a href="Title">anchor</a>
    becomes its anchor text; the href is URL-unquoted, its #fragment dropped."""
    out, spans, at, pos = [], [], 0, 0
    for m in ANCHOR.finditer(text):
        out.append(text[pos:m.start()])
        at += m.start() - pos
        anchor = m.group(2)
        if anchor:
            spans.append((at, at + len(anchor), unquote(html.unescape(m.group(1))).split("#")[0]))
        out.append(anchor)
        at += len(anchor)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


def _subject(title, titles, kg):
    """A Wikipedia title -> entity index through the --titles map (first letter case-insensitive,
    underscores as spaces, as Wikipedia resolves them), or None."""
    if not titles or not title:
        return None
    t = title.replace("_", " ").strip()
    qid = titles.get(t) or titles.get(t[:1].upper() + t[1:])
    return None if qid is None else kg.entity_index.get(qid)


def link(text, links, subject, kg, linker):
    """The mentions of a document: anchors first (links: [(start, end, entity index)]), then the subject's
    own aliases (subject: entity index or None), then the alias linker, each only where no earlier source
    covers a character. -> [{"id", "start", "end", "source"}] sorted by start."""
    covered = bytearray(len(text))
    out = []

    def take(start, end, qid, source):
        if not any(covered[start:end]):
            covered[start:end] = b"\1" * (end - start)
            out.append({"id": qid, "start": start, "end": end, "source": source})
    for start, end, e in links:
        take(start, end, kg.entity_ids[e], "link")
    if subject is not None:
        qid = kg.entity_ids[subject]
        for alias in sorted(set(kg.entity_aliases[subject]), key=len, reverse=True):  # longest first
            if len(alias) >= linker.min_len:
                for m in re.finditer(re.escape(alias), text):
                    if (m.end() == len(text) or not text[m.end()].isalnum()) and \
                            (m.start() == 0 or not text[m.start() - 1].isalnum()):
                        take(m.start(), m.end(), qid, "subject")
    for e in linker.link(text):
        take(e["start"], e["end"], e["id"], "alias")
    return sorted(out, key=lambda e: e["start"])


def _tag(entities, source):
    return [dict(e, source=source) for e in entities]


def read_titles(path):
    """--titles FILE: 'Title<TAB>Q-id' lines -> {title: Q-id} (DataError naming file:line on a bad line)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            title, sep, qid = line.rstrip("\n").rpartition("\t")
            if not sep or not title or not re.fullmatch(r"Q\d+", qid):
                raise DataError(f"{path}:{n}: expected 'Title<TAB>Q-id', found {line[:60]!r}")
            out[title] = qid
    return out
