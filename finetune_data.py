"""The fine-tuning benchmarks' files (TRELM Tables 3-5): their official formats, the readers that check
them, and where finetune.py finds them under --data-dir.

    TACRED    json/{train,dev,test}.json: one JSON list of {"token", "subj_start", "subj_end", "obj_start",
              "obj_end" (inclusive token indices), "relation"} (LDC2018T24)
    FewRel    val_wiki.json: {relation_id: [{"tokens", "h": [name, qid, [[positions]]], "t": ...}]}, converted
              to TACRED rows (first mention of head = subject, of tail = object) and split per relation
              with --split-seed into --fewrel-split fractions (70/10/20: 490/70/140 of 700)
    Open Entity  crowd/{train,dev,test}.json: Choi et al. (2018) JSON lines {"mention_span",
              "left_context_token", "right_context_token", "y_str"}; gold = y_str intersected with the 9
              general types (GENERAL_TYPES, ERNIE's Open Entity setting)
    GLUE      glue_data/TASK/{train,dev}.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv) with the column
              positions of the GLUE / Hugging Face run_glue processors (GLUE), or the `datasets` GLUE
              loader with --glue-source hf (needs internet)

A file that does not follow its official format (not JSON, a record missing a field or with a field of
the wrong type, a tsv row whose field count differs from its header) raises common.DataError naming the
file, the line or record, and the format expected; evaluate.py prints it as one line. A missing file
ends the run with a message saying where to get the data (WHERE).
"""
import csv
import json
import os
import random
from collections import namedtuple

import lama
from common import DataError, read_jsonl

GENERAL_TYPES = ("entity", "event", "group", "location", "object", "organization", "person", "place", "time")

WHERE = {
    "tacred": "TACRED is LDC-licensed (LDC2018T24, https://catalog.ldc.upenn.edu/LDC2018T24); pass "
              "--data-dir with the folder holding its json/train.json, dev.json, test.json",
    "fewrel": "FewRel: https://github.com/thunlp/FewRel data/val_wiki.json (or train_wiki.json with "
              "--fewrel-file)",
    "open-entity": "Open Entity (Choi et al. 2018): http://nlp.cs.washington.edu/entity_type "
                   "release/crowd/{train,dev,test}.json",
    "glue": "GLUE: run the GLUE download_glue_data.py script (https://gluebenchmark.com/tasks) and "
            "pass the glue_data folder, or use --glue-source hf on a machine with internet",
}

TACRED_KEYS = ("token", "subj_start", "subj_end", "obj_start", "obj_end", "relation")
TACRED_FORMAT = ("official TACRED JSON: a list of objects with token (list of words), subj_start, subj_end, "
                 "obj_start, obj_end (inclusive token indices) and relation (string)")
FEWREL_FORMAT = ('FewRel JSON {relation_id: [{"tokens": [...], "h": [name, id, [[positions]]], "t": [...]}]} '
                 "(thunlp/FewRel data/val_wiki.json)")
OPEN_ENTITY_KEYS = ("mention_span", "left_context_token", "right_context_token", "y_str")
OPEN_ENTITY_FORMAT = ("Open Entity crowd JSON lines: one object per line with mention_span (non-empty string), "
                      "left_context_token, right_context_token (lists of words) and y_str (list of types)")


def read_json(path, expected):
    """The JSON document in `path`. Text that is not UTF-8 or not JSON raises DataError naming the file,
    line and column and `expected` (the format in words)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); expected {expected}") from None
    except json.JSONDecodeError as e:
        ends = e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string")  # the text ran out
        cut = "; the file ends inside the JSON: truncated?" if ends else ""
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}{cut}); expected {expected}") from None


def is_str_list(x):
    """A JSON list of strings (a sentence's words, a type list)."""
    return isinstance(x, list) and all(isinstance(w, str) for w in x)


def check_spans(rows, source):
    """Every row needs the TACRED keys, token a list of words, relation a string and inclusive spans
    0 <= start <= end < len(token) of integers."""
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{source}: row {i} is a JSON {type(r).__name__}; expected {TACRED_FORMAT}")
        missing = [k for k in TACRED_KEYS if k not in r]
        if missing:
            raise DataError(f"{source}: row {i} (id {r.get('id')}) lacks {missing}; expected TACRED JSON keys "
                            f"{list(TACRED_KEYS)}")
        ok = dict(token=is_str_list(r["token"]), relation=isinstance(r["relation"], str),
                  **{k: type(r[k]) is int for k in TACRED_KEYS[1:5]})
        wrong = [k for k in TACRED_KEYS if not ok[k]]
        if wrong:
            raise DataError(f"{source}: row {i} (id {r.get('id')}): unexpected "
                            f"{', '.join(f'{k}={r[k]!r:.40}' for k in wrong)}; expected {TACRED_FORMAT}")
        n = len(r["token"])
        for a, b in (("subj_start", "subj_end"), ("obj_start", "obj_end")):
            if not 0 <= r[a] <= r[b] < n:
                raise DataError(f"{source}: row {i} (id {r.get('id')}): {a}={r[a]}, {b}={r[b]} is not an "
                                f"inclusive span inside its {n} tokens")
    return rows


def read_tacred(path):
    """Official TACRED JSON: one list of rows; span ends are inclusive."""
    rows = read_json(path, TACRED_FORMAT)
    if not isinstance(rows, list):
        raise DataError(f"{path}: top level is a JSON {type(rows).__name__}; expected {TACRED_FORMAT}")
    return check_spans(rows, path)


def fewrel_problem(x):
    """What keeps `x` from being a FewRel instance {"tokens": [str], "h": [name, id, [[pos, ...], ...]],
    "t": ...} whose first mentions' positions index its tokens, or None if nothing does."""
    if not isinstance(x, dict):
        return f"a JSON {type(x).__name__}, not an object"
    if not is_str_list(x.get("tokens")):
        return '"tokens" is missing or not a list of strings'
    for k in ("h", "t"):
        e = x.get(k)
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[2], list) and e[2]
                and isinstance(e[2][0], list) and e[2][0]):
            return f'"{k}" is missing or not [name, id, [[positions], ...]]'
        bad = [p for p in e[2][0] if type(p) is not int or not 0 <= p < len(x["tokens"])]
        if bad:
            return f'"{k}" position {bad[0]!r} is not a token index in [0, {len(x["tokens"])})'
    return None


def check_fewrel(data, source):
    """FewRel's format: {relation id: [{"tokens": [str], "h": [name, id, [[pos, ...]]], "t": ...}]}."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{source}: top level is {type(data).__name__}{' (empty)' if not data else ''}; "
                        f"expected {FEWREL_FORMAT}")
    for pid, rows in data.items():
        if not isinstance(rows, list) or not rows:
            raise DataError(f"{source}: {pid!r} holds {type(rows).__name__}, not a non-empty list; "
                            f"expected {FEWREL_FORMAT}")
        for i, x in enumerate(rows):
            problem = fewrel_problem(x)
            if problem:
                raise DataError(f"{source}: {pid}[{i}] is not a FewRel instance: {problem}; expected {FEWREL_FORMAT}")


def fewrel_to_tacred(data, split_seed=0, percents=(70, 10, 20), source="fewrel"):
    """FewRel {pid: [{"tokens", "h": [name, qid, [[pos, ...], ...]], "t": ...}]} -> {"train", "dev",
    "test"} TACRED rows. Subject = first mention of h, object = first mention of t (FewRel positions
    are contiguous token indices). Each relation's rows are shuffled with Random(split_seed) (relations
    in sorted order) and cut by `percents`: 700 rows -> 490 / 70 / 140."""
    if len(percents) != 3 or sum(percents) != 100:
        raise ValueError(f"--fewrel-split: expected three percentages summing to 100, found {percents}")
    check_fewrel(data, source)
    rng = random.Random(split_seed)
    splits = {"train": [], "dev": [], "test": []}
    for pid in sorted(data):
        rows = []
        for i, x in enumerate(data[pid]):
            spans = []
            for key in ("h", "t"):
                pos = x[key][2][0]
                if pos != list(range(pos[0], pos[-1] + 1)):
                    raise DataError(f"{source}: {pid}[{i}].{key} positions {pos} are not contiguous")
                spans.append((pos[0], pos[-1]))
            rows.append(dict(id=f"{pid}-{i}", token=x["tokens"], subj_start=spans[0][0], subj_end=spans[0][1],
                             obj_start=spans[1][0], obj_end=spans[1][1], relation=pid))
        rng.shuffle(rows)
        n_train = round(len(rows) * percents[0] / 100)
        n_dev = round(len(rows) * percents[1] / 100)
        splits["train"] += rows[:n_train]
        splits["dev"] += rows[n_train:n_train + n_dev]
        splits["test"] += rows[n_train + n_dev:]
    for name, rows in splits.items():
        check_spans(rows, f"{source} ({name})")
    return splits


def read_open_entity(path):
    """Choi et al. crowd JSON lines -> [{"id", "words", "start", "end" (inclusive), "types"}], types =
    y_str intersected with GENERAL_TYPES (in GENERAL_TYPES order; may be empty). A line that is not a
    JSON object (common.read_jsonl) or lacks a field of OPEN_ENTITY_FORMAT raises DataError naming path:line."""
    rows = []
    for ln, r in read_jsonl(path, expected=OPEN_ENTITY_FORMAT):
        missing = [k for k in OPEN_ENTITY_KEYS if k not in r]
        if missing:
            raise DataError(f"{path}:{ln}: lacks {missing}; expected {OPEN_ENTITY_FORMAT}")
        wrong = [k for k in OPEN_ENTITY_KEYS[1:] if not is_str_list(r[k])]
        if not (isinstance(r["mention_span"], str) and r["mention_span"].split()):
            wrong.insert(0, "mention_span")
        if wrong:
            raise DataError(f"{path}:{ln}: unexpected {', '.join(f'{k}={r[k]!r:.40}' for k in wrong)}; "
                            f"expected {OPEN_ENTITY_FORMAT}")
        mention, left = r["mention_span"].split(), r["left_context_token"]
        rows.append(dict(id=r.get("annot_id", f"{path}:{ln}"), words=left + mention + r["right_context_token"],
                         start=len(left), end=len(left) + len(mention) - 1,
                         types=[t for t in GENERAL_TYPES if t in set(r["y_str"])]))
    return rows


GlueTask = namedtuple("GlueTask", "name width a b y labels dev metrics hf hf_a hf_b")
# Column positions as in the GLUE / Hugging Face run_glue processors (y = -1: last column). width: the
# number of columns of a file without a header row (CoLA: source, label, original mark, sentence);
# None: the first row is a header and every row has as many columns as it.
GLUE = {t.name: t for t in (
    GlueTask("CoLA", 4, 3, None, 1, ("0", "1"), ("dev",), ("mcc",), "cola", "sentence", None),
    GlueTask("SST-2", None, 0, None, 1, ("0", "1"), ("dev",), ("acc",), "sst2", "sentence", None),
    GlueTask("MRPC", None, 3, 4, 0, ("0", "1"), ("dev",), ("acc", "f1"), "mrpc", "sentence1", "sentence2"),
    GlueTask("QQP", None, 3, 4, 5, ("0", "1"), ("dev",), ("acc", "f1"), "qqp", "question1", "question2"),
    GlueTask("STS-B", None, 7, 8, -1, None, ("dev",), ("pearson", "spearman"), "stsb", "sentence1", "sentence2"),
    GlueTask("MNLI", None, 8, 9, -1, ("contradiction", "entailment", "neutral"),
             ("dev_matched", "dev_mismatched"), ("acc",), "mnli", "premise", "hypothesis"),
    GlueTask("QNLI", None, 1, 2, -1, ("entailment", "not_entailment"), ("dev",), ("acc",), "qnli", "question", "sentence"),
    GlueTask("RTE", None, 1, 2, -1, ("entailment", "not_entailment"), ("dev",), ("acc",), "rte", "sentence1", "sentence2"),
    GlueTask("WNLI", None, 1, 2, -1, ("0", "1"), ("dev",), ("acc",), "wnli", "sentence1", "sentence2"),
)}
HF_SPLIT = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
            "dev_mismatched": "validation_mismatched"}


def glue_task(name):
    """Canonical GLUE task for a name given case-insensitively, with or without the hyphen."""
    key = {k.lower().replace("-", ""): k for k in GLUE}.get(name.strip().lower().replace("-", ""))
    if key is None:
        raise SystemExit(f"--glue-tasks: unknown task {name!r}; expected some of {', '.join(GLUE)}")
    return GLUE[key]


def read_glue_tsv(path, spec):
    """[(text_a, text_b or None, label)] from one glue_data tsv. Every row has as many tab-separated
    fields as the header row (CoLA, headerless: spec.width): a row with more or fewer would put a
    sentence in the label's place. QQP rows that do not are skipped and counted, as run_glue skips
    them; in any other task they are an error naming the file and line."""
    need = max(c for c in (spec.a, spec.b, spec.y) if c is not None) + 1 + (spec.y < 0)  # y = -1: a column of its own
    rows, width, skipped = [], spec.width, 0
    with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC files start with a byte-order mark
        for ln, line in enumerate(csv.reader(f, delimiter="\t", quotechar=None), 1):
            if width is None:  # the header row
                if len(line) < need:
                    raise DataError(f"{path}:{ln}: header of {len(line)} tab-separated fields; a {spec.name} file "
                                    f"has at least {need} (text in columns {spec.a}, {spec.b}, label in {spec.y})")
                width = len(line)
                continue
            if len(line) != width:
                if spec.name == "QQP":
                    skipped += 1
                    continue
                raise DataError(f"{path}:{ln}: {len(line)} tab-separated fields; expected {width}, as "
                                f"{'in the header (line 1)' if spec.width is None else f'in every {spec.name} row'}")
            a, b, y = line[spec.a], (line[spec.b] if spec.b is not None else None), line[spec.y]
            if spec.labels is None:
                try:
                    y = float(y)
                except ValueError:
                    raise DataError(f"{path}:{ln}: {spec.name} label {y!r} is not a number") from None
            elif y not in spec.labels:
                raise DataError(f"{path}:{ln}: {spec.name} label {y!r} not in {spec.labels}")
            rows.append((a, b, y))
    if not rows:
        raise DataError(f"{path}: no {spec.name} data rows; expected the glue_data tsv layout "
                        f"({'a header row, then ' if spec.width is None else ''}one example per line)")
    if skipped:
        print(f"{path}: skipped {skipped} {spec.name} rows without {width} fields, as run_glue does", flush=True)
    return rows


def read_glue_hf(spec):
    """{split: rows} from the Hugging Face `datasets` GLUE loader (downloads: needs internet)."""
    import datasets
    try:
        dd = datasets.load_dataset("nyu-mll/glue", spec.hf)
    except Exception as e:
        raise SystemExit(f"--glue-source hf: loading GLUE {spec.name} ('nyu-mll/glue', '{spec.hf}') failed: "
                         f"{type(e).__name__}: {e}. This loader needs internet; without it, {WHERE['glue']}.") from e
    out = {}
    for split in ("train",) + spec.dev:
        ds = dd[HF_SPLIT[split]]
        names = getattr(ds.features["label"], "names", None)
        rows = []
        for x in ds:
            if spec.labels is None:
                y = float(x["label"])
            else:  # MNLI/QNLI/RTE names match glue_data's labels; binary tasks ('acceptable', ...) -> '0'/'1'
                y = names[x["label"]] if names and names[x["label"]] in spec.labels else str(x["label"])
            rows.append((x[spec.hf_a], x[spec.hf_b] if spec.hf_b else None, y))
        out[split] = rows
    return out


def no_data_root(task):
    """The error when neither --data-dir nor ../shared/data (lama.default_data_dir) exists."""
    return SystemExit(f"--task {task}: --data-dir not given and ../shared/data (next to this repository) does "
                      f"not exist. {WHERE[task]}.")


def find_data(args, subdirs, required):
    """First of --data-dir/<sub> (sub in subdirs) holding every required file; else a clear error."""
    root = args.data_dir or lama.default_data_dir()
    if root is None:
        raise no_data_root(args.task)
    tried = []
    for sub in subdirs:
        d = os.path.normpath(os.path.join(root, sub))
        if all(os.path.isfile(os.path.join(d, f)) for f in required):
            return d
        tried.append(d)
    raise SystemExit(f"--task {args.task}: no {', '.join(required)} in any of {tried} "
                     f"(--data-dir {args.data_dir}). {WHERE[args.task]}.")


def load_glue(cfg, spec):
    """{split: rows} for train and the task's dev files, from glue_data tsv or (--glue-source hf) the hub."""
    files = ("train.tsv",) + tuple(f"{s}.tsv" for s in spec.dev)
    root = cfg.data_dir or lama.default_data_dir()
    for sub in ("", "glue_data") if root else ():
        d = os.path.normpath(os.path.join(root, sub, spec.name))
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            return {f[:-4]: read_glue_tsv(os.path.join(d, f), spec) for f in files}, d
    if cfg.glue_source == "hf":
        return read_glue_hf(spec), f"hf:nyu-mll/glue/{spec.hf}"
    if root is None:
        raise no_data_root("glue")
    raise SystemExit(f"--task glue: {spec.name} needs {', '.join(files)} in {os.path.join(root, spec.name)} or "
                     f"{os.path.join(root, 'glue_data', spec.name)} (--data-dir {cfg.data_dir}). {WHERE['glue']}.")
