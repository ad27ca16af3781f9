"""The study (experiments.py, study_*.py) and plots.py: the verdict rule and the prior-free score on
hand-made numbers, time to quality, the generic corpus and cache of the base PLM, and a tiny `--task pilot`
+ `--task reproduce` with 3 seeds end to end (tiny model, 2 steps), resumed from the per-run JSON alone."""
import argparse
import json
import math
import os
import shutil

import pytest

import common
import config
import evaluate
import experiments as ex
import finetune
import lama
import plots
import pretrain
import study_report as report
import study_runs as runs
import study_stats as stats
import study_variants as variants

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def test_verdict_rule_on_hand_made_numbers():
    a, b = {"0": 0.5, "1": 0.6, "2": 0.7}, {"0": 0.3, "1": 0.4, "2": 0.6}
    v = stats.verdict(a, b)  # d = 0.2, 0.2, 0.1: mean 1/6, sd 0.05774, SE 0.03333
    assert v["verdict"] == "held" and v["n"] == 3
    assert v["diff"] == pytest.approx(1 / 6) and v["se"] == pytest.approx(0.1 / math.sqrt(3) / math.sqrt(3))
    assert (v["lo"], v["hi"]) == pytest.approx((1 / 6 - 2 * v["se"], 1 / 6 + 2 * v["se"]))
    assert stats.verdict(b, a)["verdict"] == "did not hold"  # the opposite direction passes the same test
    # d = 0.1, -0.05, 0.02: mean 0.0233, SE 0.0441 -> inside 2 SE
    assert stats.verdict({"0": 0.1, "1": -0.05, "2": 0.02}, {"0": 0.0, "1": 0.0, "2": 0.0})["verdict"] == "inconclusive"
    assert stats.verdict({"0": 0.9}, {"0": 0.1})["verdict"].startswith("inconclusive (one seed")
    assert stats.verdict({}, {})["verdict"] == "not measured"
    # pairing by seed: only seeds both ran count
    assert stats.verdict({"0": 1.0, "1": 2.0, "2": 3.0}, {"1": 1.0, "2": 2.5, "3": 0.0})["n"] == 2


def test_verdict_is_seed_paired():
    """Seed effects far larger than the difference cancel in the pairs: held, although the unpaired
    spread (std ~0.4) is 40 times the difference."""
    a = {"0": 0.11, "1": 0.52, "2": 0.905}
    b = {"0": 0.10, "1": 0.50, "2": 0.89}
    assert stats.verdict(a, b)["verdict"] == "held"


def test_peak_rule():
    peak = {"0": 0.5, "1": 0.6, "2": 0.7}
    lower = {"0": 0.3, "1": 0.4, "2": 0.6}
    same = {"0": 0.52, "1": 0.57, "2": 0.71}
    higher = {"0": 0.7, "1": 0.8, "2": 0.8}
    assert stats.beats_all(peak, {"left": lower, "right": lower})["verdict"] == "held"
    assert stats.beats_all(peak, {"left": lower, "right": same})["verdict"] == "inconclusive"
    assert stats.beats_all(peak, {"left": lower, "right": higher})["verdict"] == "did not hold"


def test_prior_free_score_and_probe_se():
    per_relation = {
        "P1": {"seen": {"P@1": 0.5, "facts": 4}, "heldout": {"P@1": 0.25, "facts": 4}},
        "P2": {"seen": {"P@1": 0.2, "facts": 5}, "heldout": {"P@1": 0.2, "facts": 5}},
        "P3": {"seen": {"P@1": 0.9, "facts": 3}, "heldout": {"P@1": None, "facts": 0}},  # no held-out: skipped
    }
    score, se = stats.prior_free(per_relation, "P@1")
    assert score == pytest.approx((0.25 + 0.0) / 2)
    assert se == pytest.approx(math.sqrt(0.25 / 4 + 0.1875 / 4 + 0.16 / 5 + 0.16 / 5) / 2)


def test_time_to_reach_and_ratio_verdict():
    pts = [{"elapsed": 10.0, "score_MRR": 0.1}, {"elapsed": 20.0, "score_MRR": 0.3}, {"elapsed": 30.0, "score_MRR": 0.5}]
    assert stats.time_to_reach(pts, 0.1) == 10.0
    assert stats.time_to_reach(pts, 0.4) == pytest.approx(25.0)
    assert stats.time_to_reach(pts, 0.6) is None
    fast = {s: {"ratio": r, "reached": True} for s, r in (("0", 0.30), ("1", 0.35), ("2", 0.32))}
    assert stats.ratio_verdict(fast)["verdict"] == "held"
    bounded = dict(fast, **{"2": {"ratio": 0.32, "reached": False}})  # a lower bound cannot confirm the claim
    assert stats.ratio_verdict(bounded)["verdict"].startswith("inconclusive (TRELM did not reach")
    slow = {s: {"ratio": r, "reached": False} for s, r in (("0", 1.2), ("1", 1.4), ("2", 1.3))}
    assert stats.ratio_verdict(slow)["verdict"] == "did not hold"  # ... but can refute it


def make_data(tmp_path):
    """The tiny fixture corpus plus generic lines (its own text lines all name a probe fact)."""
    d = tmp_path / "tiny_data"
    shutil.copytree(os.path.join(FIX, "tiny_data"), d)
    with open(d / "corpus.jsonl", "a") as f:
        for t in ["The river is in the city .", "A new language was born in Asia .", "London is a city ."] * 4:
            f.write(json.dumps({"text": t}) + "\n")
    return str(d)


def test_generic_lines_name_a_malformed_probe_line(tmp_path):
    data = make_data(tmp_path)
    with open(os.path.join(data, "probes", "P36.jsonl"), "a") as f:
        f.write('{"sub_label": "Peru"\n')
    n = sum(1 for _ in open(os.path.join(data, "probes", "P36.jsonl")))
    with pytest.raises(common.DataError, match=rf"P36\.jsonl:{n}: expected one JSON object per line"):
        runs.generic_lines(os.path.join(data, "corpus.jsonl"), os.path.join(data, "probes"))


def test_generic_lines_and_metrics_name_a_malformed_line(tmp_path):
    """The base PLM's corpus and a run's metrics.jsonl: a bad line raises common.DataError naming file:line."""
    data = make_data(tmp_path)
    corpus, probes = os.path.join(data, "corpus.jsonl"), os.path.join(data, "probes")
    n = sum(1 for _ in open(corpus))
    with open(corpus, "a") as f:
        f.write('{"entities": []}\n')  # no "text"
    with pytest.raises(common.DataError, match=rf"corpus\.jsonl:{n + 1}: expected .* \"text\" field"):
        runs.generic_lines(corpus, probes)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in runs.read_metrics(str(run_dir))] == [1, 2]  # a blank line is skipped
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2\n')
    with pytest.raises(common.DataError, match=r"metrics\.jsonl:2: expected one JSON object per logged step"):
        runs.read_metrics(str(run_dir))


def test_task_args_are_what_the_cli_parses():
    """The study runs lama.py / finetune.py tasks with the arguments `evaluate.py --task T ...` parses."""
    got = runs.task_args(lama, "mini", model_dir="m", output_dir="o", data_dir="d", probe_dir="p")
    assert got == evaluate.build_parser("mini").parse_args(
        ["--task", "mini", "--model-dir", "m", "--output-dir", "o", "--data-dir", "d", "--probe-dir", "p", "--seed", "0"])
    got = runs.task_args(finetune, "fewrel", model_dir="m", output_dir="o", seed=2, seeds="2", train_limit=16,
                       eval_limit=8, epochs=1, max_seq_len=32, data_dir="d")
    assert got == evaluate.build_parser("fewrel").parse_args(
        ["--task", "fewrel", "--model-dir", "m", "--output-dir", "o", "--seed", "2", "--seeds", "2", "--train-limit",
         "16", "--eval-limit", "8", "--epochs", "1", "--max-seq-len", "32", "--data-dir", "d"])


def test_committed_study_runs_still_hit_their_cache(tmp_path, monkeypatch):
    """The committed results/ (base.json, runs/*.json) are reused as they are by this code: the base PLM's
    key and every run's key match, so `--task reproduce` retrains nothing on a fresh machine."""
    results = os.path.join(os.path.dirname(FIX), "..", "results")
    if not os.path.exists(os.path.join(results, "base.json")):
        pytest.skip("no committed study in results/")
    shutil.copytree(os.path.join(results, "runs"), tmp_path / "runs")
    args = evaluate.build_parser("reproduce").parse_args(["--task", "reproduce", "--output-dir", str(tmp_path),
                                                               "--runs-dir", str(tmp_path / "pretrain_runs")])
    assert runs.base_key(args)[0] == json.load(open(os.path.join(results, "base.json")))["metrics"]["key"]
    monkeypatch.setattr(pretrain, "train", lambda a: pytest.fail(f"retrained {a.output_dir}: its key changed"))
    model, model_id = runs.study_model(args)
    flags = {n: f for t in variants.VARIANTS.values() for n, f in t}
    names = sorted(os.listdir(tmp_path / "runs"))
    assert names
    for name in names:
        key = json.load(open(tmp_path / "runs" / name))["key"]
        rec = runs.run_record(args, key["variant"], flags[key["variant"]], key["seed"], key["steps"], model, model_id)
        assert rec["key"] == key


def test_generic_lines_keep_no_fact(tmp_path):
    data = make_data(tmp_path)
    lines, counts = runs.generic_lines(os.path.join(data, "corpus.jsonl"), os.path.join(data, "probes"))
    texts = [json.loads(l)["text"] for l in lines]
    assert "London is a city ." in texts  # names one entity, no fact
    assert not any("Berlin" in t and "Germany" in t for t in texts)  # names a probe fact's subject and object
    assert counts == {"fact_lines": 20, "text_lines_naming_a_probe_fact": 20, "generic_lines": 12}
    with pytest.raises(SystemExit, match="corpus.jsonl"):
        runs.generic_lines(os.path.join(data, "corpus.txt"), os.path.join(data, "probes"))


def study_argv(tiny_model_dir, tmp_path, data):
    bench = tmp_path / "bench"  # the real layout: fewrel/val_wiki.json, open_entity/crowd/*.json
    (bench / "open_entity").mkdir(parents=True)
    os.symlink(os.path.join(FIX, "fewrel"), bench / "fewrel")
    os.symlink(os.path.join(FIX, "open_entity"), bench / "open_entity" / "crowd")
    return ["--base-model", tiny_model_dir, "--base-steps", "3", "--base-root", str(tmp_path / "cache"),
            "--data", data, "--steps", "2", "--snapshots", "1", "--seq-len", "16", "--train-batch-size", "2",
            "--seeds", "0,1,2", "--runs-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "results"),
            "--data-dir", str(bench), "--pretrain-args", "--route-every 1 --ig-steps 2", "--ft-train-limit", "16",
            "--ft-eval-limit", "16", "--ft-epochs", "1", "--ft-max-seq-len", "32", "--pilot-steps", "1,2",
            "--floor-budgets", "16x1,8x1", "--figures", str(tmp_path / "fig"), "--report", str(tmp_path / "REPORT.md")]


def test_tiny_pilot_and_reproduce_three_seeds(tiny_model_dir, tmp_path, monkeypatch):
    argv = study_argv(tiny_model_dir, tmp_path, make_data(tmp_path))
    evaluate.main(["--task", "pilot", *argv])
    pilot = json.load(open(tmp_path / "results" / "pilot.json"))
    assert set(pilot["metrics"]) == {"1", "2"} and pilot["recommendation"]["steps"] in (1, 2)
    assert pilot["recommendation"]["estimate_seconds"]["finetune"] > 0
    with pytest.raises(SystemExit, match="bench.py --costs"):  # efficiency needs the cost axis
        evaluate.main(["--task", "efficiency", *argv])
    # a cost axis whose ratios are known: snapshots must sit at step x ratio (the frontier's other variants
    # at 2.0; the frontier's table reads every field bench.py --costs writes)
    costs = {n: 1.0 + 0.25 * i for i, (n, _) in enumerate(variants.VARIANTS["efficiency"])}  # mlm first: 1.0
    axis = {n: {"cost_over_mlm": costs.get(n, 2.0), "spread": [1.0, 2.0], "flops_over_mlm": 1.0, "trainable_share": 0.5}
            for n, _ in variants.COSTED}
    (tmp_path / "results" / "costs.json").write_text(json.dumps({"costs": axis}))
    evaluate.main(["--task", "reproduce", *argv])
    res = tmp_path / "results"
    base = json.load(open(res / "base.json"))["metrics"]
    assert base["generic_lines"] == 12 and base["key"]["steps"] == 3
    for task in ("ablation", "injection", "hparams", "efficiency"):
        m = json.load(open(res / f"{task}.json"))["metrics"]
        for name, v in m.items():
            assert sorted(v["seeds"]) == ["0", "1", "2"], (task, name)
            assert v["mean"]["score_MRR"] == pytest.approx(sum(s["score_MRR"] for s in v["seeds"].values()) / 3)
    abl = json.load(open(res / "ablation.json"))
    assert all("f1_fewrel" in s and "f1_open-entity" in s for v in abl["metrics"].values() for s in v["seeds"].values())
    eff = json.load(open(res / "efficiency.json"))["efficiency"]
    assert set(eff["time_to_dkplm_final"]) == {"0", "1", "2"} and eff["step_time_over_mlm"] == costs
    for name, seeds in eff["curves"].items():
        assert all(p["cost"] == p["step"] * costs[name] for c in seeds.values() for p in c["snapshots"])
    report = open(tmp_path / "REPORT.md").read()
    # final or pending depends on the checkout (clean or not) and the tiny pilot's draw; the rule itself is
    # tested in test_report_status_pending_until_final
    assert report.count("**Status: ") == 1 and "| claim (paper) | paper's value |" in report
    assert "TACRED 78.0 vs 76.8" in report  # Table 6 read with its columns swapped back
    for name in ("fig3_injection", "fig4_loss_vs_time", "fig5_score_vs_time", "fig6_efficiency", "fig7_theta",
                 "frontier"):
        assert os.path.getsize(tmp_path / "fig" / f"{name}.png") > 5000
    # every section REPORT.md can hold that the study makes: the F1 floor and the frontier too
    assert set(json.load(open(res / "frontier.json"))["metrics"]) == {n for n, _ in variants.VARIANTS["frontier"]}
    assert set(json.load(open(res / "f1_floor.json"))["metrics"]) == {f"{b}/{t}" for b in ("16x1", "8x1")
                                                                      for t in ("fewrel", "open-entity")}
    assert "## F1 noise floor against the fine-tuning budget" in report
    assert "## Frontier (results/frontier.md)" in report
    # resume from results/ alone (another machine: no run folders, no base PLM cache): nothing retrains
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(tmp_path / "cache")
    tasks = ("ablation", "efficiency", "frontier", "f1_floor")
    before = {t: json.load(open(res / f"{t}.json"))["metrics"] for t in tasks}
    monkeypatch.setattr(pretrain, "train", lambda args: pytest.fail(f"reran pre-training {args.output_dir}"))
    monkeypatch.setattr(finetune, "TASKS", {})  # and no fine-tuning run either: a KeyError if one ran
    evaluate.main(["--task", "reproduce", *argv])
    assert {t: json.load(open(res / f"{t}.json"))["metrics"] for t in tasks} == before


def test_base_checkpoint_is_built_once_by_concurrent_callers(tiny_model_dir, tmp_path, monkeypatch):
    """One study process per seed: both need the base PLM at once; the file lock lets one build it."""
    import threading
    import time
    argv = study_argv(tiny_model_dir, tmp_path, make_data(tmp_path))
    args = evaluate.build_parser("base").parse_args(["--task", "base", *argv])
    built, real = [], runs.build_base

    def slow(*a):
        built.append(1)
        time.sleep(0.5)  # the other caller arrives while this one builds
        return real(*a)
    monkeypatch.setattr(runs, "build_base", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(runs.base_checkpoint(args)[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(got) == 2 and got[0] == got[1]


def test_base_checkpoint_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    argv = study_argv(tiny_model_dir, tmp_path, make_data(tmp_path))
    args = evaluate.build_parser("base").parse_args(["--task", "base", *argv])
    path, rec = runs.base_checkpoint(args)
    assert os.path.exists(os.path.join(path, "config.json")) and rec["probe"]["score_MRR"] is not None
    monkeypatch.setattr(pretrain, "train", lambda args: pytest.fail("rebuilt the cached base PLM"))
    assert runs.base_checkpoint(args)[0] == path
    args.base_steps = 4  # another input -> another cache entry
    monkeypatch.undo()
    assert runs.base_checkpoint(args)[0] != path


def test_plots_skip_old_format_and_missing_dir(tmp_path, capsys):
    (tmp_path / "efficiency.json").write_text(json.dumps({"metrics": {"curves": {}, "mean_step_s": {}}}))
    plots.main(["--results", str(tmp_path), "--out", str(tmp_path / "fig")])
    assert "predates the prior-free score" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a directory"):
        plots.main(["--results", str(tmp_path / "nope")])


def test_band_is_mean_and_std_over_seeds():
    a = [{"t": 0.0, "y": 0.0}, {"t": 10.0, "y": 10.0}]
    b = [{"t": 0.0, "y": 2.0}, {"t": 5.0, "y": 7.0}, {"t": 12.0, "y": 14.0}]
    grid, mean, std = plots.band([a, b], "t", "y", n=3)
    assert list(grid) == [0.0, 5.0, 10.0]  # up to the shortest seed's end
    assert list(mean) == pytest.approx([1.0, 6.0, 11.0]) and list(std) == pytest.approx([math.sqrt(2)] * 3)


def _study_at_head(tmp_path, monkeypatch, head):
    """An empty results/ (with runs/) for a 300-step study whose HEAD is `head`, where only `head`'s code
    is current; returns (results dir, parsed reproduce args)."""
    monkeypatch.setattr(common, "git_commit", lambda: head)
    monkeypatch.setattr(report, "code_changed_since", lambda c: "" if c == head else "pretrain.py")
    out = tmp_path / "results"
    (out / "runs").mkdir(parents=True)
    return out, evaluate.build_parser("reproduce").parse_args(["--task", "reproduce", "--output-dir", str(out),
                                                               "--steps", "300"])


def test_report_status_pending_until_final(tmp_path, monkeypatch):
    out, args = _study_at_head(tmp_path, monkeypatch, "c0ffee")
    seeds = {str(s): {"score_MRR": 0.1} for s in range(3)}
    for t in ("ablation", "injection", "hparams", "efficiency"):
        (out / f"{t}.json").write_text(json.dumps({"metrics": {"trelm": {"seeds": seeds, "mean": {"score_MRR": 0.1}}}}))
    for s in range(3):
        (out / "runs" / f"trelm-n300-s{s}.json").write_text(json.dumps({"commit": "c0ffee"}))
    (out / "pilot.json").write_text(json.dumps({"recommendation": {"steps": 300, "resolves": True}}))
    assert report.pending_reasons(args, report.load_results(str(out))) == []
    (out / "runs" / "trelm-n300-s1.json").write_text(json.dumps({"commit": "c0ffee-dirty"}))
    (out / "pilot.json").write_text(json.dumps({"recommendation": {"steps": 600, "resolves": True}}))
    why = report.pending_reasons(args, report.load_results(str(out)))
    assert any("c0ffee-dirty" in w for w in why) and any("recommends --steps 600" in w for w in why)
    (out / "hparams.json").write_text(json.dumps({"metrics": {"trelm": {"score": 0.1}}}))  # an older format
    assert "hparams not run" in report.pending_reasons(args, report.load_results(str(out)))


def test_code_changed_since_looks_at_study_code_only(git_repo):
    c = git_repo.commit({"a.py": "x = 1\n", "REPORT.md": "old\n"})
    git_repo.commit({"REPORT.md": "new results\n"}, "results")  # results committed after the run: still current
    assert report.code_changed_since(c, repo=git_repo.path) == ""
    # code no study run executes: still current
    git_repo.commit({"tests/test_a.py": "y = 1\n", "subnetworks.py": "y = 1\n"}, "tests and analysis")
    assert report.code_changed_since(c, repo=git_repo.path) == ""
    git_repo.write({"a.py": "x = 2\n"})
    assert report.code_changed_since(c, repo=git_repo.path) == "a.py"
    assert report.code_changed_since(c + "-dirty", repo=git_repo.path) == "unknown or uncommitted code"
    assert "not in this clone" in report.code_changed_since("f" * 40, repo=git_repo.path)


def test_pending_accepts_runs_of_a_commit_a_same_code_check_passed(tmp_path, monkeypatch):
    out, args = _study_at_head(tmp_path, monkeypatch, "beef")
    for v in ("trelm", "mlm"):
        (out / "runs" / f"{v}-n300-s0.json").write_text(json.dumps({"commit": "c0ffee"}))
    reasons = lambda: [w for w in report.pending_reasons(args, {}) if "c0ffee" in w]
    assert reasons()  # the code changed since c0ffee
    check = {"from": "c0ffee", "to": "beef", "variants": {"trelm": True, "mlm": False}}
    (out / "code_checks.json").write_text(json.dumps([check]))
    assert reasons()  # mlm differed
    check["variants"]["mlm"] = True
    (out / "code_checks.json").write_text(json.dumps([check]))
    assert not reasons()  # every variant of c0ffee's runs is bitwise identical at code equal to HEAD's
    (out / "runs" / "mlm-n300-s1.json").write_text(json.dumps({"commit": "c0ffee-dirty"}))
    assert reasons()  # a run of uncommitted code: the check of c0ffee's committed code does not cover it
    (out / "runs" / "mlm-n300-s1.json").unlink()
    del check["variants"]["mlm"]
    (out / "code_checks.json").write_text(json.dumps([check]))
    assert reasons()  # mlm was not checked


def test_same_code_against_this_commit_is_bitwise_identical(tiny_model_dir, tmp_path):
    import subprocess
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "results"
    out.mkdir()
    fixture = os.path.join(here, "tests", "fixtures", "tiny_data")
    argv = ["--task", "same-code", "--against", head.stdout.strip(), "--check-variants", "mlm", "--check-steps", "2",
            "--model", tiny_model_dir, "--data", fixture, "--output-dir", str(out), "--seq-len", "32",
            "--train-batch-size", "4"]
    evaluate.main(argv)
    rec = json.load(open(out / "code_checks.json"))
    assert len(rec) == 1 and rec[0]["variants"] == {"mlm": True} and rec[0]["from"] == head.stdout.strip()
    with pytest.raises(SystemExit, match="--against"):
        evaluate.main([*argv[:3], "f" * 40, *argv[4:]])


def test_report_names_head_when_only_results_changed(monkeypatch):
    monkeypatch.setattr(common, "git_commit", lambda: "c0ffee-dirty")  # plots.py has just redrawn figures/
    monkeypatch.setattr(report, "code_changed_since", lambda c: "")
    assert report.code_commit() == "c0ffee"
    monkeypatch.setattr(report, "code_changed_since", lambda c: "pretrain.py")
    assert report.code_commit() == "c0ffee-dirty"


def test_tiny_frontier_on_the_cost_axis(tiny_model_dir, tmp_path):
    """--task frontier: refused without results/costs.json; with one, every snapshot's cost is its step x
    the variant's per-step cost, each routed reading gets both efficiency verdicts on that axis, and the
    frontier figure is drawn."""
    argv = study_argv(tiny_model_dir, tmp_path, make_data(tmp_path))
    argv[argv.index("--seeds") + 1] = "0,1"
    argv += ["--finetune", "none"]
    with pytest.raises(SystemExit, match=r"costs.json: no cost axis yet; run `python bench.py --costs"):
        evaluate.main(["--task", "frontier", *argv])
    names = [n for n, _ in variants.VARIANTS["frontier"]]
    costs = {n: {"cost_over_mlm": 1.0 + i / 10, "spread": [1.0, 1.0 + i / 5], "flops_over_mlm": 1.0 - i / 20,
                 "trainable_share": 0.5, "route_every": None} for i, n in enumerate(names)}
    os.makedirs(tmp_path / "results")
    (tmp_path / "results" / "costs.json").write_text(json.dumps({"costs": costs}))
    evaluate.main(["--task", "frontier", *argv])
    doc = json.load(open(tmp_path / "results" / "frontier.json"))
    for n in names:
        for curve in doc["curves"][n].values():
            assert [p["cost"] for p in curve["snapshots"]] == [p["step"] * costs[n]["cost_over_mlm"]
                                                               for p in curve["snapshots"]]
    routed = [n for n in names if n.startswith("trelm-") and n != "trelm-norouting"]
    # + 2: plain MLM's own verdicts on both cost-to-X claims (the control); + 3: attributed paths against
    # their random controls (ffn per batch, ffn and strict every 100), seed-paired on the probe score
    pairs = {k: v for k, v in doc["verdicts"].items() if "better than random ones" in k}
    assert sorted(k.split(" (")[0] for k in pairs) == ["trelm-ffn-e1-fo", "trelm-ffn-e100", "trelm-strict-e100"]
    per_seed = lambda n: {s: x["score_MRR"] for s, x in doc["metrics"][n]["seeds"].items()}
    diffs = [per_seed("trelm-strict-e100")[s] - per_seed("trelm-strict-e100-random")[s] for s in ("0", "1")]
    strict = next(v for k, v in pairs.items() if k.startswith("trelm-strict-e100 "))
    assert strict["diff"] == pytest.approx(sum(diffs) / 2) and strict["n"] == 2
    assert len(routed) == 8 and len(doc["verdicts"]) == 2 * len(routed) + 1 + 2 + 3
    assert all(v["verdict"] in ("held", "did not hold", "inconclusive") or v["verdict"].startswith("inconclusive")
               for v in doc["verdicts"].values())
    # every reading's cost verdict states MLM's beside it and was judged over the bench's spread
    assert all("mlm" in v and "cost_range" in v for k, v in doc["verdicts"].items()
               if not k.startswith("mlm") and k not in pairs)
    md = open(tmp_path / "results" / "frontier.md").read()
    assert md.count("\n| trelm-") == 9 and "| dkplm | baseline |" in md
    mlm_row = next(r for r in md.splitlines() if r.startswith("| mlm | baseline |"))
    assert not mlm_row.endswith("|  |")  # the mlm row's cost to DKPLM's final / DKPLM's
    plots.draw_all(str(tmp_path / "results"), str(tmp_path / "fig"))
    assert os.path.getsize(tmp_path / "fig" / "frontier.png") > 5000
    evaluate.main(["--task", "frontier", *argv, "--variants", "mlm,trelm-ffn-e1-fo"])  # a subset: reused, no verdict
    assert set(json.load(open(tmp_path / "results" / "frontier.json"))["metrics"]) == {"mlm", "trelm-ffn-e1-fo"}
    with pytest.raises(SystemExit, match=r"--variants: \['nope'\] not in --task frontier"):
        evaluate.main(["--task", "frontier", *argv, "--variants", "mlm,nope"])


def test_dkplm_variants_filter_both_lists():
    """--task dkplm runs the readings and the plateau: --variants names variants of either, filters both, and
    refuses a name of neither."""
    import argparse
    import study_runs
    pick = lambda v, t: [n for n, _ in study_runs.variants_of(argparse.Namespace(variants=v), t)]
    assert pick("dkplm_plain,dkplm_theta0.8", "dkplm") == ["dkplm_theta0.8", "dkplm_plain"]
    assert pick("dkplm_plain,dkplm_theta0.8", "dkplm-plateau") == []
    assert pick("mlm,dkplm_plain", "dkplm-plateau") == ["mlm"]
    with pytest.raises(SystemExit, match=r"--variants: \['trelm'\] not in --task dkplm"):
        pick("trelm", "dkplm")


def test_f1_floor_from_known_seed_noise(tmp_path, monkeypatch):
    """--task f1-floor on fine-tuning F1s whose spread is known: sigma is their std, 3 seeds resolve
    2 sigma sqrt(2/3), a 1.5-point difference needs ceil(8 (sigma / 0.015)^2) seeds; the cheapest budget
    that resolves it is recommended; a rerun reuses every recorded fine-tuning run."""
    f1 = {(500, 0): 0.50, (500, 1): 0.52, (500, 2): 0.54, (1000, 0): 0.600, (1000, 1): 0.605, (1000, 2): 0.610}
    calls = []

    def fake(args, model_dir, out_dir, task, seed):
        calls.append((args.ft_train_limit, task, seed))
        return {"f1": f1[args.ft_train_limit, seed], "se": 0.01, "n_test": 700, "seconds": 2.0}

    monkeypatch.setattr(ex, "finetune_f1", fake)
    argv = ["--task", "f1-floor", "--model", str(tmp_path), "--seeds", "0,1,2", "--floor-budgets", "500x2,1000x2",
            "--output-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    evaluate.main(argv)
    doc = json.load(open(tmp_path / "results" / "f1_floor.json"))
    r = doc["metrics"]["500x2/fewrel"]
    assert r["sigma"] == pytest.approx(0.02) and r["resolves_with_n"] == pytest.approx(2 * 0.02 * math.sqrt(2 / 3))
    assert r["seeds_needed"] == 15  # 8 * (0.02 / 0.015)^2 = 14.2
    assert doc["metrics"]["1000x2/open-entity"]["sigma"] == pytest.approx(0.005)
    assert doc["recommendation"]["budget"] == "1000x2" and doc["recommendation"]["resolving"] == ["1000x2"]
    assert doc["recommendation"]["study_f1_hours"]["1000x2"] == pytest.approx(6 * 3 * 2 * 2.0 / 3600)
    assert len(calls) == 12
    evaluate.main(argv)
    assert len(calls) == 12
    with pytest.raises(SystemExit, match="ROWSxEPOCHS"):
        evaluate.main([*argv[:-4], "--floor-budgets", "1000", *argv[-2:]])


def test_f1_rows_carry_no_verdict_below_the_noise_floor():
    """Table 6's F1 rows: a clear seed-paired F1 gap is 'held' when F1 can resolve it, and gets no verdict
    when the study's fine-tuning budget lies below F1's noise floor; the probe-score rows keep theirs."""
    def run(score, f1):
        seeds = {str(s): {"score_MRR": score + s / 100, "f1_fewrel": f1 + s / 100, "f1_open-entity": f1 + s / 100}
                 for s in range(3)}
        mean = {k: sum(v[k] for v in seeds.values()) / 3 for k in seeds["0"]}
        return {"seeds": seeds, "mean": mean, "std": {k: 0.01 for k in mean}}

    metrics = {variants.ROLES["trelm"]: run(0.20, 0.70)}
    metrics.update({variants.ROLES[r]: run(0.10, 0.60) for r in ("no-injection", "no-memory-bank", "no-routing")})
    res = {"ablation": {"metrics": metrics}}
    rows = [r for r in report.claims(res, variants.ROLES) if "Table 6" in r]
    assert len(rows) == 9 and all(r.endswith("| held |") for r in rows)
    rows = [r for r in report.claims(res, variants.ROLES, f1_verdicts=False) if "Table 6" in r]
    assert sum(r.endswith("| held |") for r in rows) == 3  # the score rows
    assert sum(r.endswith("| no verdict (below F1's noise floor) |") for r in rows) == 6


def test_dkplm_readings_change_one_thing_of_the_old_baseline():
    """Each DKPLM reading sets its flags on DKPLM_RELATION (each flag once); the fixed DKPLM is the pair of
    readings that helped, and the defaults of `pretrain.py --method dkplm` are that DKPLM."""
    base = variants.flag_values(variants.DKPLM_RELATION[1])
    assert base == {"--method": "dkplm", "--dkplm-decoder": "relation", "--dkplm-select": "above-mean"}
    assert variants.flag_values(["--a", "1", "--sw", "--b", "x"]) == {"--a": "1", "--sw": None, "--b": "x"}
    got = dict(variants.VARIANTS["dkplm"])
    assert got["dkplm_plain"] == ["--method", "dkplm", "--dkplm-decoder", "plain", "--dkplm-select", "above-mean"]
    assert got["dkplm_no-injection"] == [*variants.DKPLM_RELATION[1], "--no-injection"]
    assert got["dkplm_theta0.8"][-4:] == ["--dkplm-loss", "theta", "--theta", "0.8"]
    fixed = variants.flag_values(got["dkplm"])
    assert fixed == {**base, "--dkplm-decoder": "plain", "--dkplm-select": "at-least-mean"}
    inj = config.from_argv(["--method", "dkplm"]).injection
    assert (inj.dkplm_decoder, inj.dkplm_select) == (fixed["--dkplm-decoder"], fixed["--dkplm-select"])


def test_a_run_dir_made_under_another_key_is_never_reused(tmp_path, monkeypatch):
    """pretrain_variant reuses a run dir only under the key it was made with (study_key.json): another key
    (here other flags under the same name) or none deletes the dir and trains again; a second scale's data
    puts its runs in a folder of their own."""
    trained = []

    def fake_run(argv):
        out = argv[argv.index("--output-dir") + 1]
        os.makedirs(os.path.join(out, "final"), exist_ok=True)
        open(os.path.join(out, "final", "config.json"), "w").write("{}")
        trained.append(argv[argv.index("--method") + 1])
    monkeypatch.setattr(runs, "run_pretrain", fake_run)
    args = argparse.Namespace(runs_dir=str(tmp_path), data="mini", snapshots=4, seq_len=64, train_batch_size=16,
                              pretrain_args="")
    go = lambda flags, key: runs.pretrain_variant(args, "v", flags, 0, 8, lambda: "m", key)
    d = go(["--method", "mlm"], {"k": 1})
    assert go(["--method", "mlm"], {"k": 1}) == d and trained == ["mlm"]  # same key: reused
    open(os.path.join(d, "stale"), "w").close()
    assert go(["--method", "dkplm"], {"k": 2}) == d and trained == ["mlm", "dkplm"]  # other key: trained again
    assert not os.path.exists(os.path.join(d, "stale"))
    os.remove(os.path.join(d, "study_key.json"))
    go(["--method", "dkplm"], {"k": 2})
    assert trained == ["mlm", "dkplm", "dkplm"]  # no key recorded: not trusted
    args.data = str(tmp_path / "mini4x")
    assert go(["--method", "mlm"], {"k": 3}) == os.path.join(str(tmp_path), "mini4x", os.path.basename(d))


def test_same_code_runs_a_migrated_variant_with_its_old_flags(tmp_path):
    """A variant whose records were migrated to spelled-out flags (issue 33) is checked in the old checkout
    with the flags its runs were made with; any other variant with its current flags."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    new = dict(variants.VARIANTS["dkplm"])["dkplm_kg-detach"]
    rec = {"key": {"variant": "dkplm_kg-detach", "flags": new},
           "migrated": {"from": {"variant": "dkplm_kg-detach", "flags": ["--method", "dkplm", "--kg-grad", "off"]}}}
    (runs_dir / "dkplm_kg-detach-n300-s0.json").write_text(json.dumps(rec))
    (runs_dir / "dkplm-n300-s0.json").write_text(json.dumps({"key": {"variant": "dkplm", "flags": ["x"]}}))
    assert ex.flags_at(str(tmp_path), "dkplm_kg-detach", new) == ["--method", "dkplm", "--kg-grad", "off"]
    assert ex.flags_at(str(tmp_path), "dkplm", ["--method", "dkplm"]) == ["--method", "dkplm"]
    assert ex.flags_at(str(tmp_path / "none"), "mlm", ["--method", "mlm"]) == ["--method", "mlm"]
