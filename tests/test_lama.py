"""LAMA / LAMA-UHN probing (lama.py): metrics with ties, the readers' errors, LAMA's fact filters, the
common vocabulary for WordPiece and byte-level BPE, the UHN filters and file writer, the CLI (evaluate.py)."""
import json
import os
import re
import shutil

import pytest
import torch

import common
import evaluate
import lama

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
LAMA = os.path.join(FIXTURES, "lama")
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")


# --- metrics ---------------------------------------------------------------------------------

def test_rank_ties_are_optimistic():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0]])
    # gold 2 ties with 1 for first place; all tie; gold 0 is last of five
    assert lama.rank_of(scores, torch.tensor([2, 3, 0])).tolist() == [1, 1, 5]
    # gold 4 (score 2) has two strictly higher (3, 3) -> rank 3; gold 3 (score 0) -> rank 5
    assert lama.rank_of(scores[:1].repeat(2, 1), torch.tensor([4, 3])).tolist() == [3, 5]


def test_rank_metrics_hand_computed():
    # ranks 1, 2, 10, 11: P@1 = 1/4, P@10 = 3/4, MRR = (1 + 1/2 + 1/10 + 1/11) / 4
    m = lama.rank_metrics(torch.tensor([1, 2, 10, 11]))
    assert m["P@1"] == pytest.approx(0.25)
    assert m["P@10"] == pytest.approx(0.75)
    assert m["MRR"] == pytest.approx((1 + 0.5 + 0.1 + 1 / 11) / 4)
    assert m["facts"] == 4
    # with ties: 12 candidates, gold tied with 9 others at the top and 2 below -> rank 1
    scores = torch.tensor([[1.0] * 10 + [0.0, 0.0]])
    assert lama.rank_metrics(lama.rank_of(scores, torch.tensor([9])))["P@1"] == 1.0
    assert lama.rank_metrics(lama.rank_of(scores, torch.tensor([11])))["P@10"] == 0.0


def test_macro_average_skips_empty_relations():
    per = {"a": {"P@1": 1.0, "P@10": 1.0, "MRR": 1.0, "facts": 1},
           "b": {"P@1": 0.0, "P@10": 0.5, "MRR": 0.25, "facts": 3},
           "c": lama.rank_metrics(torch.zeros(0, dtype=torch.long))}
    m = lama.macro(per)
    assert m["P@1"] == pytest.approx(0.5) and m["P@10"] == pytest.approx(0.75)
    assert m["MRR"] == pytest.approx(0.625) and m["P@1_micro"] == pytest.approx(0.25)
    assert (m["relations"], m["facts"]) == (2, 4)


# --- readers and LAMA's filters ----------------------------------------------------------------

def test_read_lama_relation_both_formats():
    full = lama.read_lama_relation(os.path.join(LAMA, "TREx", "P36.jsonl"), "The capital of [X] is [Y] .")
    assert full[0]["sub_label"] == "France" and full[0]["uuid"] == "f-1"
    assert full[0]["masked_sentence"] == "The capital of France is [MASK] ."
    labels = lama.read_lama_relation(os.path.join(LAMA, "TREx_labels", "P1376", "test.jsonl"))
    assert labels[0] == {"sub_label": "Paris", "obj_label": "France"}


def test_read_errors_name_file_and_line(tmp_path):
    p = tmp_path / "P1.jsonl"
    p.write_text('{"sub_label": "a", "obj_label": "b"}\n{"subject": "a"}\n')
    with pytest.raises(common.DataError, match=r"P1.jsonl:2: expected 'sub_label'"):
        lama.read_lama_relation(str(p))


FACT, RELATION = '{"sub_label": "x", "obj_label": "y"}', '{"relation": "P0", "template": "[X] is [Y] ."}'


@pytest.mark.parametrize("name, good, line, expected", [
    ("P1.jsonl", FACT, '{"sub_label": "a", "obj_label": ', "expected one JSON object per line; not valid JSON"),
    ("P1.jsonl", FACT, '["Paris", "France"]', "expected one JSON object per line; found a JSON list"),
    ("P1.jsonl", FACT, '{"sub_label": "a", "obj_label": 5}', "expected string subject and object labels; found 'a' and 5"),
    ("P1.jsonl", FACT, '{"sub_label": "a", "obj_label": "b", "judgments": ["yes"]}', "expected 'judgments' to be a list"),
    ("relations.jsonl", RELATION, "42", "expected one JSON object per line; found a JSON int"),
    ("relations.jsonl", RELATION, '{"relation": "P1"}', "expected 'relation' and 'template'; found keys ['relation']"),
    ("relations.jsonl", RELATION, '{"relation": "P1", "template": 5}', "expected a string 'relation' and 'template'"),
    ("relations.jsonl", RELATION, '{"relation": "P1", "template": "[X] is it ."}', "template '[X] is it .' must contain"),
])
def test_malformed_line_names_file_line_and_expectation(tmp_path, name, good, line, expected):
    """A fact file (read_lama_relation) or relations.jsonl (read_templates): line 3 is bad (blank lines count)."""
    p = tmp_path / name
    p.write_text(good + "\n\n" + line + "\n")
    read = lama.read_templates if name == "relations.jsonl" else lama.read_lama_relation
    with pytest.raises(common.DataError, match=re.escape(f"{p}:3: {expected}")):
        read(str(p))


def test_non_utf8_line_names_file_and_line(tmp_path):
    p = tmp_path / "P1.jsonl"
    p.write_bytes(b'{"sub_label": "a", "obj_label": "b"}\n{"sub_label": "\xff", "obj_label": "b"}\n')
    with pytest.raises(common.DataError, match=re.escape(f"{p}:2: expected UTF-8 text")):
        lama.read_lama_relation(str(p))


def test_cli_malformed_relations_file_is_one_line(tmp_path):
    """Through evaluate.py, a malformed LAMA line ends the run with one line naming file and line."""
    shutil.copytree(LAMA, tmp_path / "lama")
    rel = tmp_path / "lama" / "relations.jsonl"
    lines = rel.read_text().splitlines()
    rel.write_text("\n".join(lines[:1] + ['{"relation": "P36", "template": 7}'] + lines[1:]) + "\n")
    with pytest.raises(SystemExit, match=re.escape(f"evaluate.py --task trex: {rel}:2: expected a string")):
        evaluate.main(["--task", "trex", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "res")])


def test_google_re_judgment_filter():
    facts = lama.read_lama_relation(os.path.join(LAMA, "Google_RE", "place_of_birth_test.jsonl"))
    # g-1 3 yes; g-2 2 no vs 1 yes (drop); g-3 1-1 tie (kept, as LAMA); g-4 2 skip vs 1 yes (drop)
    assert [lama.judgment_ok(f) for f in facts] == [True, False, True, False, True]
    assert lama.judgment_ok({"sub_label": "x", "obj_label": "y"})  # T-REx: no judgments


def test_relation_discovery_prefers_full_files():
    rels, missing = lama.lama_relations(LAMA, "T-REx")
    by = {r[1]: r for r in rels}
    assert by["P36"][4] == "full" and by["P36"][3].endswith(os.path.join("TREx", "P36.jsonl"))
    assert by["P1376"][4] == "labels"
    assert missing == ["P166"]
    g, gmiss = lama.lama_relations(LAMA, "Google-RE")
    assert [r[1] for r in g] == ["place_of_birth", "date_of_birth"] and gmiss == ["place_of_death"]


def test_common_vocab_bert_uncased(bert_tok):
    path, lower = lama.common_vocab_path(LAMA, lama.is_uncased(bert_tok))
    assert lama.is_uncased(bert_tok) and lower
    cands = lama.Candidates(bert_tok, lama.read_vocab(path, lower))
    # 18 words; 1815 is [UNK] and zanzibar is several pieces in the tiny vocabulary
    assert len(cands.ids) == 16
    got = cands.locate(["paris", "tokyo bay", "delhi", "1815"])
    assert isinstance(got[0], int) and cands.ids[got[0]] == bert_tok.convert_tokens_to_ids("paris")
    assert got[1:] == ["multi_token", "not_in_common_vocab", "multi_token"]


def test_common_vocab_roberta_leading_space(roberta_tok):
    assert not lama.is_uncased(roberta_tok) and lama.space_prefix(roberta_tok) == " "
    cands = lama.Candidates(roberta_tok, ["Paris", "Berlin", "Zanzibar", "paris"])
    ids = cands.ids.tolist()
    assert roberta_tok.convert_tokens_to_ids("ĠParis") in ids
    assert roberta_tok.convert_tokens_to_ids("ĠBerlin") in ids
    assert len(ids) == 2  # "Zanzibar" and lower-case "paris" are not single tokens here
    pos = cands.locate(["Paris"])[0]
    assert roberta_tok.convert_ids_to_tokens(int(cands.ids[pos])) == "ĠParis"
    assert cands.locate(["Zanzibar"]) == ["multi_token"]


def test_prepare_facts_counts(bert_tok):
    cands = lama.Candidates(bert_tok, lama.read_vocab(*lama.common_vocab_path(LAMA, True)))
    kept, counts = lama.prepare_facts(lama.read_lama_relation(os.path.join(LAMA, "TREx", "P36.jsonl")), cands)
    assert [(s, o) for s, o, _, _ in kept] == [("france", "paris"), ("germany", "berlin"), ("italy", "rome"),
                                              ("spain", "madrid"), ("united kingdom", "london")]
    assert counts == {"read": 8, "kept": 5, "judgments": 0, "multi_token": 1, "not_in_common_vocab": 1,
                      "duplicate": 1}
    kept, counts = lama.prepare_facts(
        lama.read_lama_relation(os.path.join(LAMA, "Google_RE", "place_of_birth_test.jsonl")), cands)
    assert [o for _, o, _, _ in kept] == ["london", "paris", "madrid"] and counts["judgments"] == 2


# --- inference ---------------------------------------------------------------------------------

def test_score_ranks_match_full_forward(tiny_mlm):
    """Batched, length-sorted, head-on-mask-only ranks equal ranks from HF's full forward pass."""
    model, tok = tiny_mlm
    words = ["Paris", "Berlin", "Rome", "London", "Tokyo", "the", "city"]
    cands = lama.Candidates(tok, words)
    queries = [lama.fill_template(t, s, tok.mask_token) for t, s in [
        ("The capital of [X] is [Y] .", "France"), ("[X] is the capital of [Y] .", "Berlin"),
        ("[Y] is a city in the United States and [X] .", "New York"), ("[X] was born in [Y] .", "A")]]
    targets = [0, 1, len(cands.ids) - 1, 2]
    ranks = lama.score_ranks(model, tok, queries, targets, cands, batch_size=3)
    ref = []
    with torch.no_grad():
        for q, t in zip(queries, targets):
            enc = tok(q, return_tensors="pt")
            pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
            s = model(**enc).logits[0, pos][cands.ids]  # (C,)
            ref.append(int(1 + (s > s[t]).sum()))
    assert ranks.tolist() == ref


def test_two_masks_is_an_error(bert_tok):
    from conftest import make_model
    model = make_model("bert", bert_tok)
    with pytest.raises(ValueError, match="2 mask tokens"):
        list(lama.mask_hidden(model, bert_tok, ["[MASK] is [MASK] ."], 2))


# --- LAMA-UHN ------------------------------------------------------------------------------------

def test_uhn_string_filter():
    assert lama.uhn_string_match({"sub_label": "Paris Hilton", "obj_label": "Paris"})
    assert lama.uhn_string_match({"sub_label": "The Berlin Wall", "obj_label": "berlin"})
    assert not lama.uhn_string_match({"sub_label": "Ada Lovelace", "obj_label": "London"})


def biased_model(tok, word):
    """Tiny BERT whose MLM head always predicts `word` first (decoder bias 1e4)."""
    from conftest import make_model
    model = make_model("bert", tok)
    with torch.no_grad():
        common.head_decoder(model)[1][tok.convert_tokens_to_ids(word)] = 1e4
    return model


def test_uhn_name_filter_and_writer_round_trip(bert_tok, tmp_path):
    model = biased_model(bert_tok, "paris")
    rels = lama.lama_relations(LAMA, "T-REx")[0] + lama.lama_relations(LAMA, "Google-RE")[0]
    new, counts = lama.build_lama_uhn(rels, str(tmp_path), model, bert_tok, top_k=1, batch_size=2)
    # P19: Paris Hilton (string), Marie Curie -> Paris (name filter: the model always says paris)
    assert counts["T-REx"]["P19"] == {"read": 4, "string_match": 1, "person_name": 1, "kept": 2}
    assert counts["T-REx"]["P36"] == {"read": 8, "string_match": 0, "person_name": 0, "kept": 8}
    assert counts["T-REx"]["P1376"] == {"read": 5, "string_match": 1, "person_name": 0, "kept": 4}
    assert counts["Google-RE"]["place_of_birth"] == {"read": 5, "string_match": 1, "person_name": 1, "kept": 3}
    out = dict((r[1], r[3]) for r in new)
    assert out["P19"] == os.path.join(str(tmp_path), "TREx", "P19.jsonl")
    assert out["place_of_birth"] == os.path.join(str(tmp_path), "Google_RE", "place_of_birth_test.jsonl")
    back = lama.read_lama_relation(out["P19"])
    orig = lama.read_lama_relation(os.path.join(LAMA, "TREx", "P19.jsonl"))
    assert back == [orig[0], orig[3]]  # Ada Lovelace, Hans Weber: every field preserved
    labels = lama.read_lama_relation(out["P1376"])
    assert labels[0] == {"sub_label": "Paris", "obj_label": "France", "predicate_id": "P1376"}
    gre = lama.read_lama_relation(out["place_of_birth"])
    assert [f["uuid"] for f in gre] == ["g-1", "g-2", "g-4"] and "judgments" in gre[0]


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_trex_end_to_end(tiny_model_dir, tmp_path):
    out = str(tmp_path / "res")
    path = evaluate.main(["--task", "trex", "--model-dir", tiny_model_dir, "--data-dir", FIXTURES,
                    "--output-dir", out, "--batch-size", "4"])
    assert path == os.path.join(out, "trex.json")
    res = json.load(open(path))
    assert res["task"] == "trex" and res["model_dir"] == tiny_model_dir and res["seed"] == 0
    assert res["missing_relations"] == {"T-REx": ["P166"]}
    c = res["counts"]["T-REx"]
    assert c["P36"]["format"] == "full" and c["P1376"]["format"] == "labels"
    assert (c["P36"]["kept"], c["P1376"]["kept"], c["P19"]["kept"]) == (5, 5, 4)
    assert c["total"]["read"] == 17 and c["total"]["kept"] == 14
    m = res["metrics"]["T-REx"]
    per = res["per_relation"]["T-REx"]
    assert m["relations"] == 3 and m["facts"] == 14
    assert m["P@1"] == pytest.approx(sum(per[r]["P@1"] for r in ("P19", "P36", "P1376")) / 3)
    assert res["config"]["num_candidates"] == 16 and res["config"]["uncased"]
    # the same P@1 from HF's full forward pass over the same 16 candidates
    model, tok = common.load_mlm(tiny_model_dir)
    cands = lama.Candidates(tok, lama.read_vocab(*lama.common_vocab_path(LAMA, True)))
    kept, _ = lama.prepare_facts(lama.read_lama_relation(os.path.join(LAMA, "TREx", "P36.jsonl")), cands)
    hits = 0
    with torch.no_grad():
        for sub, _, pos, _ in kept:
            enc = tok(f"The capital of {sub} is {tok.mask_token} .", return_tensors="pt")
            i = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]
            hits += int(model(**enc).logits[0, i][cands.ids].argmax() == pos)
    assert per["P36"]["P@1"] == pytest.approx(hits / len(kept))


def test_cli_lama_uhn_end_to_end(tiny_model_dir, tmp_path):
    out = str(tmp_path / "res")
    path = evaluate.main(["--task", "lama-uhn", "--model-dir", tiny_model_dir, "--data-dir", FIXTURES,
                    "--output-dir", out, "--uhn-filter-model", "self"])
    res = json.load(open(path))
    assert os.path.exists(os.path.join(out, "lama_uhn", "TREx", "P1376.jsonl"))
    assert res["uhn_counts"]["T-REx"]["P1376"]["string_match"] == 1
    assert res["counts"]["T-REx"]["P1376"]["read"] == 4  # probed the filtered file
    assert set(res["metrics"]) == {"Google-RE", "T-REx"}
    assert res["per_relation"]["Google-RE"]["date_of_birth"]["facts"] == 0  # 1815 is no single token


def test_cli_missing_data_dir_names_the_file(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"(?s)lama does not exist.*data\.zip"):
        evaluate.main(["--task", "trex", "--model-dir", tiny_model_dir, "--data-dir", str(tmp_path)])
    with pytest.raises(common.DataError, match=r"(?s)shared/data.*relations\.jsonl.*dl\.fbaipublicfiles"):
        lama.lama_root(None)
    root = tmp_path / "lama"
    (root / "TREx").mkdir(parents=True)
    (root / "relations.jsonl").write_text('{"relation": "P36", "template": "The capital of [X] is [Y] ."}\n')
    (root / "TREx" / "P36.jsonl").write_text('{"sub_label": "France", "obj_label": "Paris"}\n')
    with pytest.raises(SystemExit, match=r"common_vocab_cased\.txt: file not found"):
        evaluate.main(["--task", "trex", "--model-dir", tiny_model_dir, "--data-dir", str(tmp_path)])


def test_cli_mini_seen_heldout_gap(tiny_model_dir, tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "relations.jsonl").write_text(
        '{"relation": "P36", "template": "The capital of [X] is [Y] .", "label": "capital", "type": "1-1"}\n')
    rows = [("France", "Paris", "seen"), ("Germany", "Berlin", "seen"), ("Italy", "Rome", "heldout"),
            ("Japan", "Tokyo", "heldout"), ("Spain", "Buenos Aires", "heldout")]
    (probes / "P36.jsonl").write_text("".join(json.dumps(
        {"sub_label": s, "obj_label": o, "predicate_id": "P36", "uuid": str(i), "split": sp}) + "\n"
        for i, (s, o, sp) in enumerate(rows)))
    path = evaluate.main(["--task", "mini", "--model-dir", tiny_model_dir, "--probe-dir", str(probes),
                          "--output-dir", str(tmp_path / "res")])
    res = json.load(open(path))
    m = res["metrics"]
    assert m["seen"]["facts"] == 2 and m["heldout"]["facts"] == 2  # "buenos aires" is multi-token
    assert m["gap_P@1"] == pytest.approx(m["seen"]["P@1"] - m["heldout"]["P@1"])
    assert res["counts"]["P36"]["multi_token"] == 1
    assert set(res["per_relation"]["P36"]) == {"seen", "heldout"}


def test_every_task_has_one_module_and_its_flags_parse():
    """evaluate.py dispatches each --task to the one module whose TASKS holds it; that module's flags
    parse beside the shared ones (argparse raises on a flag defined twice)."""
    tasks = [t for m in evaluate.MODULES for t in m.TASKS]
    assert len(tasks) == len(set(tasks)), "a task claimed by two modules"
    assert set(lama.TASKS) == {"lama", "google-re", "trex", "lama-uhn", "mini"}
    for t in tasks:
        args = evaluate.build_parser(t).parse_args(["--task", t])
        assert args.task == t and t in evaluate.TASK_MODULE[t].TASKS


# --- the real LAMA files (skipped without ../shared/data) -------------------------------------------

@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "lama")), reason="../shared/data/lama absent")
def test_real_lama_files():
    root = os.path.join(SHARED, "lama")
    rels, missing = lama.lama_relations(root, "T-REx")
    assert len(rels) == 41 and sorted(missing) == ["P102", "P166", "P1923", "P54", "P69"]
    assert sum(r[4] == "full" for r in rels) == 28
    facts = {r[1]: lama.read_lama_relation(r[3], r[2]) for r in rels}
    assert sum(map(len, facts.values())) == 34039
    common_cased = set(lama.read_vocab(os.path.join(root, "common_vocabs", "common_vocab_cased.txt")))
    assert len(common_cased) == 21018
    # LAMA's T-REx was built for the cased common vocabulary: every object is in it
    assert all(f["obj_label"] in common_cased for fs in facts.values() for f in fs)
    g, gmiss = lama.lama_relations(root, "Google-RE")
    assert len(g) == 3 and gmiss == []
    gfacts = [f for r in g for f in lama.read_lama_relation(r[3])]
    assert len(gfacts) == 5528
    assert sum(not lama.judgment_ok(f) for f in gfacts) == 0  # LAMA's *_test files are pre-filtered


def test_cli_uhn_filter_model_unavailable(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"(?s)--uhn-filter-model .*no_such_model.*--uhn-filter-model self"):
        evaluate.main(["--task", "lama-uhn", "--model-dir", tiny_model_dir, "--data-dir", FIXTURES,
                 "--output-dir", str(tmp_path), "--uhn-filter-model", str(tmp_path / "no_such_model")])


# --- model paths: each case its own message, naming the flag typed ------------------------------

def test_model_dir_messages_name_the_flag(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match=r"^--model-dir runs/nope/final: no such directory$"):
        common.load_mlm("runs/nope/final", flag="--model-dir")
    with pytest.raises(SystemExit, match=r"^--model-dir .*/nothing: no such directory$"):
        evaluate.main(["--task", "mini", "--model-dir", str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^--model-dir .*/empty: the directory is empty"):
        common.load_mlm(str(tmp_path / "empty"), flag="--model-dir")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"^--model .*/other: no config.json.*\['notes.txt'\]"):
        common.load_mlm(str(tmp_path / "other"))
    (tmp_path / "unfinished" / "checkpoint").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^--model-dir .*/unfinished: a pretrain.py run that has not finished "
                                         r"\(no final/\).*--resume"):
        common.load_mlm(str(tmp_path / "unfinished"), flag="--model-dir")
    with pytest.raises(SystemExit, match=r"^--model no-such-org/no-such-model: not a local directory and not in the "
                                         r"Hugging Face cache.*pass the local directory to --model\.$"):
        common.load_mlm("no-such-org/no-such-model")


def test_help_states_each_default_once():
    text = evaluate.build_parser("glue").format_help() + evaluate.build_parser("mini").format_help()
    blocks, cur = [], ""
    for line in text.splitlines():
        if line.startswith("  -"):
            blocks.append(cur)
            cur = ""
        cur += " ".join(line.split()) + " "
    blocks.append(cur)
    doubled = [b for b in blocks if "(default: " in b and b.count("default") > 1]  # help's own + appended
    assert not doubled, doubled
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: results)" in " ".join(text.split())  # plain defaults are still shown


def test_killed_writes_leave_no_tmp_files(tmp_path):
    (tmp_path / ".tmp-mini.jsonab12cd_3").write_text("")  # a write killed before its rename
    (tmp_path / ".tmp-other.jsonab12cd_3").write_text("")  # another file's: not ours to delete
    common.write_result(str(tmp_path), "mini", "m", {}, 0, {"P@1": 1.0})
    assert sorted(os.listdir(tmp_path)) == [".tmp-other.jsonab12cd_3", "mini.json"]
