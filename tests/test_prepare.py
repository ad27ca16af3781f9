"""The paper-scale path on small files: the published layouts (Wikidata5M's release, WikiExtractor --json
with --links, the wikimedia/wikipedia parquet files), `python data.py prepare` and its resume, SI scored
by shards across ranks, and torchrun from a prepared store (4 gloo ranks, one slow on purpose)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import common
import config
import corpus
import data
from kg import load_kg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_data")
W5M = {"wikidata5m_entity.txt": "Q142\tFrance\tFrench Republic\nQ90\tParis\tCity of Light\nQ183\tGermany\n"
                                "Q64\tBerlin\nQ46\tEurope\n",
       "wikidata5m_relation.txt": "P36\tcapital\nP1376\tcapital of\nP30\tcontinent\n"}
SPLITS = {"train": "Q142\tP36\tQ90\nQ183\tP36\tQ64\n", "valid": "Q142\tP30\tQ46\n", "test": "Q183\tP30\tQ46\n"}


def write(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d)


def test_wikidata5m_release_layout_reads_all_triplets_or_the_splits_together(tmp_path):
    """wikidata5m_all_triplet.txt when present; else every transductive split file, read together."""
    splits = write(tmp_path / "splits", {**W5M, **{f"wikidata5m_transductive_{k}.txt": v for k, v in SPLITS.items()}})
    kg = load_kg(splits, cache_dir=str(tmp_path / "c"))
    assert kg.num_entities == 5 and kg.entity_aliases[0] == ["France", "French Republic"]
    assert [(kg.entity_ids[h], kg.relation_ids[r], kg.entity_ids[t]) for h, r, t in kg.triples] == \
        [("Q142", "P36", "Q90"), ("Q183", "P36", "Q64"), ("Q142", "P30", "Q46"), ("Q183", "P30", "Q46")]
    whole = write(tmp_path / "all", {**W5M, "wikidata5m_all_triplet.txt": "Q90\tP1376\tQ142\nQ90\tP1376\tQ999\n",
                                     "wikidata5m_transductive_train.txt": SPLITS["train"]})
    kg = load_kg(whole, cache_dir=str(tmp_path / "c"))
    assert kg.triples.tolist() == [[1, 1, 0]]  # all_triplet wins; the dangling triple (Q999) is dropped
    bad = write(tmp_path / "bad", {**W5M, "wikidata5m_transductive_train.txt": "Q142\tP36\tQ90\n",
                                   "wikidata5m_transductive_test.txt": "Q142\tP36\nQ1\tP1\tQ2\n"})
    with pytest.raises(common.DataError, match=r"wikidata5m_transductive_test.txt:1: expected 3 tab-separated"):
        load_kg(bad, cache_dir=str(tmp_path / "c"))


def test_wikidata5m_text_is_a_corpus_about_its_entities(tmp_path, bert_tok):
    """Each line of wikidata5m_text.txt is about its Q-id: the subject's own aliases link to it (here
    "City of Light" and "Paris"); other entities by the alias linker; a line without a Q-id names file:line."""
    kg_dir = write(tmp_path / "kg", {**W5M, "wikidata5m_all_triplet.txt": SPLITS["train"]})
    text = write(tmp_path / "t", {"wikidata5m_text.txt": "Q90\tParis, the City of Light, is the capital of France.\n"
                                                          "Q64\tBerlin is in Germany.\n"})
    assert corpus.detect(text)[0] == "wikidata5m"
    meta = data.prepare(os.path.join(text, "wikidata5m_text.txt"), kg_dir, bert_tok, 64, str(tmp_path / "s"),
                        kg_cache=str(tmp_path / "c"), quiet=True)
    assert meta["mention_sources_linked"] == {"subject": 3, "alias": 2}  # Paris, City of Light, Berlin; France, Germany
    kg = load_kg(kg_dir, cache_dir=str(tmp_path / "c"))
    assert [kg.entity_ids[e] for e in data.Store(str(tmp_path / "s")).flat("ent_id")] == \
        ["Q90", "Q90", "Q142", "Q64", "Q183"]
    (tmp_path / "t" / "wikidata5m_text.txt").write_text("Q90\tParis.\nParis without an id\n")
    with pytest.raises(common.DataError, match=r"wikidata5m_text.txt:2: expected 'Q-id<TAB>description'"):
        data.prepare(os.path.join(text, "wikidata5m_text.txt"), kg_dir, bert_tok, 64, str(tmp_path / "s2"),
                     kg_cache=str(tmp_path / "c"), quiet=True)


def test_wikiextractor_links_win_over_the_alias_linker(tmp_path, bert_tok):
    """WikiExtractor --json --links: anchors become mentions through --titles (the href URL-quoted, a
    #fragment dropped, the first letter case-insensitive); an anchor beats the alias linker where both
    cover a character ("Paris" anchored to a title mapped to Q142 stays Q142), unmapped anchors are
    dropped, the rest of the text is linked by aliases; the census counts each source."""
    kg_dir = write(tmp_path / "kg", {**W5M, "wikidata5m_all_triplet.txt": SPLITS["train"]})
    page = {"id": "1", "url": "u", "title": "Berlin",
            "text": 'Berlin is in <a href="Germany">Germany</a>. <a href="france%23History">Paris</a> and '
                    '<a href="Nowhere">Europe</a> and Paris.'}
    d = tmp_path / "extracted" / "AA"
    d.mkdir(parents=True)
    (d / "wiki_00").write_text(json.dumps(page) + "\n")
    titles = tmp_path / "titles.tsv"
    titles.write_text("Germany\tQ183\nFrance\tQ142\nBerlin\tQ64\n")
    assert corpus.detect(str(tmp_path / "extracted"))[0] == "wikiextractor"
    text, spans = corpus.strip_anchors(page["text"])
    assert text == "Berlin is in Germany. Paris and Europe and Paris." and spans[1] == (22, 27, "france")
    meta = data.prepare(str(tmp_path / "extracted"), kg_dir, bert_tok, 64, str(tmp_path / "s"), titles=str(titles),
                        kg_cache=str(tmp_path / "c"), quiet=True)
    assert meta["mention_sources_linked"] == {"link": 2, "subject": 1, "alias": 2}
    kg = load_kg(kg_dir, cache_dir=str(tmp_path / "c"))
    ids = [kg.entity_ids[e] for e in data.Store(str(tmp_path / "s")).flat("ent_id")]
    assert ids == ["Q64", "Q183", "Q142", "Q46", "Q90"]  # Berlin (subject), Germany, Paris->France (link), ..., Paris
    (d / "wiki_00").write_text('{"id": "1", "url": "u", "title": "x"}\n{"id": "2", "url": "u", "title": "y", "text": 3}\n')
    with pytest.raises(common.DataError, match=r"wiki_00:1: expected a WikiExtractor --json object"):
        data.prepare(str(tmp_path / "extracted"), kg_dir, bert_tok, 64, str(tmp_path / "s3"),
                     kg_cache=str(tmp_path / "c"), quiet=True)


def test_wikimedia_wikipedia_parquet_is_read_with_datasets(tmp_path, bert_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    kg_dir = write(tmp_path / "kg", {**W5M, "wikidata5m_all_triplet.txt": SPLITS["train"]})
    (tmp_path / "wiki" / "20231101.en").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["12", "13"], "url": ["u1", "u2"], "title": ["Paris", "Germany"],
                             "text": ["Paris is the capital of France.", "Germany is in Europe."]}),
                   tmp_path / "wiki" / "20231101.en" / "train-00000-of-00001.parquet")
    (tmp_path / "titles.tsv").write_text("Paris\tQ90\nGermany\tQ183\n")
    assert corpus.detect(str(tmp_path / "wiki"))[0] == "parquet"
    meta = data.prepare(str(tmp_path / "wiki"), kg_dir, bert_tok, 64, str(tmp_path / "s"),
                        titles=str(tmp_path / "titles.tsv"), kg_cache=str(tmp_path / "c"), quiet=True)
    assert meta["layout"] == "parquet" and meta["mention_sources_linked"] == {"subject": 2, "alias": 2}


def test_prepare_resumes_only_the_missing_shards_and_fits_compact_dtypes(tmp_path, bert_tok):
    """A killed prepare (shard 1 and store.json missing) rerun writes shard 1 alone and ends with the store
    of an uninterrupted prepare; tokens are uint16, spans uint16, entities and offsets int32, and the
    bytes per token it reports are the columns' bytes on disk (the rehearsal measures them on a
    Wikipedia-like corpus; this one is dense with mentions)."""
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text("Berlin is in Germany . The United Kingdom and Paris , France .\n" * 2500)
    kg_dir = os.path.join(FIX, "kg")
    prep = lambda out, **kw: data.prepare(str(corpus_path), kg_dir, bert_tok, 32, str(tmp_path / out), shard_blocks=1,
                                          kg_cache=str(tmp_path / "c"), quiet=True, **kw)
    whole = prep("a")
    assert [s["name"] for s in whole["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    prep("b", num_proc=2)
    os.remove(tmp_path / "b" / "store.json")
    import shutil
    shutil.rmtree(tmp_path / "b" / "shard-00001")
    kept = {n: os.stat(tmp_path / "b" / n / "tokens.npy").st_mtime_ns for n in ("shard-00000", "shard-00002")}
    again = prep("b")
    assert {n: os.stat(tmp_path / "b" / n / "tokens.npy").st_mtime_ns for n in kept} == kept
    for n in ("shard-00000", "shard-00001", "shard-00002"):
        for col in data.Store.COLUMNS:
            assert np.array_equal(np.load(tmp_path / "a" / n / f"{col}.npy"), np.load(tmp_path / "b" / n / f"{col}.npy"))
    assert again["sequences"] == whole["sequences"] and again["tokens"] == whole["tokens"]
    sh = data.Store(str(tmp_path / "b")).shards[0]
    assert (sh["tokens"].dtype, sh["ent_start"].dtype, sh["ent_id"].dtype, sh["seq"].dtype) == \
        (np.uint16, np.uint16, np.int32, np.int32)
    cols = sum(os.path.getsize(tmp_path / "a" / n / f"{c}.npy") for n in ("shard-00000", "shard-00001", "shard-00002")
               for c in data.Store.COLUMNS)
    assert whole["disk_bytes"] == cols and whole["bytes_per_token"] == round(cols / whole["tokens"], 4)


def test_prepare_cli_errors_are_one_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "prepare", *a],
                                    capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = run("--corpus", str(tmp_path / "none.jsonl"), "--kg", os.path.join(FIX, "kg"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("data.py: ") and "not found" in r.stderr
    r = run("--corpus", "x", "--kg", "y", "--out", "z", "--shard-docs", "1500")
    assert "--shard-docs: expected a positive multiple of 1000" in r.stderr


@pytest.mark.parametrize("preset,model", [("roberta-base", "roberta-base"), ("bert-base", "bert-base-uncased")])
def test_presets_set_the_paper_setting_and_flags_win(preset, model, monkeypatch):
    monkeypatch.setattr(common, "has_mlm_head", lambda name, flag="--model": True)  # no hub model here
    cfg = config.from_argv(["--preset", preset])
    assert (cfg.run.model, cfg.data.seq_len, cfg.data.batch_size, cfg.optim.lr) == (model, 128, 32, 1e-4)
    assert cfg.optim.max_steps == 406_252 and cfg.optim.warmup_steps == 40_625
    cfg = config.from_argv(["--preset", preset, "--lr", "5e-5", "--seq-len", "256"])
    assert (cfg.optim.lr, cfg.data.seq_len, cfg.data.batch_size) == (5e-5, 256, 32)


def test_ddp_timeout_is_validated_and_reaches_the_process_group():
    with pytest.raises(SystemExit, match="--ddp-timeout: expected minutes > 0"):
        config.from_argv(["--ddp-timeout", "0"])
    assert config.from_argv([]).run.ddp_timeout >= 60


def _torchrun(nproc, argv, env=None, timeout=600):
    from test_pretrain import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(free_port()),
           os.path.join(os.path.dirname(__file__), "ddp_si_worker.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture
def sharded_store(tmp_path, tiny_model_dir):
    """A 3-shard store of the tiny tokenizer (2500 documents, one block per shard)."""
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text("Berlin is in Germany . The United Kingdom and Paris , France .\n" * 2500)
    data.prepare(str(corpus_path), os.path.join(FIX, "kg"), common.load_tokenizer(tiny_model_dir), 32,
                 str(tmp_path / "store"), shard_blocks=1, kg_cache=str(tmp_path / "c"), quiet=True)
    return str(tmp_path / "store")


def test_torchrun_from_a_prepared_store_scores_si_by_shards_like_one_process(tmp_path, tiny_model_dir, sharded_store):
    """2 gloo ranks train from a prepared store: each scores its share of the 3 shards, and every rank ends
    with the SI values of a one-process run, bitwise; 4 ranks, one of them 4 s slow in its SI share, pass
    under --ddp-timeout 1 (a minute) and fail with a timeout under --ddp-timeout 0.02 (1.2 s)."""
    argv = lambda out, *a: [str(tmp_path / out), "--model", tiny_model_dir, "--data", sharded_store, "--seq-len", "32",
                            "--batch-size", "2", "--max-steps", "2", "--cache-dir", str(tmp_path / "cache" / out),
                            "--no-routing", *a]
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "ddp_si_worker.py"), *argv("one")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(2, argv("two"))
    assert r.returncode == 0, r.stderr[-3000:]
    one = np.load(tmp_path / "one" / "rank0.npz")
    for rank in (0, 1):
        got = np.load(tmp_path / "two" / f"rank{rank}.npz")
        assert np.array_equal(got["si"], one["si"], equal_nan=True) and np.isfinite(got["si"]).sum() > 1000
    mine = [np.load(tmp_path / "two" / f"rank{rank}.npz")["mine"].tolist() for rank in (0, 1)]
    assert sorted(sum(mine, [])) == [0, 1, 2] and all(mine)  # both ranks scored a share
    slow = {"SLOW_RANK": "3", "SLOW_SECONDS": "4"}
    r = _torchrun(4, argv("four", "--ddp-timeout", "1"), env=slow)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(4, argv("late", "--ddp-timeout", "0.02"), env=slow)
    assert r.returncode != 0 and "timed out" in r.stderr.lower(), r.stderr[-2000:]
