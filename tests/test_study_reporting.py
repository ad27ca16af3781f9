"""The study's reporting of issue 33 on hand-made numbers (no training: run_variants is replaced by runs
whose scores and snapshot curves are known): plain MLM's verdict beside every cost-to-X claim, the cost
noise of the bench carried into the verdicts, --task dkplm's and --task scale's results, and REPORT.md's
trend between the two scales (with scale 2 missing, and present)."""
import json
import os

import pytest

import evaluate
import experiments as ex
import plots
import study_report as report
import study_stats as stats
import study_variants as variants
from paper_values import PRIMARY

STEPS = 300
T, NR, RND = variants.ROLES["trelm"], variants.ROLES["no-routing"], "trelm-ffn-e100-random"
NMB = variants.ROLES["no-memory-bank"]


def fake_res(finals, steps=STEPS):
    """run_variants' result for runs whose score rises linearly from 0 to finals[name][seed] over the run,
    probed at a quarter, half, three quarters and the end: a variant v reaches b's final score at step
    steps x b / v, so its cost ratio to b's final is (b / v) x (v's per-step cost / b's)."""
    res = {}
    for name, by_seed in finals.items():
        v = res.setdefault(name, {"flags": ["--method", name], "seeds": {}, "records": {}})
        for s, final in by_seed.items():
            snaps = [{"step": k, "elapsed": float(k), PRIMARY: final * k / steps} for k in
                     (steps // 4, steps // 2, 3 * steps // 4, steps)]
            v["records"][str(s)] = {"curve": {"snapshots": snaps, "loss": [{"step": steps, "l_mlm": 3.0}]}}
            v["seeds"][str(s)] = {PRIMARY: final, "se_MRR": 0.04, "final_l_mlm": 3.0}
        v["mean"] = {k: stats.fmean(x[k] for x in v["seeds"].values()) for k in (PRIMARY, "se_MRR", "final_l_mlm")}
        v["std"] = {k: stats.stdev([x[k] for x in v["seeds"].values()]) for k in v["mean"]}
    return res


def cost(median, repeats, **extra):
    return {"cost_over_mlm": median, "repeats": repeats, "spread": [min(repeats), max(repeats)],
            "flops_over_mlm": 1.0, "trainable_share": 0.7, "route_every": None, **extra}


# every variant the tasks below read, with a tight bench (about +-1%, paired by round)
COSTS = {"mlm": cost(1.0, [1.0, 1.0, 1.0]), "dkplm": cost(1.1, [1.09, 1.1, 1.11]),
         T: cost(1.1, [1.09, 1.1, 1.11]), NR: cost(1.05, [1.04, 1.05, 1.06]), NMB: cost(1.1, [1.09, 1.1, 1.11]),
         RND: cost(1.0, [0.99, 1.0, 1.01])}


def parse(task, out, *extra):
    return evaluate.build_parser(task).parse_args(["--task", task, "--output-dir", str(out), "--seeds", "0,1,2",
                                                   "--steps", str(STEPS), *extra])


def seeds(*xs):
    return {s: x for s, x in enumerate(xs)}


# -----------------------------------------------------------------------------
# Cost noise

def test_cost_ratio_range_paired_by_round_or_over_every_pair():
    a, b = cost(1.10, [1.05, 1.10, 1.15]), cost(1.00, [1.00, 1.02, 0.98])
    r = stats.cost_ratio_range({"a": a, "b": b}, "a", "b")  # one session: round by round
    assert r["paired"] and r["median"] == pytest.approx(1.1)
    assert (r["lo"], r["hi"]) == pytest.approx((1.05, 1.15 / 0.98))  # 1.05/1.00, 1.10/1.02, 1.15/0.98 and 1.1
    a2 = dict(a, measured={"commit": "later"})  # benched in another session: every pair
    r = stats.cost_ratio_range({"a": a2, "b": b}, "a", "b")
    assert not r["paired"] and (r["lo"], r["hi"]) == pytest.approx((1.05 / 1.02, 1.15 / 0.98))
    r = stats.cost_ratio_range({"a": a2, "b": dict(b, measured={"commit": "later"})}, "a", "b")
    assert r["paired"]  # the same later session
    no_repeats = {"a": {"cost_over_mlm": 1.1, "spread": [1.05, 1.15]},
                  "b": {"cost_over_mlm": 1.0, "spread": [1.0, 1.0]}}
    r = stats.cost_ratio_range(no_repeats, "a", "b")  # the spread's ends: every pair
    assert not r["paired"] and (r["lo"], r["hi"]) == pytest.approx((1.05, 1.15))


def test_a_verdict_the_cost_median_alone_decides_is_inconclusive():
    """ratio_s = 0.45, 0.46, 0.47 at the medians: 0.5 - ratio = 0.04 ± 0.0058 (SE), held. Scaled to the
    bench's range [0.9, 1.2] x the median they run 0.405-0.423 (held) to 0.54-0.564 (did not hold): the
    label changes within the range. A range of [0.98, 1.02] x the median keeps it held (0.441-0.479)."""
    ratios = {s: {"ratio": r, "reached": True} for s, r in (("0", 0.45), ("1", 0.46), ("2", 0.47))}
    assert stats.ratio_verdict(ratios)["verdict"] == "held"
    flips = stats.ratio_verdict(ratios, cost={"median": 1.0, "lo": 0.9, "hi": 1.2, "paired": True})
    assert flips["verdict"] == stats.COST_INCONCLUSIVE and flips["verdict_at_cost_median"] == "held"
    assert flips["at_cost_ends"] == {"lo": "held", "hi": "did not hold"} and flips["cost_range"] == [0.9, 1.2]
    assert flips["diff"] == pytest.approx(0.04)  # the effect stays the median's
    steady = stats.ratio_verdict(ratios, cost={"median": 1.0, "lo": 0.98, "hi": 1.02, "paired": True})
    assert steady["verdict"] == "held" and steady["at_cost_ends"] == {"lo": "held", "hi": "held"}
    # an inconclusive median stays inconclusive: the range only takes away what the median decided
    wide = {s: {"ratio": r, "reached": True} for s, r in (("0", 0.2), ("1", 0.5), ("2", 0.75))}
    v = stats.ratio_verdict(wide, cost={"median": 1.0, "lo": 0.5, "hi": 2.0, "paired": True})
    assert v["verdict"] == "inconclusive" and v["at_cost_ends"] == {"lo": "held", "hi": "inconclusive"}


def test_blocks_routing_verdict_rests_on_the_cost_median():
    """Issue 33's case: blocks never reaches no-routing's final score, so every seed's ratio is the lower bound
    1.087 / 1.062 (SE 0): 'did not hold' at the medians, but the bench's rounds (one session: paired) give
    blocks / no-routing from 0.992 to 1.085, and at 0.992 a lower bound below 1 refutes nothing."""
    costs = {"blocks": cost(1.087159, [1.152346, 1.075317, 1.087159, 1.051027, 1.115476]),
             NR: cost(1.061831, [1.061831, 1.021716, 1.093552, 1.032548, 1.123942])}
    q = stats.cost_ratio_range(costs, "blocks", NR)
    assert q["paired"] and q["lo"] == pytest.approx(1.115476 / 1.123942)
    assert q["hi"] == pytest.approx(1.152346 / 1.061831)
    ratios = {str(s): {"ratio": q["median"], "reached": False} for s in range(3)}
    assert stats.ratio_verdict(ratios, claim=1.0)["verdict"] == "did not hold"
    v = stats.ratio_verdict(ratios, claim=1.0, cost=q)
    assert v["verdict"] == stats.COST_INCONCLUSIVE and v["at_cost_ends"]["hi"] == "did not hold"
    assert v["at_cost_ends"]["lo"].startswith("inconclusive (TRELM did not reach")


# -----------------------------------------------------------------------------
# Plain MLM in every cost-to-X claim

def test_mlm_passing_the_efficiency_claim_says_it_is_not_evidence(tmp_path, monkeypatch):
    """TRELM reaches DKPLM's final (0.09) at 0.09 / 0.24 x 1.1 / 1.1 = 0.375 of DKPLM's cost: held. Plain MLM
    at 0.09 / 0.24 x 1.0 / 1.1 = 0.341 (held: then TRELM's verdict says it is no evidence), or, scoring
    0.14, at 0.09 / 0.14 / 1.1 = 0.584 (did not hold: TRELM's verdict stands, with MLM's beside it)."""
    def run(mlm_final):
        out = tmp_path / f"mlm{mlm_final}"
        res = fake_res({"mlm": seeds(*[mlm_final + d for d in (0, 0.001, 0.002)]), "dkplm": seeds(0.09, 0.09, 0.09),
                        T: seeds(0.24, 0.241, 0.242), NMB: seeds(0.2, 0.2, 0.2), NR: seeds(0.25, 0.25, 0.25)})
        monkeypatch.setattr(ex, "run_variants", lambda args, task, steps=None: res)
        monkeypatch.setattr(ex, "load_costs", lambda args, task: COSTS)
        ex.run_efficiency(parse("efficiency", out))
        return out, json.load(open(out / "efficiency.json"))

    out, doc = run(0.24)
    eff = doc["efficiency"]
    assert [r["ratio"] for r in eff["mlm_time_to_dkplm_final"].values()] == pytest.approx(
        [0.09 / (0.24 + d) / 1.1 for d in (0, 0.001, 0.002)])
    assert eff["mlm_ratio_verdict"]["verdict"] == "held" and eff["ratio_verdict"]["verdict"] == "held"
    assert eff["ratio_verdict"]["mlm"] == "held" and eff["ratio_verdict"]["note"] == stats.NOT_EVIDENCE
    assert doc["verdicts"]["plain MLM cost to DKPLM's final <= 0.5 of DKPLM's (control)"]["verdict"] == "held"
    assert set(eff["mlm_module_verdicts"]) == {"no-memory-bank", "no-routing"}
    assert all("mlm" in v for v in eff["module_verdicts"].values())  # every cost-to-X verdict states MLM's
    md = open(out / "efficiency.md").read()
    assert f"TRELM cost to DKPLM's final <= 0.5 of DKPLM's: **held; {stats.NOT_EVIDENCE}**" in md
    rows = report.claims({"efficiency": doc}, variants.ROLES)
    trelm_row = next(r for r in rows if r.startswith("| TRELM needs <= 50%"))
    assert trelm_row.endswith("| held; holds for plain MLM as well: not evidence for TRELM |")
    assert "per-step cost ratio" in trelm_row  # judged over the bench's range
    control = next(r for r in rows if r.startswith("| control: plain MLM"))
    assert "ratio per seed: 0.34, 0.34, 0.34" in control and control.endswith("| held |")

    out, doc = run(0.14)  # MLM slower: 0.58, held for TRELM alone
    eff = doc["efficiency"]
    assert eff["mlm_ratio_verdict"]["verdict"] == "did not hold"
    assert eff["ratio_verdict"]["verdict"] == "held" and "note" not in eff["ratio_verdict"]
    assert stats.verdict_text(eff["ratio_verdict"]) == "held; plain MLM: did not hold"


def test_report_recomputes_the_control_for_results_made_before_it():
    """An efficiency.json without mlm's verdict (the first study's, or this one's before the rerun): REPORT.md
    recomputes plain MLM's ratios from the recorded curves and states them beside TRELM's."""
    res = fake_res({"mlm": seeds(0.24, 0.241, 0.242), "dkplm": seeds(0.09, 0.09, 0.09), T: seeds(0.24, 0.24, 0.24),
                    NMB: seeds(0.2, 0.2, 0.2), NR: seeds(0.25, 0.25, 0.25)})
    curves = {n: {s: r["curve"] for s, r in v["records"].items()} for n, v in res.items()}
    tr = stats.efficiency_ratios(res, variant=T)
    eff = {"time_to_dkplm_final": tr, "ratio_verdict": stats.ratio_verdict(tr), "curves": curves,
           "time_to_ablation_final": {r: tr for r in ("no-memory-bank", "no-routing")},
           "module_verdicts": {r: stats.ratio_verdict(tr, claim=1.0) for r in ("no-memory-bank", "no-routing")}}
    metrics = {n: {k: v[k] for k in ("seeds", "mean", "std")} for n, v in res.items()}
    rows = report.claims({"efficiency": {"metrics": metrics, "efficiency": eff}}, variants.ROLES)
    control = next(r for r in rows if r.startswith("| control: plain MLM"))
    assert "(recomputed from the recorded curves)" in control and control.endswith("| held |")
    assert next(r for r in rows if r.startswith("| TRELM needs")).endswith(f"| held; {stats.NOT_EVIDENCE} |")


# -----------------------------------------------------------------------------
# --task dkplm, --task scale and the trend

def test_dkplm_readings_and_plateau(tmp_path, monkeypatch):
    """Each reading against the old baseline (dkplm_relation) with its effect and only the flags it changes,
    MLM against DKPLM as fixed, and the plateau: DKPLM gains 6 points from 300 to 1200 steps, MLM 2, so the
    MLM - DKPLM gap (7 -> 3) narrows; REPORT.md carries the table."""
    old = variants.DKPLM_RELATION[0]
    short = fake_res({"mlm": seeds(0.16, 0.165, 0.17), old: seeds(0.09, 0.095, 0.10),
                      **{n: seeds(0.09, 0.096, 0.099) for n, _ in variants.VARIANTS["dkplm"][2:]}})
    short["dkplm_theta"] = fake_res({"x": seeds(0.12, 0.13, 0.14)})["x"]
    short["dkplm_theta"]["flags"] = [*variants.DKPLM_RELATION[1], "--dkplm-loss", "theta"]
    for n, f in variants.VARIANTS["dkplm"]:
        short[n]["flags"] = f
    short["dkplm"] = fake_res({"x": seeds(0.09, 0.095, 0.10)})["x"]
    short["dkplm"]["flags"] = variants.DKPLM[1]
    long = fake_res({"mlm": seeds(0.18, 0.185, 0.19), "dkplm": seeds(0.15, 0.154, 0.159)}, steps=4 * STEPS)
    monkeypatch.setattr(ex, "run_variants", lambda args, task, steps=None: short if task == "dkplm" else long)
    out = tmp_path / "results"
    ex.run_dkplm(parse("dkplm", out))
    doc = json.load(open(out / "dkplm.json"))
    v = doc["verdicts"]
    assert v[f"dkplm_theta probes better than {old}"]["verdict"] == "held"
    assert v[f"dkplm_theta probes better than {old}"]["diff"] == pytest.approx(0.035)
    assert v["mlm probes better than dkplm"]["diff"] == pytest.approx(0.07)
    assert v["dkplm probes better at 1200 steps than at 300"]["verdict"] == "held"
    assert v["the mlm - dkplm gap narrows from 300 to 1200 steps"]["verdict"] == "held"
    assert v["the mlm - dkplm gap narrows from 300 to 1200 steps"]["diff"] == pytest.approx(0.04, abs=1e-3)
    assert doc["plateau_steps"] == 1200 and set(doc["plateau"]) == {"mlm", "dkplm"}
    md = open(out / "dkplm.md").read()
    assert "| dkplm_theta | `--dkplm-loss theta` | 13.0 ± 1.0 |" in md and "+3.5 [" in md
    assert "| dkplm_plain | `--dkplm-decoder plain` |" in md  # a replaced flag: only the change is shown
    assert "| dkplm | `--dkplm-decoder plain --dkplm-select at-least-mean` |" in md
    args = parse("report", out, "--report", str(tmp_path / "REPORT.md"), "--figures", str(tmp_path / "fig"))
    report.write_report(args)
    assert "## Our DKPLM, reading by reading" in open(tmp_path / "REPORT.md").read()
    assert "| dkplm_theta | `--dkplm-loss theta`" in open(tmp_path / "REPORT.md").read()
    asked = []  # --plateau 0: the readings alone, no 4x runs asked for
    monkeypatch.setattr(ex, "run_variants", lambda args, task, steps=None: asked.append(task) or short)
    ex.run_dkplm(parse("dkplm", out, "--plateau", "0"))
    assert asked == ["dkplm"] and "Not run (`--plateau 0`)" in open(out / "dkplm.md").read()
    assert not any("steps" in k for k in json.load(open(out / "dkplm.json"))["verdicts"])


def test_trend_rule_on_hand_made_effects():
    e = lambda x, se, ref=0.0, bounded=False: {"effect": x, "se": se, "ref": ref, "bounded": bounded}
    assert stats.trend(e(-0.03, 0.005), e(-0.08, 0.005)) == "grows"  # a larger penalty: 0.05 > 2 x 0.0071
    assert stats.trend(e(-0.03, 0.005), e(-0.02, 0.005)) == "holds"  # 0.01 <= 2 x 0.0071
    assert stats.trend(e(0.05, 0.005), e(0.01, 0.005)) == "shrinks"
    assert stats.trend(e(0.05, 0.005), e(-0.03, 0.005)) == "reverses"  # past 0 by more than its 2 SE
    assert stats.trend(e(0.05, 0.005), e(-0.005, 0.005)) == "shrinks"  # past 0, but within its 2 SE
    assert stats.trend(e(0.46, 0.03, 1.0), e(0.25, 0.03, 1.0)) == "grows"  # a ratio: the saving grows
    assert stats.trend(e(0.46, 0.03, 1.0), e(1.1, 0.01, 1.0, True)) == "reverses (lower bounds in some seeds)"
    assert stats.trend(None, e(0.1, 0.01)) == "not measured"
    assert stats.trend(e(0.1, None), e(0.1, 0.01)) == "unresolved (one seed)"


def test_scale_task_and_the_trend_section(tmp_path, monkeypatch):
    """Scale 1 (the frontier's runs) and scale 2 (--task scale into results/scale2) with known effects: TRELM
    without routing over MLM reverses (+0.9 -> -12.6), the routing penalty grows (-3 -> -8), TRELM > DKPLM
    holds (+5.4 -> +5.4), attribution reverses (+1.0 -> -6.3), TRELM's ratio to DKPLM's final (DKPLM's
    score / TRELM's: equal per-step costs) grows its saving (0.63 -> 0.48); with scale 2 missing, the
    section says "not run yet" and no figure is drawn."""
    out = tmp_path / "results"
    s1 = fake_res({"mlm": seeds(0.16, 0.165, 0.17), "dkplm": seeds(0.09, 0.092, 0.088),
                   NR: seeds(0.17, 0.172, 0.18), T: seeds(0.14, 0.142, 0.15), RND: seeds(0.13, 0.142, 0.13)})
    monkeypatch.setattr(ex, "run_variants", lambda args, task, steps=None: s1)
    monkeypatch.setattr(ex, "load_costs", lambda args, task: COSTS)
    ex.run_frontier(parse("frontier", out, "--variants", ",".join(["mlm", "dkplm", NR, T, RND])))
    lines = "\n".join(report.scale_section(str(out), "fig"))
    assert "Scale 2: not run yet" in lines and "| routing: TRELM > TRELM without routing | -3.0 [" in lines
    assert lines.count("| not run yet | not run yet |") == len(stats.SCALE_CLAIMS)
    assert json.load(open(report.write_scale_trend(str(out))))["scale2"] is None
    plots.fig_scale_trend(str(out), str(tmp_path / "fig"))
    assert not os.path.exists(tmp_path / "fig" / "scale_trend.png")

    s2 = fake_res({"mlm": seeds(0.30, 0.31, 0.32), "dkplm": seeds(0.05, 0.052, 0.048), NR: seeds(0.18, 0.182, 0.19),
                   T: seeds(0.10, 0.102, 0.11), RND: seeds(0.16, 0.17, 0.17)}, steps=4 * STEPS)
    monkeypatch.setattr(ex, "run_variants", lambda args, task, steps=None: s2)
    ex.run_scale(parse("scale", out / "scale2", "--steps", str(4 * STEPS)))
    doc = json.load(open(out / "scale2" / "scale.json"))
    assert set(doc["efficiency"]) == {T, NR, "mlm"}
    assert doc["verdicts"]["routing: TRELM > TRELM without routing"]["diff"] == pytest.approx(-0.08)
    v = {n: doc["verdicts"][f"{n}: cost to DKPLM's final <= 0.5 of DKPLM's"] for n in (T, NR, "mlm")}
    assert v["mlm"]["verdict"] == "held" and stats.verdict_text(v[T]) == "inconclusive; plain MLM: held"
    assert v[NR]["verdict"] == "held" and v[NR]["note"] == stats.NOT_EVIDENCE  # 0.05 / 0.18 x 1.05 / 1.1 = 0.27
    tv = v[T]
    assert "cost_range" in tv and "probe-set SE of one run's score" in open(out / "scale2" / "scale.md").read()

    rows = {r.split(" | ")[0][2:]: r for r in report.scale_section(str(out), "fig") if r.startswith("| ")}
    assert rows["routing: TRELM > TRELM without routing"].endswith("| grows |")
    assert rows["TRELM > DKPLM"].endswith("| holds |")
    assert rows["attribution: TRELM > random neurons held as long"].endswith("| reverses |")
    assert rows["TRELM's cost to DKPLM's final / DKPLM's"].endswith("| grows |")
    ratio = stats.claim_effects(doc)["TRELM's cost to DKPLM's final / DKPLM's"]
    pairs = ((0.05, 0.10), (0.052, 0.102), (0.048, 0.11))  # (DKPLM's final, TRELM's) per seed
    assert ratio["effect"] == pytest.approx(stats.fmean([d / t for d, t in pairs]))
    lines = report.scale_section(str(out), "fig")
    assert any(l.startswith("- Scale 1: 300 steps") for l in lines)
    assert any(l.startswith("- Scale 2: 1200 steps") for l in lines)
    trend = json.load(open(report.write_scale_trend(str(out))))  # what plots.py draws
    assert trend["scale2"]["steps"] == 4 * STEPS and [c["trend"] for c in trend["claims"]][:4] == [
        "reverses", "grows", "reverses", "holds"]
    plots.fig_scale_trend(str(out), str(tmp_path / "fig"))
    assert os.path.getsize(tmp_path / "fig" / "scale_trend.png") > 5000
