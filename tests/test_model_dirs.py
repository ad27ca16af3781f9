"""A pretrain.py run root passed where a model directory is expected (pretrain.py --model, evaluate.py
--model-dir, subnetworks.py --model: all go through common.resolve_model) resolves to its final/, or
without one to its newest step_NNNNNN/ snapshot, and says which in one line; a directory that is neither
a model nor a run root is refused in one line naming the flag."""
import json
import os
import shutil

import pytest

import common
import evaluate as ev


def run_root(tmp_path, model_dir, subdirs):
    """A pretrain.py output directory: the run record config.json that pretrain.py writes there
    ({"config", "commit", ...}: no "model_type"), metrics.jsonl, and a copy of `model_dir` in each of
    `subdirs`."""
    root = tmp_path / "runs" / "trelm"
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": {"method": "trelm", "model": "minilm"},
                                                  "commit": "0123abc", "world_size": 1}))
    (root / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    for d in subdirs:
        shutil.copytree(model_dir, root / d)
    return root


def test_run_root_resolves_to_final(tiny_model_dir, tmp_path, capsys):
    root = run_root(tmp_path, tiny_model_dir, ["final", "checkpoint", "step_000002"])
    assert common.resolve_model(str(root), "--model-dir") == str(root / "final")
    model, tok = common.load_mlm(str(root), flag="--model-dir")  # a second resolution: no second line
    assert model.config.hidden_size == 32 and tok.mask_token == "[MASK]"
    out = capsys.readouterr().out.splitlines()
    assert out == [f"--model-dir {root}: a pretrain.py run directory; using its final model, {root / 'final'}"]


def test_run_root_without_final_takes_the_newest_snapshot(tiny_model_dir, tmp_path, capsys):
    # step_1000000 is newer than step_999999 although it sorts before it as text; .step_2000000.tmp is a
    # save that was interrupted, step_3000000 holds no model: neither counts
    root = run_root(tmp_path, tiny_model_dir, ["checkpoint", "step_000002", "step_999999", "step_1000000",
                                               ".step_2000000.tmp"])
    (root / "step_3000000").mkdir()
    assert common.resolve_model(str(root)) == str(root / "step_1000000")
    line = capsys.readouterr().out.strip()
    assert line == (f"--model {root}: a pretrain.py run directory without final/ (not finished); using its newest "
                    f"snapshot, {root / 'step_1000000'} ({root / 'checkpoint'} holds the latest training state)")
    shutil.rmtree(root / "checkpoint")
    shutil.copytree(tiny_model_dir, root / "final")  # the run finished: final/ wins over every snapshot
    assert common.resolve_model(str(root)) == str(root / "final")


def test_evaluate_scores_the_final_model_of_a_run_root(tiny_model_dir, tmp_path, capsys):
    """`evaluate.py --task mini --model-dir runs/trelm` with pretrain.py's own config.json in runs/trelm."""
    root = run_root(tmp_path, tiny_model_dir, ["final", "checkpoint"])
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "relations.jsonl").write_text('{"relation": "P36", "template": "The capital of [X] is [Y] ."}\n')
    (probes / "P36.jsonl").write_text(json.dumps({"sub_label": "France", "obj_label": "Paris", "split": "seen"}) + "\n")
    res = json.load(open(ev.main(["--task", "mini", "--model-dir", str(root), "--probe-dir", str(probes),
                                  "--output-dir", str(tmp_path / "out")])))
    assert res["config"]["model_path"] == str(root / "final")
    assert capsys.readouterr().out.count(f"a pretrain.py run directory; using its final model, {root / 'final'}") == 1
    final = json.load(open(ev.main(["--task", "mini", "--model-dir", str(root / "final"), "--probe-dir", str(probes),
                                    "--output-dir", str(tmp_path / "final")])))
    assert res["metrics"] == final["metrics"]


def test_run_root_with_no_model_yet_is_one_line(tiny_model_dir, tmp_path):
    root = run_root(tmp_path, tiny_model_dir, [])  # pretrain.py died before its first save
    with pytest.raises(SystemExit, match=r"^--model-dir .*/runs/trelm: its config.json is not a Hugging Face model "
                                         r"config .*no final/ or step_NNNNNN/ in it holds a model.*"
                                         r"found \['config.json', 'metrics.jsonl'\]$"):
        common.load_mlm(str(root), flag="--model-dir")
    (root / "checkpoint").mkdir()
    with pytest.raises(SystemExit, match=r"^--model .*/runs/trelm: a pretrain.py run that has not finished \(no final/\) "
                                         r"and has no step_NNNNNN/ snapshot; continue it with `pretrain.py --resume"):
        common.resolve_model(str(root))


def test_a_model_directory_is_itself(tiny_model_dir, tmp_path):
    # a model saved with save_pretrained that also holds a final/ subfolder is still the model itself
    shutil.copytree(tiny_model_dir, os.path.join(tiny_model_dir, "final"))
    assert common.resolve_model(tiny_model_dir) == tiny_model_dir
    assert common.is_model_dir(tiny_model_dir) and not common.is_model_dir(str(tmp_path))
