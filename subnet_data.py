"""The three sets a knowledge-critical subnetwork (subnetworks.py) is trained and judged on: TargetKG (facts
to remove), ControlKG (facts to keep) and ControlLM (text whose masked-LM predictions to keep), as
LAMA-format facts, a seeded split of them, text that states none of the targets, and their fixed batches.

How each set is drawn (flags of subnetworks.py; the measurements behind these choices are in
docs/subnetworks.md):
- TargetKG = facts the full model answers: the object at rank <= --known-k (default 1, i.e. P@1 = 1
  on TargetKG before removal), so suppression is measurable; drawn by --split-seed, the same for every
  mask seed (the paper also trains several seeds per TargetKG). With --target-relation, only facts
  of that relation. They are drawn as whole entity components of the known facts, never all of them
  (split_facts), so that ControlKG keeps known facts.
- ControlKG = the other facts that share no entity with TargetKG, as subject or object, in either
  role (this drops facts with the same subject, the same object, and inverse or symmetric
  restatements (P36/P1376, P47) of a target), and whose object the full model ranks <= 10
  (--control-known-k; 0 = any rank, the paper's "rest of the KG"), so that keeping its P@1 is
  measurable. Every other such fact is held out, and all ControlKG results use that half. Bayazit
  Eq. 3 trains on every other entity-disjoint fact, at any rank (--control-train any-rank; "known":
  only the other half of the rank <= 10 facts), with lambda_2 = 5.
- ControlLM = text that states none of the TargetKG facts (a line is dropped if it names both the
  subject and the object of a target, whole words, any case): --lm-text if given, else WikiText-2
  from --data-dir (valid.txt trains, test.txt evaluates), else the embedded default's held-out
  generic text (Lee / Wikipedia lines of data_mini's text pool that pre-training never saw), split in
  alternate lines. A fixed seeded 15% of the tokens of each sequence become [MASK]; the KL and the
  pseudo-perplexity are taken there (unmasked positions of a BERT input are copy tasks).
"""
import glob
import json
import os
import re

import numpy as np
import torch

import common
import data
import data_mini
import lama


# -----------------------------------------------------------------------------
# Facts: TargetKG and ControlKG

def read_facts(facts_dir, relations=None):
    """[{relation, sub, obj, template}] from <dir>/P*.jsonl (LAMA, {'sub_label','obj_label'}) or
    <dir>/P*/test.jsonl (label-only T-REx, {'sub','obj'}), templates from relations.jsonl in <dir>
    or its parent. Parsing is lama.py's LAMA reader (a malformed line names its file and line)."""
    rel_paths = [os.path.join(d, "relations.jsonl") for d in (facts_dir, os.path.dirname(os.path.normpath(facts_dir)))]
    rel_path = next((p for p in rel_paths if os.path.exists(p)), None)
    if rel_path is None:
        raise FileNotFoundError(f"--facts-dir {facts_dir}: no relations.jsonl there or in its parent "
                                f"(LAMA's data/relations.jsonl, lines {{'relation','template'}})")
    templates = lama.read_templates(rel_path)
    paths = sorted(glob.glob(os.path.join(facts_dir, "P*.jsonl")) +
                   glob.glob(os.path.join(facts_dir, "P*", "test.jsonl")))
    if not paths:
        raise FileNotFoundError(f"--facts-dir {facts_dir}: no P*.jsonl or P*/test.jsonl files")
    facts = []
    for path in paths:
        base = os.path.basename(path)
        rel = os.path.basename(os.path.dirname(path)) if base == "test.jsonl" else base[:-len(".jsonl")]
        if relations is not None and rel not in relations:
            continue
        if rel not in templates:
            raise ValueError(f"{path}: relation {rel} has no template in {rel_path}")
        template = templates[rel]["template"]
        facts += [dict(relation=rel, sub=f["sub_label"], obj=f["obj_label"], template=template)
                  for f in lama.read_lama_relation(path)]
    return facts


def fact_query(fact, tok):
    """(query text with the mask token at [Y], object token id or None if not a single token)."""
    prefix, suffix = fact["template"].replace("[X]", fact["sub"]).split("[Y]")
    lead = " " if prefix.endswith(" ") else ""  # byte-level BPE: the object token carries its space
    ids = tok(lead + fact["obj"], add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tok.unk_token_id:
        return None, None
    return prefix + tok.mask_token + suffix, ids[0]


def single_token_facts(facts, tok):
    out = []
    for f in facts:
        q, y = fact_query(f, tok)
        if q is not None:
            out.append(dict(f, query=q, obj_id=y))
    return out


def fact_batch(tok, facts):
    """Batch of queries: input_ids (N, T), attention_mask (N, T), pos = (rows, cols) of [MASK], labels (N,)."""
    enc = tok([f["query"] for f in facts], padding=True, return_tensors="pt")
    is_mask = enc["input_ids"] == tok.mask_token_id  # (N, T)
    bad = (is_mask.sum(1) != 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"fact query {facts[bad[0]]['query']!r}: expected exactly one mask token")
    rows, cols = is_mask.nonzero(as_tuple=True)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pos=(rows, cols),
                labels=torch.tensor([f["obj_id"] for f in facts]))


def entity_components(facts):
    """`facts` grouped into the connected components of their entity graph (two facts are linked when they
    share an entity, as subject or object, in either role), each in input order, components ordered by
    their first fact."""
    parent = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for f in facts:
        parent[root(f["sub"])] = root(f["obj"])
    groups = {}
    for f in facts:
        groups.setdefault(root(f["sub"]), []).append(f)
    return list(groups.values())


def split_facts(facts, ranks, seed, target_relation=None, target_size=25, control_size=400, known_k=1,
                control_known_k=None):
    """Seeded TargetKG / ControlKG split. TargetKG = up to target_size facts the full model answers
    (ranks[i] <= known_k; of target_relation only, if given), taken as whole entity components of those
    known facts (entity_components) in a seeded order: the first component (sampled down to target_size
    if larger), then each later one that fits, but never the last untaken one, so that known facts that
    share no entity with TargetKG remain for ControlKG (a random sample of known facts names the
    entities of nearly all of them: on the main command's checkpoint 25 of the 38 known facts have the
    object China). ControlKG = up to control_size of the other facts (of the other relations, with
    target_relation) that share no entity, as subject or object, with any TargetKG fact, and whose object
    ranks <= control_known_k under the full model (None: any rank). Returns (target, control)."""
    rng = np.random.default_rng(seed)
    pool = [f for f, r in zip(facts, ranks) if r <= known_k and (target_relation is None or f["relation"] == target_relation)]
    if not pool:
        where = f" of --target-relation {target_relation}" if target_relation else ""
        raise ValueError(f"no single-token fact{where} has its object at rank <= --known-k {known_k} under the "
                         f"full model: there is nothing known to suppress (train the model longer or raise --known-k)")
    comps = entity_components(pool)
    target, untaken = [], 0
    for n, i in enumerate(rng.permutation(len(comps))):
        c = comps[i]
        if not target:
            target = [c[j] for j in sorted(rng.permutation(len(c))[:target_size])]
        elif len(target) + len(c) <= target_size and untaken + len(comps) - n - 1 >= 1:
            target += c
        else:
            untaken += 1
    chosen = {id(f) for f in target}
    entities = {f["sub"] for f in target} | {f["obj"] for f in target}
    rest = [f for f, r in zip(facts, ranks) if id(f) not in chosen and f["sub"] not in entities and
            f["obj"] not in entities and (target_relation is None or f["relation"] != target_relation) and
            (control_known_k is None or r <= control_known_k)]
    control = [rest[i] for i in rng.permutation(len(rest))[:control_size]]
    if len(control) < 2:
        known = "" if control_known_k is None else f" or rank below --control-known-k {control_known_k}"
        raise ValueError(f"{len(control)} ControlKG facts left after choosing {len(target)} TargetKG facts and dropping "
                         f"facts that share an entity with them{known} (need >= 2: a training and a held-out half)")
    return target, control


def control_halves(control, anyrank=None):
    """(ControlKG training facts, held-out facts). The held-out half is every other fact of `control`; the
    training facts are the other half, or, given `anyrank` (the entity-disjoint facts at any rank), all of
    those not held out."""
    held = control[1::2]
    if anyrank is None:
        return control[0::2], held
    ids = {id(f) for f in held}
    return [f for f in anyrank if id(f) not in ids], held


# -----------------------------------------------------------------------------
# Text: ControlLM

def states_fact(text, fact):
    """True if `text` names both the subject and the object of `fact` (whole words, any case)."""
    return all(re.search(r"(?<!\w)" + re.escape(fact[k]) + r"(?!\w)", text, re.IGNORECASE) for k in ("sub", "obj"))


def drop_stating(texts, facts):
    """The texts that state none of `facts` (states_fact)."""
    return [t for t in texts if not any(states_fact(t, f) for f in facts)]


def heldout_generic_text(data_root):
    """Lines of the embedded default's real-text pool (data_mini.text_pool, same seed) that its
    corpus does not contain: generic English the pre-trained model never saw."""
    kg_dir, corpus = data.resolve_data("mini", data_root)
    with open(os.path.join(os.path.dirname(kg_dir), "manifest.json")) as f:
        seed = json.load(f)["seed"]
    seen = "\n".join(rec["text"] for _, rec in common.read_jsonl(corpus))
    pool = [t for _, t in data_mini.text_pool(data_mini._rng(seed)("chunks"))]
    # a line is unseen if none of its sentences occurs in the corpus (duplicates across documents)
    return [t for t in dict.fromkeys(pool) if not any(s in seen for s in data_mini.split_sentences(t))]


def read_lm_texts(lm_text, data_dir, data_root):
    """(train texts, eval texts, source). --lm-text (a WikiText-2 dir or a text file), else
    <data-dir>/wikitext-2 when present, else the embedded default's held-out generic text; a dir has
    valid.txt (trains) and test.txt (evaluates), a file or the generic text is split in alternate lines."""
    if lm_text is None and data_dir is not None and os.path.isdir(os.path.join(data_dir, "wikitext-2")):
        lm_text = os.path.join(data_dir, "wikitext-2")
    if lm_text is None:
        lines = heldout_generic_text(data_root)
        return lines[0::2], lines[1::2], "embedded default: held-out generic text"
    if os.path.isdir(lm_text):
        def wiki(name):
            path = os.path.join(lm_text, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"--lm-text {lm_text}: missing {name} (WikiText-2 raw layout: valid.txt, test.txt)")
            with open(path) as f:  # drop blank lines and ' = Heading = ' lines
                return [l.strip() for l in f if l.strip() and not l.strip().startswith("=")]
        return wiki("valid.txt"), wiki("test.txt"), lm_text
    if not os.path.exists(lm_text):
        raise FileNotFoundError(f"--lm-text {lm_text}: no such file or directory")
    with open(lm_text) as f:
        lines = [l.strip() for l in f if l.strip()]
    return lines[0::2], lines[1::2], lm_text


def lm_batch(tok, texts, seq_len, n_seqs, mask_prob, seed):
    """Fixed masked-LM sequences: texts are tokenised, concatenated and cut into n_seqs chunks of
    seq_len; a seeded mask_prob of the tokens (at least one per sequence) become the mask token.
    Returns input_ids (N, T), attention_mask (N, T), pos, labels (M,)."""
    ids, body = [], seq_len - 2
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= body * n_seqs:
            break
    n = min(n_seqs, len(ids) // body)
    if n == 0:
        raise ValueError(f"ControlLM text has {len(ids)} tokens, fewer than one sequence of {body}")
    x = torch.tensor(ids[:n * body]).view(n, body)  # (N, T-2)
    cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    x = torch.cat([torch.full((n, 1), cls), x, torch.full((n, 1), sep)], 1)  # (N, T)
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(n, seq_len, generator=g) < mask_prob
    sel[:, 0] = sel[:, -1] = False
    sel[torch.arange(n), 1 + torch.randint(body, (n,), generator=g)] = True
    rows, cols = sel.nonzero(as_tuple=True)
    labels = x[rows, cols].clone()
    x[rows, cols] = tok.mask_token_id
    return dict(input_ids=x, attention_mask=torch.ones_like(x), pos=(rows, cols), labels=labels)


# -----------------------------------------------------------------------------
# Batches

def sub_batch(batch, idx):
    """Rows idx (sorted LongTensor) of a fact_batch or lm_batch (or of subnetworks.cache_lower's, whose
    cached tensors are sliced alike), with its scored positions."""
    rows, cols = batch["pos"]
    keep = torch.isin(rows, idx)
    remap = torch.full((batch["input_ids"].shape[0],), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    out = dict(batch, pos=(remap[rows[keep]], cols[keep]), labels=batch["labels"][keep])
    for k in ("input_ids", "attention_mask", "hidden", "layer_mask"):
        if isinstance(batch.get(k), torch.Tensor):
            out[k] = batch[k][idx]
    if "ref" in batch:
        out["ref"] = batch["ref"][keep]
    return out
