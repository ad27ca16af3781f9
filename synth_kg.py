"""Synthetic Wikidata5M-shaped knowledge graph and corpus, seeded, for measuring the pipeline at scale
without the real files (TRELM Sec. 4.1 uses Wikidata5M and 26M Wikipedia sequences).

    python synth_kg.py --out runs/synth10 --scale 0.1                 # 1/10 Wikidata5M: 309k entities, 2.1M triples
    python synth_kg.py --out runs/synth100 --scale 0.01 --docs 20000   # 1/100, with a 20k-document corpus
    python synth_kg.py --out D --scale 0.01 --linked                   # corpus.jsonl with given spans, not corpus.txt
    python pretrain.py --data runs/synth100 ...                        # any DIR it writes is a --data DIR
    python synth_kg.py --out runs/synth10 --scale 0.1 --docs 20000 --measure --num-proc 2
    python synth_kg.py --out DIR --measure-only                        # measure any --data DIR (mini, Wikidata5M)

Writes DIR/kg/{entities,relations,triples}.txt in Wikidata5M's layout (see data.py) and DIR/corpus.txt
(raw text, linked by kg.AliasLinker) or DIR/corpus.jsonl (spans given), plus DIR/synth.json (the
arguments and counts). The same arguments and seed write byte-identical files.

Shape (what is Wikidata5M-like, what is not):
- entities E = 3,085,345 * scale, ids "Q<n>" with n drawn without replacement from [1, 20E] (ids of
  several lengths, as in Wikidata); each entity has 1-6 aliases (P = .35 .25 .15 .10 .08 .07, mean
  2.37), an alias is 1-3 capitalised pseudo-words drawn from a Zipf(1.1) vocabulary of max(2000, E/2)
  words (at most 1M), so aliases share first words and some aliases are shared by several entities (as "John
  Smith" is);
- relations: 822 (Wikidata5M after filtering), not scaled, 1-3 lower-case aliases each;
- triples T = 6.81 * E (20.6M / 3.09M in Wikidata5M), heads and tails drawn from a power law over a
  random order of the entities (heavy-tailed degrees), relations Zipf(1.2); 1% of triples name
  an entity that has no alias line (Wikidata5M's triples do too; kg.load_kg drops them);
- corpus: documents of `--words` words (default 120) of lower-case filler words, with an entity
  alias every ~12 words, the entity drawn Zipf(1.0) over a random order of the entities, so mention
  frequencies are long-tailed. It is not natural text: it measures speed and memory, not learning.

--measure prints one JSON object: KG load RSS growth of a fresh process, parsing and then
memory-mapping (kg_load_growth); corpus preprocessing time and documents/s per process; the
memory-bank keys TRELM's selection rule can create on the corpus and their bytes (memory_bank_keys).
The figures measured with it: docs/measurements.md, "Scale".

Tests: python -m pytest -q tests/test_scale.py tests/test_data.py
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import common
import data
from entity_importance import long_tail_mask
from kg import load_kg
from memory_bank import bytes_for

WIKIDATA5M_ENTITIES = 3_085_345
WIKIDATA5M_RELATIONS = 822
TRIPLES_PER_ENTITY = 6.81
ALIAS_COUNT_P = (0.35, 0.25, 0.15, 0.10, 0.08, 0.07)  # 1..6 aliases per entity
SYLLABLES = ("ka ri to na mo le vi sa du pe lo ga ne ru bi ta ko mi ze ha fo ju ny qu ce "
             "wa xo yl sk tr an el or us in").split()


def pseudo_words(rng, n, capital):
    """n distinct pseudo-words of 2-4 syllables, capitalised if asked."""
    out, seen = [], set()
    while len(out) < n:
        k = rng.integers(2, 5)
        w = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k))
        if w not in seen:
            seen.add(w)
            out.append(w.capitalize() if capital else w)
    return out


_ZIPF = {}  # (n, s) -> cumulative distribution, kept between calls (one call per document)


def zipf_choice(rng, n, size, s):
    """size draws from ranks 0..n-1 with P(rank r) proportional to (r + 1)^-s."""
    if (n, s) not in _ZIPF:
        p = np.arange(1, n + 1, dtype=np.float64) ** -s
        _ZIPF[(n, s)] = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(_ZIPF[(n, s)], rng.random(size), side="right"), n - 1)


def write_kg(out, rng, scale, triples_per_entity=TRIPLES_PER_ENTITY):
    E = max(10, int(round(WIKIDATA5M_ENTITIES * scale)))
    ids = np.sort(rng.choice(20 * E, size=E, replace=False) + 1)
    vocab = pseudo_words(rng, min(max(2000, E // 2), 1_000_000), capital=True)  # 2-4 syllables: 1.73M words exist
    n_alias = rng.choice(len(ALIAS_COUNT_P), size=E, p=ALIAS_COUNT_P) + 1  # (E,)
    n_words = rng.choice(3, size=int(n_alias.sum()), p=(0.45, 0.4, 0.15)) + 1  # (A,)
    words = zipf_choice(rng, len(vocab), int(n_words.sum()), 1.1)  # (W,)
    w_end = np.cumsum(n_words)
    aliases = [" ".join(vocab[w] for w in words[e - k:e]) for e, k in zip(w_end, n_words)]
    a_end = np.cumsum(n_alias)
    os.makedirs(os.path.join(out, "kg"), exist_ok=True)
    with open(os.path.join(out, "kg", "entities.txt"), "w", encoding="utf-8") as f:
        for i in range(E):
            f.write(f"Q{ids[i]}\t" + "\t".join(aliases[a_end[i] - n_alias[i]:a_end[i]]) + "\n")

    R = WIKIDATA5M_RELATIONS
    rel_words = pseudo_words(rng, 3 * R, capital=False)
    with open(os.path.join(out, "kg", "relations.txt"), "w", encoding="utf-8") as f:
        for r in range(R):
            k = int(rng.integers(1, 4))
            f.write(f"P{r + 1}\t" + "\t".join(f"{rel_words[3 * r + j]} of" for j in range(k)) + "\n")

    T = int(round(triples_per_entity * E))
    order = rng.permutation(E)  # power-law rank -> entity
    heads = order[np.minimum((rng.pareto(1.2, T) * E / 50).astype(np.int64), E - 1)]
    tails = order[np.minimum((rng.pareto(0.9, T) * E / 50).astype(np.int64), E - 1)]
    rels = zipf_choice(rng, R, T, 1.2) + 1
    head_id, tail_id = ids[heads], ids[tails]
    dangling = rng.random(T) < 0.01  # an entity id absent from entities.txt (ids are < 20E + 1)
    tail_id = np.where(dangling, 20 * E + 1 + rng.integers(0, E, T), tail_id)
    with open(os.path.join(out, "kg", "triples.txt"), "w", encoding="utf-8") as f:
        for lo in range(0, T, 1_000_000):
            hi = min(lo + 1_000_000, T)
            f.write("".join(f"Q{h}\tP{r}\tQ{t}\n" for h, r, t in
                            zip(head_id[lo:hi].tolist(), rels[lo:hi].tolist(), tail_id[lo:hi].tolist())))
    return dict(entities=E, aliases=int(n_alias.sum()), relations=R, triples=T,
                dangling_triples=int(dangling.sum())), ids, aliases, a_end - n_alias


def write_corpus(out, rng, ids, aliases, first_alias, n_alias, docs, words, linked):
    E = len(ids)
    filler = pseudo_words(rng, 5000, capital=False)
    order = rng.permutation(E)
    path = os.path.join(out, "corpus.jsonl" if linked else "corpus.txt")
    mentions = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            n_ment = max(1, words // 12)
            ents = order[zipf_choice(rng, E, n_ment, 1.0)]
            which = (rng.random(n_ment) * n_alias[ents]).astype(np.int64)  # one alias of each entity
            slots = np.sort(rng.choice(words, size=n_ment, replace=False))
            fill = rng.integers(0, len(filler), words)
            text, spans, k, pos = [], [], 0, 0
            for w in range(words):
                if k < n_ment and slots[k] == w:
                    s = aliases[first_alias[ents[k]] + which[k]]
                    spans.append({"id": f"Q{ids[ents[k]]}", "start": pos, "end": pos + len(s)})
                    k += 1
                else:
                    s = filler[fill[w]]
                text.append(s)
                pos += len(s) + 1
            mentions += n_ment
            doc = " ".join(text) + "."
            f.write(json.dumps({"text": doc, "entities": spans}) + "\n" if linked else doc + "\n")
    return dict(docs=docs, words_per_doc=words, mentions_written=mentions, corpus=os.path.basename(path))


def write_wikiextractor(out, rng, ids, aliases, first_alias, n_alias, docs, words, anchor_share, per_file=1000):
    """The corpus as WikiExtractor --json --links writes Wikipedia: out/extracted/AA/wiki_00 ... of
    {"id", "url", "title", "text"} lines, a document per subject entity (in a random order), its mentions
    an `anchor_share` of them anchored <a href="Title">alias</a> (the rest left to the alias linker), and
    out/titles.tsv mapping every title to its Q-id (a label shared by several entities: "label (Q-id)")."""
    from urllib.parse import quote
    E = len(ids)
    label = [aliases[first_alias[e]] for e in range(E)]
    seen = {}
    for x in label:
        seen[x] = seen.get(x, 0) + 1
    title = [x if seen[x] == 1 else f"{x} (Q{ids[e]})" for e, x in enumerate(label)]
    with open(os.path.join(out, "titles.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{t}\tQ{q}\n" for t, q in zip(title, ids.tolist()))
    filler = pseudo_words(rng, 5000, capital=False)
    order, subjects = rng.permutation(E), rng.permutation(E)
    mentions = anchors = 0
    f = None
    for d in range(docs):
        if d % per_file == 0:
            if f:
                f.close()
            n = d // per_file
            folder = os.path.join(out, "extracted", chr(65 + n // 2600 % 26) + chr(65 + n // 100 % 26))
            os.makedirs(folder, exist_ok=True)
            f = open(os.path.join(folder, f"wiki_{n % 100:02d}"), "w", encoding="utf-8")
        n_ment = max(1, words // 12)
        ents = order[zipf_choice(rng, E, n_ment, 1.0)]
        which = (rng.random(n_ment) * n_alias[ents]).astype(np.int64)
        anchored = rng.random(n_ment) < anchor_share
        slots = set(np.sort(rng.choice(words, size=n_ment, replace=False)).tolist())
        fill = rng.integers(0, len(filler), words)
        text, k = [], 0
        for w in range(words):
            if w in slots:
                a = aliases[first_alias[ents[k]] + which[k]]
                text.append(f'<a href="{quote(title[ents[k]])}">{a}</a>' if anchored[k] else a)
                k += 1
            else:
                text.append(filler[fill[w]])
        mentions += n_ment
        anchors += int(anchored.sum())
        s = int(subjects[d % E])
        f.write(json.dumps({"id": str(d + 1), "url": f"https://en.wikipedia.org/wiki?curid={d + 1}",
                            "title": title[s], "text": f"{label[s]} " + " ".join(text) + "."}) + "\n")
    if f:
        f.close()
    return dict(docs=docs, words_per_doc=words, mentions_written=mentions, anchors_written=anchors,
                corpus="extracted", titles="titles.tsv")


RSS_SNIPPET = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import kg as kgs
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
before, t = rss(), time.time()
kg = kgs.load_kg(sys.argv[2], cache_dir=sys.argv[3])
print(json.dumps(dict(growth_mb=round(rss() - before, 1), seconds=round(time.time() - t, 2),
                      entities=kg.num_entities, triples=len(kg.triples))))
"""


def kg_load_growth(kg_dir, cache_dir):
    """RSS growth (MB) of a fresh Python process over kg.load_kg(kg_dir): JSON dict."""
    r = subprocess.run([sys.executable, "-c", RSS_SNIPPET, os.path.dirname(os.path.abspath(__file__)), kg_dir, cache_dir],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"kg_load_growth({kg_dir}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory_bank_keys(freq, triples, percentile=50.0, fraction=0.5, hidden=768):
    """Keys TRELM's memory bank can create with pretrain.py's selection rule (--injection important):
    a key is an entity of an injected mention, i.e. a long-tail entity (long_tail_mask, inclusive,
    `percentile`) with a triple (approximating KnowledgeInjector.injectable), whose mention's SI is in
    the batch's top `fraction`. upper = such entities that occur; expected = sum over them of
    1 - (1 - fraction)^freq (SI rank independent of the entity). bytes = memory_bank.bytes_for."""
    has_triple = np.bincount(np.asarray(triples)[:, 0], minlength=len(freq)) > 0
    cand = long_tail_mask(freq, percentile, inclusive=True) & has_triple
    upper = int(cand.sum())
    expected = float((1 - (1 - fraction) ** freq[cand].astype(np.float64)).sum())
    return dict(occurring_entities=int((freq > 0).sum()), long_tail_injectable=upper, expected_keys=round(expected),
                upper_bytes_fp32=bytes_for(upper, hidden), upper_bytes_bf16=bytes_for(upper, hidden, torch.bfloat16))


def measure(out, num_proc=None, model=None, seq_len=128):
    """The scale figures (docs/measurements.md) for a --data DIR: KG load memory, preprocessing speed,
    memory-bank keys."""
    kg_dir, corpus = data.resolve_data(out)
    cache = os.path.join(os.path.dirname(os.path.abspath(kg_dir)), "measure_cache")
    shutil.rmtree(cache, ignore_errors=True)
    res = dict(kg_first_load=kg_load_growth(kg_dir, os.path.join(cache, "kg")),
               kg_cached_load=kg_load_growth(kg_dir, os.path.join(cache, "kg")))
    kg = load_kg(kg_dir, cache_dir=os.path.join(cache, "kg"))
    tok = common.load_tokenizer(model or common.DEFAULT_MODEL)
    t = time.time()
    data.prepare(corpus, kg_dir, tok, seq_len, os.path.join(cache, "store"), num_proc=num_proc,
                 kg_cache=os.path.join(cache, "kg"), quiet=True)
    store = data.Store(os.path.join(cache, "store"))
    dt = time.time() - t
    t = time.time()
    freq = data.mention_counts(store, kg.num_entities)
    docs = sum(1 for line in open(corpus, "rb") if line.strip())
    res.update(num_proc=num_proc or 1, seq_len=seq_len, docs=docs, sequences=len(store), preprocess_s=round(dt, 1),
               docs_per_s_per_process=round(docs / dt / (num_proc or 1)), mention_counts_s=round(time.time() - t, 2),
               mentions=int(freq.sum()), memory_bank=memory_bank_keys(freq, kg.triples))
    shutil.rmtree(cache, ignore_errors=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (kg/, corpus.*, synth.json)")
    p.add_argument("--scale", type=float, default=0.01, help="multiple of the paper's 3,085,345 Wikidata5M entities")
    p.add_argument("--docs", type=int, default=1000, help="corpus documents (0: KG only)")
    p.add_argument("--words", type=int, default=120, help="words per document")
    p.add_argument("--linked", action="store_true", help="write corpus.jsonl with entity spans instead of corpus.txt")
    p.add_argument("--layout", default="ours", choices=("ours", "wikiextractor"),
                   help="wikiextractor: WikiExtractor --json --links files under extracted/, and titles.tsv")
    p.add_argument("--anchor-share", type=float, default=0.6, help="wikiextractor: the mentions written as anchors")
    p.add_argument("--triples-per-entity", type=float, default=TRIPLES_PER_ENTITY,
                   help="6.81 in the paper's filtered Wikidata5M (20.6M / 3.09M); 4.37 in the full release (21M / 4.8M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", action="store_true", help="after writing, print the scale measurements (see above)")
    p.add_argument("--measure-only", action="store_true", help="measure the existing --data DIR given as --out")
    p.add_argument("--num-proc", type=int, default=None, help="preprocessing processes for --measure")
    p.add_argument("--model", default=None, help="tokenizer for --measure (default: the embedded MiniLM)")
    args = p.parse_args(argv)
    if args.measure_only:
        res = measure(args.out, args.num_proc, args.model)
        print(json.dumps(res))
        return res
    if not 0 < args.scale <= 2:
        p.error(f"--scale {args.scale}: expected a multiple of the paper's KG in (0, 2]")
    if args.docs < 0 or args.words < 12:
        p.error("--docs must be >= 0 and --words >= 12")
    rng = np.random.default_rng(args.seed)
    info, ids, aliases, first_alias = write_kg(args.out, rng, args.scale, args.triples_per_entity)
    if args.docs:
        n_alias = np.diff(np.append(first_alias, len(aliases)))
        if args.layout == "wikiextractor":
            info.update(write_wikiextractor(args.out, rng, ids, aliases, first_alias, n_alias, args.docs, args.words,
                                            args.anchor_share))
        else:
            info.update(write_corpus(args.out, rng, ids, aliases, first_alias, n_alias, args.docs, args.words,
                                     args.linked))
    info["args"] = vars(args)
    with open(os.path.join(args.out, "synth.json"), "w") as f:
        json.dump(info, f, indent=1)
    if args.measure:
        info["measured"] = measure(args.out, args.num_proc, args.model)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
