"""data.py and kg.py: KG reader, alias linker, span mapping (WordPiece and byte-level BPE), packing into
the prepared store, MLM masking, the step-indexed data order, and the errors bad input must raise."""
import json
import os

import numpy as np
import pytest
import torch

import common
import data
import kg as kgmod
import synth_kg
from kg import KG, AliasLinker, load_kg

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_data")
KG_DIR = os.path.join(FIX, "kg")


@pytest.fixture
def kg():
    return load_kg(KG_DIR)


def build(corpus, tok, seq_len, out, kg_dir=KG_DIR, num_proc=None, kg_cache=None):
    """data.prepare into `out`, then the store."""
    data.prepare(str(corpus), str(kg_dir), tok, seq_len, str(out), num_proc=num_proc, kg_cache=kg_cache, quiet=True)
    return data.Store(str(out))


def all_rows(store):
    return [{k: v.tolist() for k, v in r.items()} for r in store.rows(range(len(store)))]


def test_load_kg(kg):
    assert kg.num_entities == 15 and kg.entity_labels[0] == "France"
    assert kg.entity_aliases[0] == ["France", "French Republic"]
    assert kg.triples.dtype == np.int32 and kg.triples.shape == (14, 3)
    h, r, t = kg.triples[0]
    assert (kg.entity_ids[h], kg.relation_ids[r], kg.entity_ids[t]) == ("Q142", "P36", "Q90")


def _write_kg(tmp_path, ents, rels, triples):
    d = tmp_path / "kg"
    d.mkdir()
    (d / "entities.txt").write_text(ents)
    (d / "relations.txt").write_text(rels)
    (d / "triples.txt").write_text(triples)
    return str(d)


def test_kg_bad_column_count_names_file_and_line(tmp_path):
    d = _write_kg(tmp_path, "Q1\tA\nQ2\tB\n", "P1\tr\n", "Q1\tP1\tQ2\nQ1\tP1\n")
    with pytest.raises(common.DataError, match=r"triples.txt:2: expected 3 tab-separated columns"):
        load_kg(d)


def test_kg_unknown_relation_and_empty_file(tmp_path):
    d = _write_kg(tmp_path, "Q1\tA\nQ2\tB\n", "P1\tr\n", "Q1\tP9\tQ2\n")
    with pytest.raises(common.DataError, match=r"triples.txt:1: unknown relation 'P9'"):
        load_kg(d)
    d2 = _write_kg(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None, "", "P1\tr\n", "")
    with pytest.raises(common.DataError, match=r"entities.txt: empty"):
        load_kg(d2)


def test_kg_duplicate_id_names_both_lines(tmp_path):
    d = _write_kg(tmp_path, "Q1\tA\nQ2\tB\nQ1\tC\n", "P1\tr\n", "")
    with pytest.raises(common.DataError, match=r"entities.txt:3: duplicate id 'Q1' \(first on line 1\)"):
        load_kg(d)


def test_kg_missing_file_names_expected_names(tmp_path):
    with pytest.raises(common.DataError,
                       match=r"no entities file; expected one of entities.txt, wikidata5m_entity.txt"):
        load_kg(str(tmp_path))


def test_linker_longest_match_case_and_boundaries(kg):
    linker = AliasLinker(kg)
    text = "The United Kingdom and the United States; Parisian food in Paris. france, Rome."
    got = [(text[e["start"]:e["end"]], e["id"]) for e in linker.link(text)]
    # "United Kingdom" not "United"; "Parisian" is not "Paris" (word boundary); lowercase "france" is not linked
    assert got == [("United Kingdom", "Q145"), ("United States", "Q30"), ("Paris", "Q90"), ("Rome", "Q220")]
    assert linker.link("City of Light is Paris")[0] == {"id": "Q90", "start": 0, "end": 13}  # multi-word alias
    import types
    punct = AliasLinker(types.SimpleNamespace(entity_aliases=[["Port-au-Prince"], ["St. John's"]],
                                                   entity_ids=["A", "B"]))
    assert [e["id"] for e in punct.link("From Port-au-Prince to St. John's.")] == ["A", "B"]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_corpus_errors_name_file_and_line(tmp_path, kg, bert_tok, num_proc):
    p = tmp_path / "c.jsonl"
    build_c = lambda: build(p, bert_tok, 32, tmp_path / "store", num_proc=num_proc)
    p.write_text('{"text": "Paris"}\n\n{"text": "x", bad}\n')
    with pytest.raises(common.DataError, match=r"c.jsonl:3: malformed JSON"):
        build_c()
    if num_proc:
        return  # one error through the workers is enough; the rest are the same code
    p.write_text(json.dumps({"text": "Paris", "entities": [{"id": "Q90", "start": 0, "end": 9}]}) + "\n")
    with pytest.raises(common.DataError, match=r"c.jsonl:1: entity span \[0, 9\) is outside the text of length 5"):
        build_c()
    p.write_text(json.dumps({"text": "Paris", "entities": [{"id": "Q999", "start": 0, "end": 5}]}) + "\n")
    with pytest.raises(common.DataError, match=r"c.jsonl:1: unknown entity 'Q999'"):
        build_c()
    p.write_bytes(b'{"text": "Paris"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(common.DataError, match=r"c.jsonl:2: not valid UTF-8"):
        build_c()
    p.write_text("\n  \n")
    with pytest.raises(common.DataError, match=r"empty corpus"):
        build_c()
    p.unlink()
    with pytest.raises(common.DataError, match=r"corpus file not found"):
        build_c()


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_span_mapping_both_tokenizers(which, bert_tok, roberta_tok, kg):
    tok = bert_tok if which == "bert" else roberta_tok
    text = "France is in Europe and Frances is not"  # entity at the start; "Frances" is one word
    ents = [{"id": "Q142", "start": 0, "end": 6}, {"id": "Q46", "start": 13, "end": 19}]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = data.char_to_token_spans(enc["offset_mapping"], ents)
    for (s, e, i) in spans:
        piece = tok.decode(enc["input_ids"][s:e]).strip().lower()
        assert piece == text[ents[i]["start"]:ents[i]["end"]].lower()
    assert spans[0][0] == 0  # entity at the sequence start
    nested = [{"id": "Q46", "start": 13, "end": 19}, {"id": "Q142", "start": 0, "end": 6},
              {"id": "Q142", "start": 0, "end": 12}]  # "France is in" overlaps "France": first by start wins
    assert [i for _, _, i in data.char_to_token_spans(enc["offset_mapping"], nested)] == [1, 0]


def test_pack_drops_mentions_cut_by_truncation(bert_tok, kg):
    text = "the capital of france is paris the capital of germany is berlin"
    ents = [{"id": "Q142", "start": 15, "end": 21}, {"id": "Q64", "start": 57, "end": 63}]
    pack = lambda ents: data.pack_docs(data.tokenize_docs({"text": [text], "entities": [ents]}, bert_tok, kg.entity_index),
                                       bert_tok.cls_token_id, bert_tok.sep_token_id, max_len=8)
    out = pack(ents)
    # 12 tokens, room 6 per sequence: "france" (token 3) in the first piece, "berlin" (token 11) in the second
    assert [len(x) for x in out["input_ids"]] == [8, 8]
    assert out["input_ids"][0][0] == bert_tok.cls_token_id and out["input_ids"][0][-1] == bert_tok.sep_token_id
    assert out["ent_start"] == [[4], [6]] and out["ent_end"] == [[5], [7]]
    assert bert_tok.convert_ids_to_tokens(out["input_ids"][1][6]) == "berlin"
    # a mention crossing the cut is dropped, not half-kept
    long_ent = [{"id": "Q145", "start": 25, "end": 41}]  # "paris the capital" spans tokens 5..7, cut at 6
    out = pack(long_ent)
    assert out["ent_id"] == [[], []]


def test_prepare_links_and_packs(tmp_path, bert_tok, kg):
    store = build(os.path.join(FIX, "corpus.jsonl"), bert_tok, 64, tmp_path / "s")
    assert len(store) >= 2
    n_ent = sum(len(r["ent_id"]) for r in all_rows(store))
    assert n_ent == 20 * 2 + 20 * 4  # 2 given mentions x 20 lines + 4 linked ("Berlin ... Germany ... Germany ... Europe")
    for row in all_rows(store):
        for s, e, i in zip(row["ent_start"], row["ent_end"], row["ent_id"]):
            label = bert_tok.decode(row["input_ids"][s:e]).replace(" ", "")
            assert label in [a.lower().replace(" ", "") for a in kg.entity_aliases[i]]


def test_collator_masking_rates_and_specials(bert_tok):
    coll = data.MLMCollator(bert_tok, mlm_prob=0.15)
    ids = bert_tok("the capital of france is paris . " * 14)["input_ids"][:100]
    ex = {"input_ids": ids, "word_start": [1] * len(ids), "ent_start": [], "ent_end": [], "ent_id": []}
    b = coll([ex] * 200, torch.Generator().manual_seed(0))
    chosen = b["mlm_labels"] != -100
    assert abs(chosen.float().mean().item() - 0.15 * 98 / 100) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, 99].any()  # [CLS], [SEP]
    masked = (b["input_ids"] == bert_tok.mask_token_id) & chosen
    kept = (b["input_ids"] == b["orig_ids"]) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02  # (plus rare random == original)
    assert torch.equal(b["orig_ids"][0], torch.tensor(ids))


def test_whole_word_masking(bert_tok):
    coll = data.MLMCollator(bert_tok, mlm_prob=0.3, whole_word=True)
    enc = bert_tok("frances capitals is paris", return_offsets_mapping=True)
    text = "frances capitals is paris"
    ws = [0] + [1 if s == 0 or text[s - 1] == " " else 0 for s, _ in enc["offset_mapping"][1:-1]] + [0]
    ex = {"input_ids": enc["input_ids"], "word_start": ws, "ent_start": [], "ent_end": [], "ent_id": []}
    b = coll([ex] * 300, torch.Generator().manual_seed(1))
    chosen = b["mlm_labels"] != -100
    word = np.cumsum(ws)
    for row in chosen:
        for w in set(word[1:-1]):
            pos = [i for i in range(1, len(ws) - 1) if word[i] == w]
            assert len(set(row[pos].tolist())) == 1  # a word is chosen whole or not at all
    assert 0.2 < chosen[:, 1:-1].float().mean() < 0.4


def test_data_order_partitions_global_batch_and_is_a_function_of_step():
    n, B, accum, world, seed = 37, 3, 2, 2, 5
    g = data.global_batch_indices(4, n, B * accum * world, seed)
    parts = [data.micro_batch_indices(4, m, r, n, B, accum, world, seed) for m in range(accum) for r in range(world)]
    assert sorted(sum(parts, [])) == sorted(g)
    # one epoch = the permutation, every index once
    first = sum((data.global_batch_indices(s, 36, 12, seed) for s in range(3)), [])
    assert sorted(first) == list(range(36))
    assert data.global_batch_indices(4, n, 12, seed) == g


def _reference_kg(kg_dir):
    """A plain-Python reading of the three files (the pre-columnar reader's rules), for comparison."""
    rows = lambda name: [l.rstrip("\n").split("\t") for l in open(os.path.join(kg_dir, name), encoding="utf-8") if l.strip()]
    ents, rels = rows("entities.txt"), rows("relations.txt")
    e_ix, r_ix = {c[0]: i for i, c in enumerate(ents)}, {c[0]: i for i, c in enumerate(rels)}
    tri = [(e_ix[h], r_ix[r], e_ix[t]) for h, r, t in rows("triples.txt") if h in e_ix and t in e_ix]
    return ents, rels, e_ix, np.asarray(tri, np.int32).reshape(-1, 3)


def test_columnar_reader_equals_plain_python_on_a_synthetic_kg(tmp_path, monkeypatch):
    synth_kg.main(["--out", str(tmp_path / "s"), "--scale", "0.001", "--docs", "0", "--seed", "3"])
    kg_dir = str(tmp_path / "s" / "kg")
    monkeypatch.setattr(kgmod, "CHUNK_BYTES", 997)  # many chunk boundaries, cut mid-line
    out = tmp_path / "parsed"
    out.mkdir()
    kgmod._parse_kg(kg_dir, str(out))
    meta = json.load(open(out / "meta.json"))
    json.dump(dict(meta, key="test"), open(out / "meta.json", "w"))
    kg = KG(str(out))
    ents, rels, e_ix, tri = _reference_kg(kg_dir)
    assert kg.num_entities == len(ents) == 3085 and list(kg.entity_ids) == [c[0] for c in ents]
    assert list(kg.entity_aliases) == [c[1:] for c in ents] and list(kg.entity_labels) == [c[1] for c in ents]
    assert kg.relation_ids == [c[0] for c in rels] and kg.relation_aliases == [c[1:] for c in rels]
    assert np.array_equal(kg.triples, tri) and kg.triples.dtype == np.int32
    assert len(tri) < sum(1 for _ in open(os.path.join(kg_dir, "triples.txt")))  # dangling triples were dropped
    assert all(kg.entity_index[q] == i for q, i in e_ix.items())
    for unknown in ("Q0", "Q", "", "Q1234567890123", ents[0][0] + "0", ents[0][0][:-1] + "\0"):
        assert (unknown in kg.entity_index) == (unknown in e_ix) and kg.entity_index.get(unknown, -7) == e_ix.get(unknown, -7)


def test_load_kg_keeps_no_python_object_per_triple_and_pickles_small(kg):
    import pickle
    assert isinstance(kg.triples, np.memmap) and len(pickle.dumps(kg)) < 500  # workers re-open the cache


def test_kg_not_utf8_names_line(tmp_path):
    d = _write_kg(tmp_path, "Q1\tA\n", "P1\tr\n", "")
    with open(os.path.join(d, "entities.txt"), "ab") as f:
        f.write(b"Q2\tcaf\xe9\n")
    with pytest.raises(common.DataError, match=r"entities.txt:2: not valid UTF-8"):
        load_kg(d, cache_dir=str(tmp_path / "c"))


def test_editing_the_kg_relinks_and_drops_removed_entities(tmp_path, bert_tok):
    """The caches are keyed by every input, so an edited KG file is re-parsed and re-linked."""
    import shutil
    kg_dir = tmp_path / "kg"
    shutil.copytree(os.path.join(FIX, "kg"), kg_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Berlin is in Germany . Paris is in Deutschland .\n" * 3)
    store = lambda out: build(corpus, bert_tok, 64, tmp_path / out, kg_dir=kg_dir, kg_cache=str(tmp_path / "kgc"))
    linked = lambda kg, st: sorted(kg.entity_ids[e] for e in st.flat("ent_id"))
    kg1 = load_kg(str(kg_dir), cache_dir=str(tmp_path / "kgc"))
    ds1 = store("s1")
    assert linked(kg1, ds1) == sorted(["Q64", "Q183", "Q90"] * 3)
    stamp = os.stat(tmp_path / "s1" / "shard-00000" / "tokens.npy").st_mtime_ns
    assert store("s1").meta == ds1.meta  # unchanged inputs: the store is reused as it is
    assert os.stat(tmp_path / "s1" / "shard-00000" / "tokens.npy").st_mtime_ns == stamp
    ents = (kg_dir / "entities.txt").read_text().splitlines()
    ents = [l for l in ents if not l.startswith("Q90\t")]  # remove Paris ...
    ents = [l + "\tDeutschland" if l.startswith("Q183\t") else l for l in ents]  # ... give Germany a new alias
    (kg_dir / "entities.txt").write_text("\n".join(ents) + "\n")
    kg2 = load_kg(str(kg_dir), cache_dir=str(tmp_path / "kgc"))
    assert kg2.key != kg1.key and "Q90" not in kg2.entity_index
    assert [d for d in os.listdir(tmp_path / "kgc") if not d.endswith(".lock")] == ["kg-" + kg2.key]  # old parse removed
    with pytest.raises(common.DataError, match="holds a store prepared from other inputs"):
        store("s1")  # a prepared --out is never silently replaced
    ds2 = store("s2")
    assert ds2.meta["kg_key"] == kg2.key != ds1.meta["kg_key"]
    assert linked(kg2, ds2) == sorted(["Q64", "Q183", "Q183"] * 3)


def test_mention_counts_equal_a_count_over_the_rows(tmp_path, bert_tok, kg):
    ds = build(os.path.join(FIX, "corpus.jsonl"), bert_tok, 32, tmp_path / "s")
    ref = np.zeros(kg.num_entities, np.int64)
    for row in all_rows(ds):
        for e in row["ent_id"]:
            ref[e] += 1
    assert ref.sum() == 120 and np.array_equal(data.mention_counts(ds, kg.num_entities), ref)
    with pytest.raises(common.DataError, match=r"ent_id out of range \[0, 3\)"):
        data.mention_counts(ds, 3)


def test_synth_kg_is_seeded_and_wikidata5m_shaped(tmp_path):
    a = synth_kg.main(["--out", str(tmp_path / "a"), "--scale", "0.001", "--docs", "30", "--linked"])
    synth_kg.main(["--out", str(tmp_path / "b"), "--scale", "0.001", "--docs", "30", "--linked"])
    for f in ("kg/entities.txt", "kg/relations.txt", "kg/triples.txt", "corpus.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    ents = [l.split("\t") for l in (tmp_path / "a" / "kg" / "entities.txt").read_text().splitlines()]
    assert len(ents) == 3085 and {len(c) - 1 for c in ents} == set(range(1, 7))
    assert a["relations"] == 822 and a["triples"] == round(6.81 * 3085)
    text = [json.loads(l) for l in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()]
    alias = {c[0]: set(c[1:]) for c in ents}
    assert all(r["text"][e["start"]:e["end"]] in alias[e["id"]] for r in text for e in r["entities"])


def test_linking_under_num_proc_gives_the_same_dataset(tmp_path, bert_tok, kg):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Berlin is in Germany . The United Kingdom and Paris , France .\n" * 2500)
    one = build(corpus, bert_tok, 64, tmp_path / "a")
    two = build(corpus, bert_tok, 64, tmp_path / "b", num_proc=2)
    assert all_rows(one) == all_rows(two) and len(one.flat("ent_id")) == 5 * 2500
