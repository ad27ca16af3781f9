"""Tests of finetune.py and finetune_data.py: scorers against hand-computed answers, readers on the
hand-made fixtures in tests/fixtures (official formats), marker insertion and truncation, and one
end-to-end fit per task on a tiny random BERT."""
import argparse
import json
import math
import os

import pytest
import torch

import common
import finetune as ft
import finetune_data as fd
import lama

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
NA = ft.NO_RELATION


def make_args(argv):
    """evaluate.py's own flags plus finetune.add_args (also checks add_args does not clash with them)."""
    p = argparse.ArgumentParser()
    for flag in ("--task", "--model-dir", "--data-dir", "--output-dir"):
        p.add_argument(flag)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    ft.add_args(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- scorers

def test_tacred_score_mixed_case():
    gold = ["A", NA, "B", "A", NA]
    pred = ["A", "A", NA, "B", NA]
    # guesses (pred != NA): A, A, B = 3; gold (gold != NA): A, B, A = 3; correct: row 0 only
    m, per = ft.tacred_score(gold, pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert per["A"] == dict(precision=0.5, recall=0.5, f1=0.5, correct=1, guessed=2, gold=2)
    assert per["B"]["guessed"] == 1 and per["B"]["gold"] == 1 and per["B"]["f1"] == 0.0


def test_tacred_score_edge_cases_follow_official_scorer():
    # no guesses at all: score.py sets precision 1.0, recall 0 -> F1 0
    m, _ = ft.tacred_score(["A", NA, "B"], [NA, NA, NA])
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 0.0, 0.0)
    # all gold no_relation, one wrong guess: precision 0, recall 0 (no gold)
    m, _ = ft.tacred_score([NA, NA], ["A", NA])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    # all gold and all predictions no_relation: P 1, R 0, F1 0 (score.py's conventions)
    m, _ = ft.tacred_score([NA, NA], [NA, NA])
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 0.0, 0.0)
    # a correct relation mixed with a wrong guess on a no_relation row
    m, _ = ft.tacred_score(["A", NA], ["A", "B"])
    assert (m["precision"], m["recall"]) == (0.5, 1.0) and m["f1"] == pytest.approx(2 / 3)


def test_tacred_score_without_no_relation_is_accuracy():
    m, _ = ft.tacred_score(["A", "B", "C", "A"], ["A", "C", "C", "A"])  # FewRel: every row is a guess
    assert m["precision"] == m["recall"] == m["f1"] == m["accuracy"] == 0.75


def test_typing_metrics_hand_computed():
    gold = [{"person"}, {"location", "place"}, set(), {"event"}]
    pred = [{"person", "group"}, {"location"}, set(), set()]
    m, per = ft.typing_metrics(gold, pred)
    # |p&g| = 1, 1, 0, 0 -> 2; sum|p| = 3; sum|g| = 4
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["strict_acc"] == 0.25  # only the empty == empty example
    # macro P over examples with predictions: (1/2 + 1) / 2; macro R over examples with gold: (1 + 1/2 + 0) / 3
    assert m["macro_precision"] == pytest.approx(0.75) and m["macro_recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.6)
    assert per["person"] == dict(precision=1.0, recall=1.0, f1=1.0, correct=1, predicted=1, gold=1)
    assert per["group"]["predicted"] == 1 and per["group"]["precision"] == 0.0
    m, _ = ft.typing_metrics([{"person"}], [set()])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_glue_metrics_hand_computed():
    # CoLA: TP 1, FN 1, TN 2, FP 0 -> (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3)
    m = ft.glue_metrics(fd.GLUE["CoLA"], [1, 1, 0, 0], [1, 0, 0, 0])
    assert m == {"mcc": pytest.approx(2 / math.sqrt(12))}
    # MRPC: 3 of 4 right; F1 of class 1 = 2 TP / (2 TP + FP + FN) = 2 / 3
    m = ft.glue_metrics(fd.GLUE["MRPC"], [1, 1, 0, 0], [1, 0, 0, 0])
    assert m == {"acc": 0.75, "f1": pytest.approx(2 / 3)}
    # STS-B: centred x = (-1.5, -.5, .5, 1.5), y = (-3.25, -1.25, .75, 3.75)
    m = ft.glue_metrics(fd.GLUE["STS-B"], [2.0, 4.0, 6.0, 9.0], [1.0, 2.0, 3.0, 4.0])
    assert m["pearson"] == pytest.approx(11.5 / math.sqrt(5 * 26.75)) and m["spearman"] == pytest.approx(1.0)
    m = ft.glue_metrics(fd.GLUE["RTE"], [0, 1, 1], [0, 1, 0])
    assert m == {"acc": pytest.approx(2 / 3)}


def test_summarize_mean_and_sample_std():
    runs = [dict(metrics={"dev": {"f1": v}}) for v in (0.5, 0.7, 0.9)]
    s = ft.summarize(runs)["dev"]["f1"]
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["values"] == [0.5, 0.7, 0.9]
    assert ft.summarize(runs[:1])["dev"]["f1"]["std"] == 0.0


# ----------------------------------------------------------------------------- readers

def test_read_tacred_inclusive_ends(tmp_path):
    rows = fd.read_tacred(os.path.join(FIX, "tacred", "train.json"))
    r = {x["id"]: x for x in rows}["fx002"]
    assert r["token"][r["subj_start"]:r["subj_end"] + 1] == ["Max", "Weber"]
    assert r["token"][r["obj_start"]:r["obj_end"] + 1] == ["Berlin"]
    bad = dict(r, id="bad", subj_end=len(r["token"]))
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match="bad.json: row 0 \\(id bad\\).*subj_end"):
        fd.read_tacred(str(tmp_path / "bad.json"))


def test_fewrel_conversion_keeps_spans_and_splits():
    with open(os.path.join(FIX, "fewrel", "val_wiki.json")) as f:
        data = json.load(f)
    s = fd.fewrel_to_tacred(data, split_seed=0)
    assert {k: len(v) for k, v in s.items()} == {"train": 14, "dev": 2, "test": 4}  # 7/1/2 of 10 per relation
    ids = [r["id"] for rows in s.values() for r in rows]
    assert sorted(ids) == sorted(f"{p}-{i}" for p in data for i in range(10))  # a partition
    for rows in s.values():
        for r in rows:
            pid, i = r["id"].split("-")
            x = data[pid][int(i)]
            assert " ".join(r["token"][r["subj_start"]:r["subj_end"] + 1]).lower() == x["h"][0]
            assert " ".join(r["token"][r["obj_start"]:r["obj_end"] + 1]).lower() == x["t"][0]
            assert r["relation"] == pid
    # P36 heads have two mentions: the first one is used
    r = next(r for r in s["train"] if r["relation"] == "P36")
    assert r["subj_start"] == 0
    assert fd.fewrel_to_tacred(data, split_seed=0) == s
    assert [r["id"] for r in fd.fewrel_to_tacred(data, split_seed=1)["test"]] != [r["id"] for r in s["test"]]
    with pytest.raises(ValueError, match="--fewrel-split"):
        fd.fewrel_to_tacred(data, percents=(70, 20, 20))


def test_read_open_entity_maps_general_types():
    rows = fd.read_open_entity(os.path.join(FIX, "open_entity", "train.json"))
    assert [r["types"] for r in rows] == [["location", "place"], ["location", "place"], ["object"], ["person"],
                                           ["location", "organization"], []]
    r = rows[2]
    assert r["words"][r["start"]:r["end"] + 1] == ["the", "official", "language"]
    assert r["words"][:r["start"]] == ["He", "said"]


def test_read_glue_all_nine_formats():
    def read(task, split="dev"):
        spec = fd.GLUE[task]
        return fd.read_glue_tsv(os.path.join(FIX, "glue", task, f"{split}.tsv"), spec)
    assert read("CoLA", "train")[1] == ("is capital the of france paris .", None, "0")  # no header row
    assert read("SST-2", "train")[2] == ('the " official " city is fine ', None, "1")  # quotes kept
    assert read("MRPC", "train")[0] == ("the capital of france is paris .", "paris is the capital of france .", "1")
    assert read("MRPC", "train")[4][0] == 'he said " paris " .'  # byte-order mark and quotes handled
    assert len(read("QQP", "train")) == 5  # the malformed row is skipped, as in run_glue
    assert read("STS-B")[1] == ("tokyo is the capital of japan .", "berlin is the capital of germany .", 2.2)
    assert read("MNLI", "dev_matched")[1] == ("the capital of france is paris .", "paris is in italy .", "contradiction")
    assert len(read("MNLI", "dev_mismatched")) == 3 and read("MNLI", "train")[2][2] == "neutral"
    assert read("QNLI")[0] == ("where is rome ?", "rome is in italy .", "entailment")
    assert read("RTE")[1][2] == "not_entailment" and read("WNLI")[0][2] == "1"
    assert fd.glue_task("sst2").name == "SST-2" and fd.glue_task("sts-b").name == "STS-B"
    with pytest.raises(SystemExit, match="unknown task 'BoolQ'"):
        fd.glue_task("BoolQ")


def test_read_glue_bad_label_names_file_and_line(tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tyes\n")
    with pytest.raises(ValueError, match="dev.tsv:2: RTE label 'yes'"):
        fd.read_glue_tsv(str(tmp_path / "dev.tsv"), fd.GLUE["RTE"])


def test_glue_hf_loader(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit, match="needs internet"):
        fd.read_glue_hf(fd.GLUE["CoLA"])

    def fake(path, name):
        feats = datasets.Features(sentence=datasets.Value("string"),
                                  label=datasets.ClassLabel(names=["unacceptable", "acceptable"]))
        ds = datasets.Dataset.from_dict(dict(sentence=["a b", "b a"], label=[1, 0]), features=feats)
        return {"train": ds, "validation": ds}
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert fd.read_glue_hf(fd.GLUE["CoLA"]) == {"train": [("a b", None, "1"), ("b a", None, "0")],
                                                "dev": [("a b", None, "1"), ("b a", None, "0")]}


def test_missing_data_error_names_where_to_get_it(tmp_path):
    args = make_args(["--task", "fewrel", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="val_wiki.json.*thunlp/FewRel"):
        fd.find_data(args, ("", "fewrel"), ("val_wiki.json",))
    args = make_args(["--task", "glue", "--data-dir", str(tmp_path)])
    cfg = ft.resolve(args, "glue")
    with pytest.raises(SystemExit, match="RTE needs train.tsv, dev.tsv.*--glue-source hf"):
        fd.load_glue(cfg, fd.GLUE["RTE"])


def test_no_data_dir_and_no_shared_data_is_named(monkeypatch):
    monkeypatch.setattr(lama, "default_data_dir", lambda: None)  # a checkout without ../shared/data
    with pytest.raises(SystemExit, match=r"--task fewrel: --data-dir not given and \.\./shared/data.*thunlp/FewRel"):
        fd.find_data(make_args(["--task", "fewrel"]), ("", "fewrel"), ("val_wiki.json",))
    cfg = ft.resolve(make_args(["--task", "glue"]), "glue")
    with pytest.raises(SystemExit, match=r"--task glue: --data-dir not given.*--glue-source hf"):
        fd.load_glue(cfg, fd.GLUE["RTE"])


# ----------------------------------------------------------------------------- markers and truncation

E = [(1, 1, "[E1]", "[/E1]"), (3, 4, "[E2]", "[/E2]")]


@pytest.mark.parametrize("spans,expected", [
    (E, "a [E1] b [/E1] c [E2] d e [/E2]"),  # subject before object
    ([(3, 3, "[E1]", "[/E1]"), (0, 1, "[E2]", "[/E2]")], "[E2] a b [/E2] c [E1] d [/E1] e"),  # object first
    ([(0, 1, "[E1]", "[/E1]"), (2, 2, "[E2]", "[/E2]")], "[E1] a b [/E1] [E2] c [/E2] d e"),  # adjacent
    ([(1, 3, "[E1]", "[/E1]"), (2, 2, "[E2]", "[/E2]")], "a [E1] b [E2] c [/E2] d [/E1] e"),  # nested
])
def test_insert_markers(spans, expected):
    assert " ".join(ft.insert_markers("a b c d e".split(), spans)) == expected


def test_encode_marked_positions(tiny_mlm):
    _, tok = tiny_mlm
    ids_of = ft.add_markers(tok)
    words = "The capital of France is Paris .".split()
    prefix = " " if tok.tokenize(" the") != tok.tokenize("the") else ""
    piece = lambda w: tok(prefix + w, add_special_tokens=False)["input_ids"]
    for spans in ([(5, 5, "[E1]", "[/E1]"), (3, 3, "[E2]", "[/E2]")],   # object before subject
                  [(3, 3, "[E1]", "[/E1]"), (4, 5, "[E2]", "[/E2]")]):  # adjacent spans
        ids, pos = ft.encode_marked(tok, words, spans, ids_of, 64, "entity-start")
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert [ids[p] for p in pos] == [ids_of["[E1]"], ids_of["[E2]"]]
        for (s, e, o, c), p in zip(spans, pos):
            inside = ids[p + 1:ids.index(ids_of[c])]
            assert inside == sum((piece(w) for w in words[s:e + 1]), [])
    assert ft.encode_marked(tok, words, spans, ids_of, 64, "cls")[1] == [0]


def test_truncate_keeps_markers():
    ids = list(range(20))
    assert ft.truncate(ids, [8, 10, 12, 14], [8, 12], 8) == list(range(8, 16))  # all markers fit in one window
    assert ft.truncate(ids, [2, 4, 15, 17], [2, 15], 14) == list(range(2, 16))  # only the start markers fit
    assert ft.truncate(ids, [2, 4, 15, 17], [2, 15], 6) == [1, 2, 3, 14, 15, 16]  # a window around each start
    assert ft.truncate(ids, [0, 1], [0], 30) == ids


def test_long_sentence_keeps_both_start_markers(bert_tok):
    ids_of = ft.add_markers(bert_tok)
    words = ["paris"] * 40 + ["berlin"] + ["rome"] * 40 + ["madrid"] + ["rome"] * 10
    spans = [(40, 40, "[E1]", "[/E1]"), (81, 81, "[E2]", "[/E2]")]
    ids, pos = ft.encode_marked(bert_tok, words, spans, ids_of, 16, "entity-start")
    assert len(ids) == 16 and [ids[p] for p in pos] == [ids_of["[E1]"], ids_of["[E2]"]]
    assert ids[pos[0] + 1] == bert_tok.convert_tokens_to_ids("berlin")
    assert ids[pos[1] + 1] == bert_tok.convert_tokens_to_ids("madrid")


# ----------------------------------------------------------------------------- training and end to end

def test_training_loop_fits_a_tiny_task(tiny_model_dir):
    """The loop must actually learn: a tiny BERT memorises 20 FewRel fixture rows (2 relations)."""
    import common
    args = ft.resolve(make_args(["--model-dir", tiny_model_dir, "--epochs", "15", "--lr", "1e-3"]), "fewrel")
    with open(os.path.join(FIX, "fewrel", "val_wiki.json")) as f:
        rows = [r for s in fd.fewrel_to_tacred(json.load(f)).values() for r in s]
    model, tok = common.load_mlm(tiny_model_dir)
    ids_of = ft.add_markers(tok)
    model.resize_token_embeddings(len(tok))
    feats = ft.relation_features(tok, rows, {"P17": 0, "P36": 1}, ids_of, 64, "entity-start")
    torch.manual_seed(0)
    net = ft.Finetuner(model.base_model, 2, 2)
    stats = ft.train(net, feats, "single", args, 0, tok.pad_token_id, "cpu")
    out = ft.predict(net, feats, 8, tok.pad_token_id, "cpu")
    assert stats["steps"] == 15 * 2 and stats["train_loss"] < 0.1
    assert (out.argmax(1) == [f["label"] for f in feats]).all()


def check_result(path, task, splits, metric):
    with open(path) as f:
        res = json.load(f)
    assert {"task", "model_dir", "config", "commit", "seed", "metrics", "per_seed", "data"} <= set(res)
    assert res["task"] == task
    for split in splits:
        m = res["metrics"][split][metric]
        assert set(m) == {"mean", "std", "values"} and 0.0 <= m["mean"] <= 1.0
    return res


def test_end_to_end_tacred(tiny_model_dir, tmp_path):
    args = make_args(["--task", "tacred", "--model-dir", tiny_model_dir, "--data-dir", os.path.join(FIX, "tacred"),
                      "--output-dir", str(tmp_path), "--epochs", "1", "--seeds", "1,2", "--batch-size", "4"])
    path = ft.TASKS["tacred"](args)
    res = check_result(path, "tacred", ("dev", "test"), "f1")
    assert res["seed"] == [1, 2] and [r["seed"] for r in res["per_seed"]] == [1, 2]
    assert len(res["metrics"]["test"]["f1"]["values"]) == 2
    assert res["data"]["labels"][0] == NA and "per:title" in res["data"]["labels"]  # test-only label kept
    assert res["config"]["epochs"] == 1 and res["config"]["lr"] == ft.TASK_DEFAULTS["tacred"]["lr"]
    assert "per_relation" not in res["per_seed"][0] and "dev" in res["per_seed"][0]["detail"]
    # paths in the repository are recorded relative to it; tiny_model_dir lies elsewhere (absolute)
    assert res["config"]["data_dir"] == res["data"]["source"] == os.path.join("tests", "fixtures", "tacred")


def test_end_to_end_fewrel(tiny_model_dir, tmp_path):
    args = make_args(["--task", "fewrel", "--model-dir", tiny_model_dir, "--data-dir", FIX, "--output-dir",
                      str(tmp_path), "--epochs", "1", "--train-limit", "6", "--pool", "cls"])
    res = check_result(ft.TASKS["fewrel"](args), "fewrel", ("dev", "test"), "f1")
    assert res["data"]["sizes"] == {"train": 6, "dev": 2, "test": 4}
    m = res["metrics"]["test"]
    assert m["f1"]["mean"] == m["precision"]["mean"] == m["accuracy"]["mean"]  # no no_relation class
    assert res["seed"] == [0]


def test_end_to_end_open_entity(tiny_model_dir, tmp_path):
    args = make_args(["--task", "open-entity", "--model-dir", tiny_model_dir, "--data-dir",
                      os.path.join(FIX, "open_entity"), "--output-dir", str(tmp_path), "--epochs", "1"])
    res = check_result(ft.TASKS["open-entity"](args), "open-entity", ("dev", "test"), "f1")
    assert {"strict_acc", "macro_f1", "precision", "recall"} <= set(res["metrics"]["test"])
    assert set(res["per_seed"][0]["detail"]["test"]) == set(fd.GENERAL_TYPES)
    assert res["data"]["untyped_train_rows"] == 1


def test_end_to_end_glue(tiny_model_dir, tmp_path):
    args = make_args(["--task", "glue", "--model-dir", tiny_model_dir, "--data-dir", os.path.join(FIX, "glue"),
                      "--output-dir", str(tmp_path), "--epochs", "1", "--glue-tasks", "CoLA,STS-B,MNLI,MRPC"])
    with open(ft.TASKS["glue"](args)) as f:
        res = json.load(f)
    assert res["task"] == "glue" and set(res["columns"]) == {"CoLA", "STS-B", "MNLI-m", "MNLI-mm", "MRPC"}
    assert res["average"] == pytest.approx(sum(res["columns"].values()) / 5)
    assert res["columns"]["CoLA"] == pytest.approx(100 * res["metrics"]["CoLA"]["dev"]["mcc"]["mean"])
    assert "main metric" in res["average_definition"]
    assert set(res["metrics"]["MNLI"]) == {"dev_matched", "dev_mismatched"}
    assert set(res["metrics"]["STS-B"]["dev"]) == {"pearson", "spearman"}
    assert set(res["metrics"]["MRPC"]["dev"]) == {"acc", "f1"}
    assert len(res["files"]) == 4
    assert res["config"]["data_dir"] == os.path.join("tests", "fixtures", "glue")
    cola = check_result(os.path.join(tmp_path, "glue-CoLA.json"), "glue-CoLA", ("dev",), "mcc")
    assert cola["config"]["data_dir"] == res["config"]["data_dir"]
    assert cola["data"]["source"] == os.path.join("tests", "fixtures", "glue", "CoLA")
    assert cola["data"]["sizes"]["dev"] == cola["data"]["full_sizes"]["dev"]  # the dev set in full by default


# ----------------------------------------------------------------------------- real data (if present)

@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")
def test_real_data_formats():
    rows = fd.read_tacred(os.path.join(SHARED, "tacred_sample", "dev.json"))
    assert len(rows) == 20 and sum(r["relation"] != NA for r in rows) == 7
    with open(os.path.join(SHARED, "fewrel", "val_wiki.json")) as f:
        s = fd.fewrel_to_tacred(json.load(f))
    assert {k: len(v) for k, v in s.items()} == {"train": 16 * 490, "dev": 16 * 70, "test": 16 * 140}
    r = next(r for rows in s.values() for r in rows if r["id"] == "P177-0")  # "cape girardeau bridge" crosses "mississippi river"
    assert r["token"][r["subj_start"]:r["subj_end"] + 1] == ["Cape", "Girardeau", "Bridge"]
    assert r["token"][r["obj_start"]:r["obj_end"] + 1] == ["Mississippi", "River"]
    oe = fd.read_open_entity(os.path.join(SHARED, "open_entity", "crowd", "train.json"))
    assert len(oe) == 1998 and sum(not r["types"] for r in oe) == 288
    assert sum("person" in r["types"] for r in oe) == 803
    sizes = {"CoLA": (8551, 1043), "MRPC": (3667, 408), "RTE": (2490, 277), "SST-2": (67349, 872)}
    for task, (n_train, n_dev) in sizes.items():
        spec = fd.GLUE[task]
        d = os.path.join(SHARED, "glue_data", task)
        assert len(fd.read_glue_tsv(os.path.join(d, "train.tsv"), spec)) == n_train
        assert len(fd.read_glue_tsv(os.path.join(d, "dev.tsv"), spec)) == n_dev


# ----------------------------------------------------------------------------- GLUE average, default eval sizes

def test_glue_average_is_the_papers_table3_avg():
    """Table 3 rows (RoBERTa, KEPLER, TRELM) -> the printed AVG 86.4, 84.9, 86.7: nine columns (MNLI-m
    and -mm apart), one main metric each; the second metrics (MRPC F1, STS-B Spearman) do not enter."""
    def summary(mnli_m, mnli_mm, qqp, qnli, sst2, cola, stsb, mrpc, rte):
        m = lambda **kw: {k: {"mean": v / 100} for k, v in kw.items()}
        return {"MNLI": {"dev_matched": m(acc=mnli_m), "dev_mismatched": m(acc=mnli_mm)},
                "QQP": {"dev": m(acc=qqp, f1=10.0)}, "QNLI": {"dev": m(acc=qnli)}, "SST-2": {"dev": m(acc=sst2)},
                "CoLA": {"dev": m(mcc=cola)}, "STS-B": {"dev": m(pearson=stsb, spearman=10.0)},
                "MRPC": {"dev": m(acc=mrpc, f1=10.0)}, "RTE": {"dev": m(acc=rte)}}
    for row, avg in [((87.5, 87.3, 91.9, 92.8, 94.8, 63.6, 91.2, 90.2, 78.7), 86.4),
                     ((87.2, 86.5, 91.5, 92.4, 94.4, 62.3, 89.4, 89.3, 70.8), 84.9),
                     ((87.9, 87.3, 92.2, 92.6, 94.9, 63.9, 91.5, 91.2, 79.1), 86.7)]:
        columns, average = ft.glue_average(summary(*row))
        assert round(average, 1) == avg
        assert columns["MNLI-m"] == pytest.approx(row[0]) and columns["CoLA"] == pytest.approx(row[5])
        assert len(columns) == 9


def test_eval_sets_are_scored_in_full_by_default():
    for task in ft.TASK_DEFAULTS:
        assert ft.resolve(make_args(["--task", task]), task).eval_limit == 0
    assert ft.resolve(make_args(["--task", "glue", "--eval-limit", "5"]), "glue").eval_limit == 5


def test_fewrel_file_in_another_format_is_named(tiny_model_dir, tmp_path):
    import evaluate as ev
    d = tmp_path / "fewrel"
    d.mkdir()
    (d / "tacred.json").write_text(json.dumps([{"token": ["a"], "relation": "x"}, {"token": ["b"], "relation": "y"}]))
    with pytest.raises(SystemExit, match=r"--task fewrel: .*tacred\.json: top level is list; expected FewRel JSON"):
        ev.main(["--task", "fewrel", "--model-dir", tiny_model_dir, "--data-dir", str(tmp_path),
                 "--fewrel-file", "tacred.json", "--output-dir", str(tmp_path / "o")])
    bad = {"P1": [{"tokens": ["a", "b"], "h": ["a", "Q1", [[0]]], "t": ["b", "Q2", [[5]]]}]}  # position 5 of 2 tokens
    with pytest.raises(common.DataError, match=r"P1\[0\] is not a FewRel instance"):
        fd.fewrel_to_tacred(bad, source="x.json")
