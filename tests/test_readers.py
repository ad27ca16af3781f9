"""Every reader of an official benchmark format in finetune_data.py (TACRED, FewRel, Open Entity, GLUE)
refuses a malformed file with a DataError naming the file, the line or record, and what it expected;
evaluate.py turns it into one line (no traceback). Malformed files are the tests/fixtures ones, cut or
edited in tmp_path."""
import json
import os
import shutil

import pytest

import common
import evaluate as ev
import finetune_data as fd

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def copy_fixture(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), d)
    return d


# ----------------------------------------------------------------------------- TACRED

def test_tacred_truncated_json_names_file_line_and_format(tiny_model_dir, tmp_path):
    d = copy_fixture(tmp_path, "tacred")
    text = (d / "dev.json").read_text()
    (d / "dev.json").write_text(text[:text.index('"token"', 200)])  # cut inside the second row
    with pytest.raises(common.DataError, match=r"dev\.json:1:\d+: not valid JSON \(.*truncated\?\); "
                                           r"expected official TACRED JSON: a list of objects with token"):
        fd.read_tacred(str(d / "dev.json"))
    with pytest.raises(SystemExit, match=r"^evaluate.py --task tacred: .*dev\.json:1:\d+: not valid JSON"):
        ev.main(["--task", "tacred", "--model-dir", tiny_model_dir, "--data-dir", str(d),
                 "--output-dir", str(tmp_path / "out")])


def test_tacred_record_of_the_wrong_shape(tmp_path):
    rows = json.load(open(os.path.join(FIX, "tacred", "train.json")))
    cases = [(dict(rows[0], subj_start="0"), r"row 1 \(id fx001\): unexpected subj_start='0'"),
             (dict(rows[0], token=" ".join(rows[0]["token"])), r"row 1 \(id fx001\): unexpected token='Anna was"),
             (["Anna", "was", "born"], r"row 1 is a JSON list"),
             ({k: v for k, v in rows[0].items() if k != "relation"}, r"row 1 \(id fx001\) lacks \['relation'\]")]
    for bad, message in cases:
        (tmp_path / "train.json").write_text(json.dumps([rows[1], bad]))
        with pytest.raises(common.DataError, match=r"train\.json: " + message):
            fd.read_tacred(str(tmp_path / "train.json"))


# ----------------------------------------------------------------------------- FewRel

def test_fewrel_truncated_json_names_file_line_and_format(tiny_model_dir, tmp_path):
    d = tmp_path / "fewrel"
    d.mkdir()
    text = open(os.path.join(FIX, "fewrel", "val_wiki.json")).read()
    (d / "val_wiki.json").write_text(text[:len(text) // 2])
    with pytest.raises(SystemExit, match=r"^evaluate.py --task fewrel: .*val_wiki\.json:\d+:\d+: not valid JSON "
                                         r"\(.*truncated\?\); expected FewRel JSON"):
        ev.main(["--task", "fewrel", "--model-dir", tiny_model_dir, "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out")])


def test_fewrel_instance_says_what_is_wrong():
    ok = {"tokens": ["Paris", "is", "in", "France"], "h": ["paris", "Q90", [[0]]], "t": ["france", "Q142", [[3]]]}
    cases = [({k: v for k, v in ok.items() if k != "t"}, r'"t" is missing or not \[name, id, \[\[positions\], \.\.\.\]\]'),
             (dict(ok, tokens=["Paris", "is", "in", 4]), r'"tokens" is missing or not a list of strings'),
             (dict(ok, h=["paris", "Q90", [["0"]]]), r'"h" position \'0\' is not a token index in \[0, 4\)'),
             ("Paris is in France", r"a JSON str, not an object")]
    for bad, message in cases:
        with pytest.raises(common.DataError, match=r"^val_wiki\.json: P17\[1\] is not a FewRel instance: " + message
                                               + r"; expected FewRel JSON"):
            fd.fewrel_to_tacred({"P17": [ok, bad]}, source="val_wiki.json")


# ----------------------------------------------------------------------------- Open Entity

def open_entity_lines(tmp_path, edit):
    """The fixture's train.json with line 3 replaced by edit(record of line 3) (a str: written as is)."""
    lines = open(os.path.join(FIX, "open_entity", "train.json")).read().splitlines()
    new = edit(json.loads(lines[2]))
    lines[2] = new if isinstance(new, str) else json.dumps(new)
    (tmp_path / "train.json").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.json")


OPEN_ENTITY = r"expected Open Entity crowd JSON lines"  # the format every message names


@pytest.mark.parametrize("edit, message", [  # a line that is not a JSON object: common.read_jsonl's words
    (lambda r: json.dumps(r)[:-9], OPEN_ENTITY + r".*; not valid JSON \((Unterminated string|Expecting)"),
    (lambda r: "{'mention_span': 'x'}", OPEN_ENTITY + r".*; not valid JSON \(Expecting property name"),
    (lambda r: [r], OPEN_ENTITY + r".*; found a JSON list"),
    (lambda r: {k: v for k, v in r.items() if k != "y_str"}, r"lacks \['y_str'\].*" + OPEN_ENTITY),
    (lambda r: dict(r, y_str="object"), r"unexpected y_str='object'.*" + OPEN_ENTITY),  # set('object'): no type
    (lambda r: dict(r, left_context_token="He said"), r"unexpected left_context_token='He said'.*" + OPEN_ENTITY),
    (lambda r: dict(r, mention_span=" "), r"unexpected mention_span=' '.*" + OPEN_ENTITY),
])
def test_open_entity_bad_line_names_file_and_line(tmp_path, edit, message):
    path = open_entity_lines(tmp_path, edit)
    with pytest.raises(common.DataError, match=r"train\.json:3: " + message):
        fd.read_open_entity(path)


def test_open_entity_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "dev.json"
    path.write_bytes(open(os.path.join(FIX, "open_entity", "dev.json"), "rb").read() + b'{"mention_span": "\xff"}\n')
    n = len(open(os.path.join(FIX, "open_entity", "dev.json")).read().splitlines())
    with pytest.raises(common.DataError, match=rf"dev\.json:{n + 1}: expected UTF-8 text \('utf-8' codec can't decode"):
        fd.read_open_entity(str(path))


# ----------------------------------------------------------------------------- GLUE

def glue_file(task):
    return os.path.join(FIX, "glue", task, "dev_matched.tsv" if task == "MNLI" else "dev.tsv")


@pytest.mark.parametrize("task", ["RTE", "MNLI", "STS-B", "QNLI", "WNLI", "MRPC", "SST-2", "CoLA"])
def test_glue_row_one_column_short_is_refused(tmp_path, task):
    """Dropping the last field of the second data row: RTE, MNLI, QNLI, WNLI, STS-B read the label from
    the last column, so without the check a sentence (or an annotator's label) became the label."""
    spec = fd.GLUE[task]
    lines = open(glue_file(task), encoding="utf-8-sig").read().splitlines()
    row = 1 if spec.width else 2  # 0-based index of the second data row
    lines[row] = lines[row].rsplit("\t", 1)[0]
    path = tmp_path / os.path.basename(glue_file(task))
    path.write_text("\n".join(lines) + "\n")
    width = len(lines[0].split("\t"))
    where = "in the header \\(line 1\\)" if spec.width is None else f"in every {task} row"
    with pytest.raises(common.DataError, match=rf"{path.name}:{row + 1}: {width - 1} tab-separated fields; "
                                           rf"expected {width}, as {where}$"):
        fd.read_glue_tsv(str(path), spec)


@pytest.mark.parametrize("task, text, expected", [
    # the reported case: sentence2 missing, so its label was read as sentence2 and the row kept
    ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta b .\tb a .\tentailment\n1\tc d .\tnot_entailment\n",
     r"dev\.tsv:3: 3 tab-separated fields; expected 4"),
    ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta b .\tb a .\tentailment\textra\n",
     r"dev\.tsv:2: 5 tab-separated fields; expected 4"),
    ("WNLI", "sentence1\tlabel\na\t0\n",  # an SST-2-like file given as WNLI
     r"dev\.tsv:1: header of 2 tab-separated fields; a WNLI file has at least 4"),
    ("CoLA", "", r"dev\.tsv: no CoLA data rows"),
])
def test_glue_rows_and_header_are_checked(tmp_path, task, text, expected):
    (tmp_path / "dev.tsv").write_text(text)
    with pytest.raises(common.DataError, match=expected):
        fd.read_glue_tsv(str(tmp_path / "dev.tsv"), fd.GLUE[task])


def test_glue_qqp_rows_are_skipped_and_counted(capsys):
    path = os.path.join(FIX, "glue", "QQP", "train.tsv")
    assert len(fd.read_glue_tsv(path, fd.GLUE["QQP"])) == 5
    assert capsys.readouterr().out == f"{path}: skipped 1 QQP rows without 6 fields, as run_glue does\n"


def test_glue_cli_refuses_a_short_dev_row(tiny_model_dir, tmp_path):
    d = tmp_path / "glue_data"
    shutil.copytree(os.path.join(FIX, "glue", "RTE"), d / "RTE")
    lines = (d / "RTE" / "dev.tsv").read_text().splitlines()
    lines[1] = "\t".join(lines[1].split("\t")[:2] + lines[1].split("\t")[3:])  # sentence2 missing
    (d / "RTE" / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"^evaluate.py --task glue: .*RTE/dev\.tsv:2: 3 tab-separated fields; "
                                         r"expected 4"):
        ev.main(["--task", "glue", "--glue-tasks", "RTE", "--model-dir", tiny_model_dir, "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out")])
