"""LAMA / LAMA-UHN knowledge probing (TRELM Sec. 4.2, Tables 1-2): the LAMA readers, the fact filters,
batched mask-position ranking, P@k / MRR, the LAMA-UHN filters, and the probing tasks that evaluate.py
(the CLI) dispatches to:

    python evaluate.py --task lama      --model-dir D [--data-dir DIR] [--output-dir results]
    python evaluate.py --task lama-uhn  --model-dir D [--uhn-filter-model bert-base-cased|self|M]
    python evaluate.py --task mini      --model-dir D      # probes of the embedded default data

Tasks (TASKS): lama (Google-RE and T-REx, one results file, as in Table 1), google-re, trex, lama-uhn
(both corpora after the LAMA-UHN filters), mini (seen vs held-out facts of `--data mini`).
subnet_data.py (subnetworks) reads its facts with this file's readers; experiments.py probes its runs through TASKS.
A malformed line of any LAMA file raises common.DataError naming the file, the line and what was expected.
Results record their paths (flags, the files read) as common.portable_path writes them: relative to the
repository, or '../shared/data/...' for the data root, absolute only for places elsewhere.

LAMA protocol (Petroni et al. 2019, their scripts/batch_eval_KB_completion.py and
run_experiments.py, re-implemented here):
  * one cloze query per distinct (subject, object) of a relation: the relation's template with
    [X] -> subject label and [Y] -> the mask token (T-REx templates from lama/relations.jsonl,
    Google-RE templates in GOOGLE_RE_TEMPLATES);
  * Google-RE keeps a fact unless its non-"yes" judgments outnumber its "yes" judgments (LAMA
    counts "no" and "skip" alike; a tie is kept, as in LAMA);
  * an object is kept only if it is a single token of the model's vocabulary (byte-level BPE
    models: the token with its leading space, "Ġ"+obj) and is in LAMA's common vocabulary;
  * scores are ranked only over the common vocabulary intersected with the model's vocabulary;
  * uncased models (the tokenizer lowercases) get lowercased labels and the lowercased common
    vocabulary (common_vocab_lowercased.txt if present, else common_vocab_cased.txt lowercased).
T-REx: the full LAMA file TREx/P*.jsonl where present, else the label-only
TREx_labels/P*/test.jsonl ({"sub", "obj"}); the results say which file served each relation.

LAMA-UHN (Poerner et al. 2020, LAMA's scripts/create_lama_uhn.py, re-implemented here): drop a
fact when (string filter) its lowercased object label is a substring of its lowercased subject
label, or (person-name filter, person relations only) the filter model ranks the object among its
top-3 full-vocabulary predictions for "[X] is a common name in the following NOUN : [MASK] ." for
any whitespace-separated part X of the subject label (NOUN: city for P19, P20, place_of_birth,
place_of_death; country for P27; language for P103, P1412). The filtered files are written in
LAMA's format to <output-dir>/lama_uhn/{TREx,Google_RE}/ and then probed like LAMA. The filter
model is --uhn-filter-model: bert-base-cased by default, as in the paper, so every evaluated model
is scored on the same subset (it must be available locally: this code never downloads); `self`
filters with the evaluated model instead, and the subset then depends on the model.

Drop reasons, counted per relation in the results (first that applies): judgments (Google-RE),
multi_token (not one token of the model's vocabulary), not_in_common_vocab, duplicate (same
subject and object after lowercasing for uncased models).

Symbols -> code:
  s_c                         MLM logit of candidate c at the mask position (score_ranks)
  rank r of the gold object   rank_of(): r = 1 + #{candidates c : s_c > s_gold}  (ties optimistic)
  P@k                         mean over facts of [r <= k]           (k = 1 headline, k = 10)
  MRR                         mean over facts of 1 / r              (exact: no top-5000 cut-off)
  corpus score                macro average over relations with at least one kept fact
"""
import json
import os
import re
import time
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data

LAMA_URL = "https://dl.fbaipublicfiles.com/LAMA/data.zip"
COMMON_VOCAB_URL = ("https://github.com/princeton-nlp/OptiPrompt (common_vocabs/common_vocab_cased.txt), "
                    "or build it with LAMA's lama/vocab_intersection.py")
LAMA_LAYOUT = """expected layout (DIR is --data-dir):
  DIR/lama/relations.jsonl                     T-REx relations and templates (LAMA data.zip: data/relations.jsonl)
  DIR/lama/TREx/P*.jsonl                       T-REx facts (data.zip: data/TREx/)
  DIR/lama/TREx_labels/P*/test.jsonl           optional: label-only {"sub","obj"} files for relations without TREx/P*.jsonl
  DIR/lama/Google_RE/*_test.jsonl              Google-RE facts (data.zip: data/Google_RE/)
  DIR/lama/common_vocabs/common_vocab_cased.txt   LAMA's common vocabulary
Get the facts from %s (unzip; move data/* into DIR/lama/) and the common vocabulary from %s.""" % (
    LAMA_URL, COMMON_VOCAB_URL)

MASK = "[MASK]"  # LAMA's generic mask; replaced by the model's own mask token when probing
GOOGLE_RE_TEMPLATES = {  # LAMA scripts/run_experiments.py get_GoogleRE_parameters()
    "place_of_birth": "[X] was born in [Y] .",
    "date_of_birth": "[X] (born [Y]).",
    "place_of_death": "[X] died in [Y] .",
}
UHN_NAME_TEMPLATE = "[X] is a common name in the following {noun} : [MASK] ."  # Poerner et al. 2020
UHN_PLACE_NOUNS = {"P19": "city", "P20": "city", "P27": "country", "P1412": "language", "P103": "language",
                   "place_of_birth": "city", "place_of_death": "city"}
PROBE_BATCH_SIZE = 64  # queries per forward pass when --batch-size is not given
DROP_REASONS = ("judgments", "multi_token", "not_in_common_vocab", "duplicate")


# -----------------------------------------------------------------------------
# Reading LAMA files

def fill_template(template, sub, mask=MASK):
    """LAMA's cloze query: [X] -> subject label, [Y] -> the mask token."""
    return template.replace("[X]", sub.strip()).replace("[Y]", mask)


def read_lama_relation(path, template=None):
    """Facts of one relation file in LAMA's format ({"sub_label", "obj_label", ...}) or the
    label-only format ({"sub", "obj"}). Returns a list of dicts, each with the file's own fields,
    "sub_label" and "obj_label" always set, and "masked_sentence" (template filled with the
    generic "[MASK]") when a template is given. Google-RE's "judgments", when present, must be a
    list of objects (judgment_ok reads their "judgment")."""
    facts = []
    for n, rec in common.read_jsonl(path):
        if "sub_label" in rec and "obj_label" in rec:
            fact = dict(rec)
        elif "sub" in rec and "obj" in rec and "sub_label" not in rec:
            fact = {k: v for k, v in rec.items() if k not in ("sub", "obj")}
            fact.update(sub_label=rec["sub"], obj_label=rec["obj"])
        else:
            raise common.DataError(f"{path}:{n}: expected 'sub_label' and 'obj_label' (LAMA format) or "
                                   f"'sub' and 'obj' (label-only format); found keys {sorted(rec)}")
        if not isinstance(fact["sub_label"], str) or not isinstance(fact["obj_label"], str):
            raise common.DataError(f"{path}:{n}: expected string subject and object labels; found "
                                   f"{fact['sub_label']!r} and {fact['obj_label']!r}")
        judgments = fact.get("judgments")
        if judgments is not None and not (isinstance(judgments, list) and all(isinstance(j, dict) for j in judgments)):
            raise common.DataError(f"{path}:{n}: expected 'judgments' to be a list of objects "
                                   f"({{\"judgment\": \"yes\", ...}}); found {judgments!r:.60}")
        if template is not None:
            fact["masked_sentence"] = fill_template(template, fact["sub_label"])
        facts.append(fact)
    return facts


def read_templates(path):
    """{relation id: record} from a LAMA relations.jsonl; every template must be a string holding [X] and [Y]."""
    out = {}
    for n, rec in common.read_jsonl(path):
        if "relation" not in rec or "template" not in rec:
            raise common.DataError(f"{path}:{n}: expected 'relation' and 'template'; found keys {sorted(rec)}")
        if not isinstance(rec["relation"], str) or not isinstance(rec["template"], str):
            raise common.DataError(f"{path}:{n}: expected a string 'relation' and 'template'; found "
                                   f"{rec['relation']!r} and {rec['template']!r}")
        if "[X]" not in rec["template"] or "[Y]" not in rec["template"]:
            raise common.DataError(f"{path}:{n}: template {rec['template']!r} must contain [X] and [Y]")
        out[rec["relation"]] = rec
    return out


def judgment_ok(fact):
    """Google-RE (LAMA's rule): drop a fact whose non-"yes" judgments outnumber its "yes" ones."""
    judgments = fact.get("judgments")
    if not judgments:
        return True
    yes = sum(j.get("judgment") == "yes" for j in judgments)
    return len(judgments) - yes <= yes


def default_data_dir():
    """../shared/data relative to this repository, or None."""
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared", "data")
    return d if os.path.isdir(d) else None


def lama_root(data_dir):
    """DIR/lama after checking it exists; otherwise an error naming the path and the layout."""
    if data_dir is None:
        raise common.DataError("--data-dir not given and ../shared/data (next to this repository) does not "
                               "exist; LAMA probing needs the LAMA files.\n" + LAMA_LAYOUT +
                               "\n(`--task mini` probes the embedded default data and needs no files.)")
    root = os.path.join(data_dir, "lama")
    if not os.path.isdir(root):
        raise common.DataError(f"--data-dir {data_dir}: {root} does not exist.\n" + LAMA_LAYOUT)
    return root


def lama_relations(root, corpus):
    """[(corpus, relation, template, path, format)] for 'T-REx' or 'Google-RE' under a LAMA root,
    plus the relations listed without any file. format: 'full' (LAMA file) or 'labels'."""
    rels, missing = [], []
    if corpus == "Google-RE":
        for name, template in GOOGLE_RE_TEMPLATES.items():
            path = os.path.join(root, "Google_RE", f"{name}_test.jsonl")
            if os.path.exists(path):
                rels.append(("Google-RE", name, template, path, "full"))
            else:
                missing.append(name)
    elif corpus == "T-REx":
        templates = read_templates(os.path.join(root, "relations.jsonl"))
        for rel, rec in templates.items():
            full = os.path.join(root, "TREx", f"{rel}.jsonl")
            labels = os.path.join(root, "TREx_labels", rel, "test.jsonl")
            if os.path.exists(full):
                rels.append(("T-REx", rel, rec["template"], full, "full"))
            elif os.path.exists(labels):
                rels.append(("T-REx", rel, rec["template"], labels, "labels"))
            else:
                missing.append(rel)
    else:
        raise ValueError(f"unknown LAMA corpus {corpus!r} (expected 'T-REx' or 'Google-RE')")
    if not rels:
        where = os.path.join(root, "Google_RE" if corpus == "Google-RE" else "TREx")
        raise common.DataError(f"{where}: no {corpus} relation file found.\n" + LAMA_LAYOUT)
    return rels, missing


def common_vocab_path(root, uncased):
    """(path, lowercase_it): the lowercased common vocabulary for uncased models if shipped, else
    the cased one (lowercased in memory for uncased models)."""
    d = os.path.join(root, "common_vocabs")
    lower = os.path.join(d, "common_vocab_lowercased.txt")
    cased = os.path.join(d, "common_vocab_cased.txt")
    if uncased and os.path.exists(lower):
        return lower, False
    if not os.path.exists(cased):
        raise common.DataError(f"{cased}: file not found (LAMA's common vocabulary).\n" + LAMA_LAYOUT)
    return cased, uncased


def read_vocab(path, lowercase=False):
    with open(path, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip()]
    return list(dict.fromkeys(w.lower() for w in words)) if lowercase else words


# -----------------------------------------------------------------------------
# The model's view of the vocabulary

def is_uncased(tokenizer):
    """True if the tokenizer lowercases its input (uncased BERT), detected by behaviour."""
    return tokenizer.tokenize("The Paris Hello") == tokenizer.tokenize("the paris hello")


def space_prefix(tokenizer):
    """' ' for byte-level BPE tokenizers whose word tokens carry their leading space (RoBERTa's
    'Ġ'), '' for WordPiece."""
    a = tokenizer.convert_ids_to_tokens(tokenizer(" the", add_special_tokens=False)["input_ids"])
    b = tokenizer.convert_ids_to_tokens(tokenizer("the", add_special_tokens=False)["input_ids"])
    return " " if a != b else ""


class Candidates:
    """The words a probe ranks over, as model token ids.

    words=None: every non-special token of the model's vocabulary. Otherwise the given words
    (LAMA's common vocabulary), each kept only if it is one token of the model's vocabulary
    (with the leading space for BPE models) that decodes back to the word itself."""

    def __init__(self, tokenizer, words=None, source="full model vocabulary"):
        self.tokenizer = tokenizer
        self.uncased = is_uncased(tokenizer)
        self.prefix = space_prefix(tokenizer)
        self.source = source
        self.words = None if words is None else set(self.norm(w) for w in words)
        if words is None:
            special = set(tokenizer.all_special_ids)
            ids = [i for i in range(len(tokenizer)) if i not in special]
        else:
            ids = sorted({i for i in self.token_ids(sorted(self.words)) if i is not None})
        self.ids = torch.tensor(ids, dtype=torch.long)  # (C,)
        self.position = {t: p for p, t in enumerate(ids)}

    def norm(self, word):
        return word.lower() if self.uncased else word

    def token_ids(self, words):
        """Model token id of each word if it is a single token that decodes to the word, else None."""
        if not words:
            return []
        enc = self.tokenizer([self.prefix + w for w in words], add_special_tokens=False)["input_ids"]
        out = []
        for w, ids in zip(words, enc):
            ok = len(ids) == 1 and self.tokenizer.decode(ids, clean_up_tokenization_spaces=False) == self.prefix + w
            out.append(ids[0] if ok else None)
        return out

    def locate(self, objects):
        """Position in self.ids of each (normalised) object label, or the reason it is dropped."""
        out = []
        for obj, tid in zip(objects, self.token_ids(objects)):
            if tid is None:
                out.append("multi_token")
            elif self.words is not None and obj not in self.words:
                out.append("not_in_common_vocab")
            elif tid not in self.position:  # full-vocabulary mode: a special token
                out.append("multi_token")
            else:
                out.append(self.position[tid])
        return out


def prepare_facts(facts, cands):
    """LAMA's fact filter for one relation. facts: dicts with sub_label/obj_label (and judgments
    for Google-RE). Returns (kept [(sub, obj, candidate position, fact)], counts) where counts
    has 'read', 'kept' and one entry per DROP_REASONS."""
    counts = Counter(read=len(facts), **{r: 0 for r in DROP_REASONS})
    judged = [f for f in facts if judgment_ok(f)]
    counts["judgments"] = len(facts) - len(judged)
    subs = [cands.norm(f["sub_label"]) for f in judged]
    objs = [cands.norm(f["obj_label"]) for f in judged]
    kept, seen = [], set()
    for sub, obj, pos, fact in zip(subs, objs, cands.locate(objs), judged):
        if isinstance(pos, str):
            counts[pos] += 1
        elif (sub, obj) in seen:
            counts["duplicate"] += 1
        else:
            seen.add((sub, obj))
            kept.append((sub, obj, pos, fact))
    counts["kept"] = len(kept)
    return kept, dict(counts)


# -----------------------------------------------------------------------------
# Batched masked-position inference

def mask_hidden(model, tokenizer, texts, batch_size, desc="probe"):
    """Yield (indices, h (B, H)): the last hidden state at the single mask token of each text,
    batches of texts of similar token length (sorted), in inference mode."""
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    for i, ids in enumerate(enc):
        if ids.count(mask_id) != 1:
            raise ValueError(f"{desc}: query {texts[i]!r} has {ids.count(mask_id)} mask tokens, expected 1")
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False,
                          mininterval=2.0):
            idx = order[start:start + batch_size]
            T = max(len(enc[i]) for i in idx)
            input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # (B, T)
            attention = torch.zeros((len(idx), T), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                input_ids[row, :len(enc[i])] = torch.tensor(enc[i])
                attention[row, :len(enc[i])] = 1
            input_ids, attention = input_ids.to(device), attention.to(device)
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state  # (B, T, H)
            rows, cols = (input_ids == mask_id).nonzero(as_tuple=True)  # one mask per row, rows in order
            yield idx, hidden[rows, cols]  # (B, H)


def rank_of(scores, target):
    """rank = 1 + number of candidates scored strictly higher than the gold one (ties count in the
    gold's favour). scores (N, C), target (N,) candidate positions -> (N,) long."""
    gold = scores.gather(1, target[:, None])  # (N, 1)
    return 1 + (scores > gold).sum(1)


def rank_metrics(ranks):
    """P@1, P@10 and MRR of a 1-D tensor of ranks (empty -> None values)."""
    if len(ranks) == 0:
        return {"P@1": None, "P@10": None, "MRR": None, "facts": 0}
    r = ranks.double()
    return {"P@1": (r <= 1).double().mean().item(), "P@10": (r <= 10).double().mean().item(),
            "MRR": (1.0 / r).mean().item(), "facts": len(ranks)}


def score_ranks(model, tokenizer, queries, targets, cands, batch_size, desc="probe"):
    """Rank of each target (candidate position) among cands for each query. The MLM head runs on
    the mask positions only, against the decoder rows of the candidates: (B, H) -> (B, C)."""
    w_dec, b_dec = common.head_decoder(model)
    ids = cands.ids.to(w_dec.device)
    with torch.inference_mode():
        w_c, b_c = w_dec[ids], b_dec[ids]  # (C, H), (C,)
    target = torch.tensor(targets, dtype=torch.long)
    ranks = torch.zeros(len(queries), dtype=torch.long)
    for idx, h in mask_hidden(model, tokenizer, queries, batch_size, desc):
        scores = F.linear(common.head_transform(model, h), w_c, b_c)  # (B, C)
        ranks[idx] = rank_of(scores, target[idx].to(scores.device)).cpu()
    return ranks


# -----------------------------------------------------------------------------
# Probing a set of relation files

def probe_relations(model, tokenizer, relations, cands, batch_size, split_field=None, desc="probe"):
    """Probe every relation (list of (corpus, name, template, path, format)) in one sorted batched
    pass. Returns {corpus: {"per_relation": {name: metrics}, "counts": {name: counts}}}; with
    split_field, metrics are per value of that field ({name: {split: metrics}})."""
    queries, targets, owners = [], [], []
    out = {}
    for corpus, name, template, path, fmt in relations:
        facts = read_lama_relation(path)
        kept, counts = prepare_facts(facts, cands)
        counts.update(source=common.portable_path(path), format=fmt)
        out.setdefault(corpus, {"per_relation": {}, "counts": {}})["counts"][name] = counts
        for sub, obj, pos, fact in kept:
            split = fact.get(split_field, "all") if split_field else "all"
            queries.append(fill_template(template, sub, tokenizer.mask_token))
            targets.append(pos)
            owners.append((corpus, name, split))
    ranks = score_ranks(model, tokenizer, queries, targets, cands, batch_size, desc) if queries else torch.zeros(0)
    groups = {}
    for r, key in zip(ranks.tolist(), owners):
        groups.setdefault(key, []).append(r)
    for corpus, name, template, path, fmt in relations:
        splits = sorted({k[2] for k in groups if k[:2] == (corpus, name)}) if split_field else ["all"]
        m = {s: rank_metrics(torch.tensor(groups.get((corpus, name, s), []), dtype=torch.long)) for s in splits}
        out[corpus]["per_relation"][name] = m if split_field else m["all"]
    return out


def macro(per_relation):
    """Macro average over relations with at least one kept fact, plus micro P@1."""
    rows = [m for m in per_relation.values() if m["facts"]]
    n = sum(m["facts"] for m in rows)
    res = {k: (sum(m[k] for m in rows) / len(rows) if rows else None) for k in ("P@1", "P@10", "MRR")}
    res["P@1_micro"] = sum(m["P@1"] * m["facts"] for m in rows) / n if n else None
    res.update(relations=len(rows), facts=n)
    return res


def summary(m):
    """One line of a macro() result."""
    num = lambda k: "n/a" if m[k] is None else f"{m[k]:.4f}"
    return (f"P@1 {num('P@1')}  P@10 {num('P@10')}  MRR {num('MRR')}  "
            f"({m['relations']} relations, {m['facts']} facts)")


def total_counts(counts):
    t = Counter()
    for c in counts.values():
        t.update({k: v for k, v in c.items() if isinstance(v, int)})
    return dict(t)


# -----------------------------------------------------------------------------
# LAMA-UHN filters

def uhn_string_match(fact):
    """String filter: True (drop) when the lowercased object is a substring of the lowercased subject."""
    return fact["obj_label"].lower() in fact["sub_label"].lower()


def uhn_name_matches(model, tokenizer, facts, noun, top_k, batch_size):
    """Person-name filter: for each fact, True (drop) when the object is among the model's top_k
    full-vocabulary predictions for UHN_NAME_TEMPLATE with X = any whitespace part of the subject."""
    cands = Candidates(tokenizer)  # only for normalisation and single-token lookup
    template = UHN_NAME_TEMPLATE.format(noun=noun)
    names = sorted({n for f in facts for n in cands.norm(f["sub_label"]).split()})
    queries = [fill_template(template, n, tokenizer.mask_token) for n in names]
    top = {}
    for idx, h in mask_hidden(model, tokenizer, queries, batch_size, desc=f"uhn {noun}"):
        best = common.mlm_logits(model, h).topk(top_k, dim=1).indices.cpu()  # (B, k)
        for row, i in enumerate(idx):
            top[names[i]] = set(best[row].tolist())
    obj_ids = cands.token_ids([cands.norm(f["obj_label"]) for f in facts])
    return [tid is not None and any(tid in top[n] for n in cands.norm(f["sub_label"]).split())
            for f, tid in zip(facts, obj_ids)]


def write_jsonl(path, records):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    common.atomic_write(path, write)


def build_lama_uhn(relations, out_root, filter_model, filter_tok, top_k, batch_size):
    """Apply both LAMA-UHN filters to each relation file and write the survivors in LAMA's format to
    out_root/TREx/<rel>.jsonl and out_root/Google_RE/<rel>_test.jsonl. Label-only records become
    {"sub_label", "obj_label", "predicate_id"}. Returns (relations pointing at the new files, counts)."""
    new_rels, counts = [], {}
    for corpus, name, template, path, fmt in relations:
        facts = read_lama_relation(path)
        for f in facts:
            if fmt == "labels":
                f.setdefault("predicate_id", name)
        string_hit = [uhn_string_match(f) for f in facts]
        rest = [f for f, hit in zip(facts, string_hit) if not hit]
        noun = UHN_PLACE_NOUNS.get(name)
        name_hit = (uhn_name_matches(filter_model, filter_tok, rest, noun, top_k, batch_size)
                    if noun and rest else [False] * len(rest))
        kept = [f for f, hit in zip(rest, name_hit) if not hit]
        sub = "Google_RE" if corpus == "Google-RE" else "TREx"
        fname = f"{name}_test.jsonl" if corpus == "Google-RE" else f"{name}.jsonl"
        out = os.path.join(out_root, sub, fname)
        write_jsonl(out, kept)
        counts.setdefault(corpus, {})[name] = {"read": len(facts), "string_match": sum(string_hit),
                                              "person_name": sum(name_hit), "kept": len(kept)}
        new_rels.append((corpus, name, template, out, "full"))
    return new_rels, counts


# -----------------------------------------------------------------------------
# Tasks

def load_model(args):
    model, tok = common.load_mlm(args.model_dir, flag="--model-dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


def lama_candidates(args, root, tok):
    if args.vocab == "full":
        return Candidates(tok)
    path, lower = common_vocab_path(root, is_uncased(tok))
    return Candidates(tok, read_vocab(path, lower),
                      source=common.portable_path(path) + (" (lowercased)" if lower else ""))


PATH_FLAGS = ("model_dir", "model_path", "data_dir", "output_dir", "probe_dir", "mini_root", "uhn_filter_model")


def probe_config(args, cands, **extra):
    """The config a probing results file records (common.recorded_config: paths among PATH_FLAGS made
    portable, a hub id or 'self' as given): every flag, the resolved model path, the candidates, `extra`."""
    return common.recorded_config(args, PATH_FLAGS, model_path=common.resolve_model(args.model_dir, "--model-dir"),
                                  candidates=cands.source, num_candidates=len(cands.ids), uncased=cands.uncased,
                                  rank="1 + #candidates with a strictly higher score (ties optimistic)", **extra)


def run_probe_task(args, task, corpora, uhn=False):
    """Probe the given LAMA corpora ('Google-RE', 'T-REx'); write <output-dir>/<task>.json."""
    root = lama_root(args.data_dir)
    relations, missing = [], {}
    for corpus in corpora:
        rels, miss = lama_relations(root, corpus)
        relations += rels
        missing[corpus] = miss
    if args.batch_size is None:
        args.batch_size = PROBE_BATCH_SIZE
    model, tok = load_model(args)
    cands = lama_candidates(args, root, tok)
    extra = {}
    if uhn:
        f_model, f_tok = model, tok
        if args.uhn_filter_model != "self":
            try:
                f_model, f_tok = common.load_mlm(args.uhn_filter_model, flag="--uhn-filter-model")
            except SystemExit as e:
                raise SystemExit(f"{e}\n(--uhn-filter-model is LAMA-UHN's person-name filter; Poerner et al. used "
                                 f"bert-base-cased.) Or pass --uhn-filter-model self "
                                 f"to filter with the evaluated model (the subset then differs per model).") from e
            f_model = f_model.to(next(model.parameters()).device).eval()
        out_root = os.path.join(args.output_dir, "lama_uhn")
        relations, extra["uhn_counts"] = build_lama_uhn(relations, out_root, f_model, f_tok,
                                                        args.uhn_top_k, args.batch_size)
        extra["uhn_dir"] = common.portable_path(out_root)
    t0 = time.time()
    res = probe_relations(model, tok, relations, cands, args.batch_size, desc=task)
    seconds = time.time() - t0
    metrics = {c: macro(res[c]["per_relation"]) for c in corpora}
    counts = {c: dict(res[c]["counts"], total=total_counts(res[c]["counts"])) for c in corpora}
    config = probe_config(args, cands, bpe_space_prefix=bool(cands.prefix))
    path = common.write_result(args.output_dir, task, config["model_dir"], config, args.seed, metrics,
                               per_relation={c: res[c]["per_relation"] for c in corpora},
                               counts=counts, missing_relations=missing, seconds=round(seconds, 1), **extra)
    for c in corpora:
        print(f"{task} {c}: {summary(metrics[c])}  ({seconds:.0f}s)")
    print(f"wrote {path}")
    return path


def mini_probe_dir(args):
    """The probes/ folder of the embedded default data (`--data mini`, built if missing)."""
    if args.probe_dir:
        return args.probe_dir
    kg_dir, _ = data.resolve_data("mini", args.mini_root)
    return os.path.join(os.path.dirname(kg_dir), "probes")


def run_mini(args):
    """Probe the embedded default's facts; P@1 for seen and held-out facts and their gap."""
    probes = mini_probe_dir(args)
    templates = read_templates(os.path.join(probes, "relations.jsonl"))
    relations = [("mini", rel, rec["template"], os.path.join(probes, f"{rel}.jsonl"), "full")
                 for rel, rec in templates.items() if os.path.exists(os.path.join(probes, f"{rel}.jsonl"))]
    if not relations:
        raise common.DataError(f"{probes}: no P*.jsonl file for any relation of relations.jsonl")
    if args.batch_size is None:
        args.batch_size = PROBE_BATCH_SIZE
    model, tok = load_model(args)
    cands = Candidates(tok)
    t0 = time.time()
    res = probe_relations(model, tok, relations, cands, args.batch_size, split_field="split", desc="mini")["mini"]
    splits = sorted({s for m in res["per_relation"].values() for s in m})
    metrics = {s: macro({r: m[s] for r, m in res["per_relation"].items() if s in m}) for s in splits}
    if "seen" in metrics and "heldout" in metrics and metrics["seen"]["P@1"] is not None \
            and metrics["heldout"]["P@1"] is not None:
        metrics["gap_P@1"] = metrics["seen"]["P@1"] - metrics["heldout"]["P@1"]
    config = probe_config(args, cands, probe_dir=probes)
    path = common.write_result(args.output_dir, "mini", config["model_dir"], config, args.seed, metrics,
                               per_relation=res["per_relation"], seconds=round(time.time() - t0, 1),
                               counts=dict(res["counts"], total=total_counts(res["counts"])))
    for s in splits:
        print(f"mini {s}: {summary(metrics[s])}")
    if "gap_P@1" in metrics:
        print(f"mini seen - heldout P@1 gap: {metrics['gap_P@1']:.4f}")
    print(f"wrote {path}")
    return path


TASKS = {
    "lama": lambda args: run_probe_task(args, "lama", ["Google-RE", "T-REx"]),
    "google-re": lambda args: run_probe_task(args, "google-re", ["Google-RE"]),
    "trex": lambda args: run_probe_task(args, "trex", ["T-REx"]),
    "lama-uhn": lambda args: run_probe_task(args, "lama-uhn", ["Google-RE", "T-REx"], uhn=True),
    "mini": run_mini,
}


def add_args(parser):
    """Flags of the probing tasks (this file's TASKS); evaluate.py owns --task, --model-dir, --data-dir,
    --output-dir, --seed and --batch-size."""
    g = parser.add_argument_group("probing (lama, google-re, trex, lama-uhn, mini)")
    g.add_argument("--vocab", choices=["common", "full"], default=None,
                   help="rank over LAMA's common vocabulary (LAMA tasks' default) or the full model "
                        "vocabulary (mini's default: the embedded data has no common vocabulary)")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g.add_argument("--uhn-filter-model", default="bert-base-cased",
                   help="model of the LAMA-UHN person-name filter: a model dir or hub id (Poerner et al. "
                        "used bert-base-cased, so every evaluated model sees the same subset), or 'self' "
                        "for the model being evaluated")
    g.add_argument("--uhn-top-k", type=int, default=3, help="person-name filter: drop if object in top-k")
    g.add_argument("--probe-dir", default=None, help="mini: a probes/ folder (default: data.mini_dir's)")
    g.add_argument("--mini-root", default=None,
                   help="mini: where `--data mini` is built (default: data_cache/ beside the code, as pretrain.py)")


def check(args):
    """This file's flags (evaluate.main calls it before any data is read): one line naming the flag."""
    if args.uhn_top_k < 1:
        raise SystemExit(f"--uhn-top-k: expected an integer >= 1, got {args.uhn_top_k}")
    if args.task == "mini" and args.vocab == "common":
        raise SystemExit("--task mini --vocab common: the embedded data ships no common vocabulary; "
                         "mini ranks over the full model vocabulary (--vocab full)")
    device = args.device or "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available here; expected cpu")
    common.resolve_model(args.model_dir, "--model-dir")
