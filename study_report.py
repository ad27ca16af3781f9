"""REPORT.md and the markdown the study's tasks write: per claim of the paper, its value, ours (mean ± std
over seeds), the seed-paired effect with its 2-SE interval and the verdict (study_stats.py's rule), and a
status line: final, or pending with the reasons (too few seeds, no pilot, a base PLM that had not
plateaued, or runs made at a commit whose study code differs from this checkout's and that no same-code
check covers).

    python evaluate.py --task report     # plots.py + REPORT.md from the results present (no training)
"""
import json
import os

import common
import plots
from paper_values import PAPER, PAPER_PEAKS, PRIMARY
from study_runs import plateaued
from study_stats import (SCALE_CLAIMS, against_mlm, claim_effects, cost_note, efficiency_ratios, ratio_verdict,
                         trend, values, verdict, verdict_text)
from study_variants import FIRST_READING, READING, ROLES, STRICT

def fmt(mean, std=None, scale=100):
    """'12.3' or '12.3 ± 1.0' (x scale); 'n/a' for a value not measured."""
    if mean is None:
        return "n/a"
    return f"{scale * mean:.1f}" if std is None else f"{scale * mean:.1f} ± {scale * std:.1f}"


def table(res, names_labels, cols):
    """Markdown table of mean ± std over seeds (x 100)."""
    head = "| variant | seeds | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {label} | {len(res[n]['seeds'])} | " +
                          " | ".join(fmt(res[n]["mean"].get(c), res[n]["std"].get(c)) for c in cols) + " |\n"
                          for n, label in names_labels if n in res)


COLS = ("score_MRR", "score_P@1", "se_MRR", "seen_MRR", "heldout_MRR", "f1_fewrel", "f1_open-entity")


def header(args, title):
    """The heading of a task's markdown: its title, the seeds and budget, what the score is."""
    return (f"## {title}\nx 100, mean ± std over seeds {args.seeds}, {args.steps} steps; score = per-relation "
            "seen - held-out, macro-averaged; se_MRR = probe-set SE of one run's score.\n\n")


def effect(v, scale=100):
    """A verdict's seed-paired mean difference with its 2-SE interval and n (x scale: 100 for scores, one
    decimal; 1 for cost ratios' margins, two decimals)."""
    if v.get("diff") is None:
        return "n/a"
    f = "+.1f" if scale != 1 else "+.2f"
    if v.get("se") is None:
        return f"{format(scale * v['diff'], f)} (1 seed)"
    return (f"{format(scale * v['diff'], f)} [{format(scale * v['lo'], f)}, {format(scale * v['hi'], f)}] "
            f"(n={v['n']})")


# -----------------------------------------------------------------------------
# Which results there are, and whether they describe this code

def load_results(out_dir):
    """{task: results JSON} for the study's tasks present in out_dir; an experiment's JSON in an older
    format (no per-seed prior-free score) is skipped with plots.py's message, i.e. reported as not run."""
    out = {t: json.load(open(os.path.join(out_dir, f"{t}.json"))) for t in ("base", "pilot")
           if os.path.exists(os.path.join(out_dir, f"{t}.json"))}
    for t in ("ablation", "injection", "hparams", "efficiency"):
        doc = plots.load(out_dir, t) if os.path.exists(os.path.join(out_dir, f"{t}.json")) else None
        if doc is not None:
            out[t] = doc
    return out


# .py files no study run executes: the tests, the subnetwork analysis, the benchmark, the figure drawing
# (figures are redrawn from results/); editing them leaves the study's results current
NOT_STUDY_CODE = ("tests/", "subnetworks.py", "bench.py", "plots.py")


def code_changed_since(commit, repo=None):
    """'' if no tracked code that study runs execute differs between `commit` and the working tree of
    `repo` (default: this checkout; results, figures and docs committed after a run leave it current),
    else the changed files or why it cannot tell."""
    if not commit or commit == "unknown" or commit.endswith("-dirty"):
        return "unknown or uncommitted code"
    changed = common.changed_code(commit, repo, ignore=NOT_STUDY_CODE)
    return f"commit {commit[:12]} not in this clone" if changed is None else ", ".join(changed)


def code_commit():
    """HEAD, or HEAD-dirty if study code differs from it (results, figures or docs edited since HEAD, as
    when plots.py has just redrawn the figures, leave it HEAD's code)."""
    head = common.git_commit().removesuffix("-dirty")
    return head if not code_changed_since(head) else head + "-dirty"


def code_checks(out_dir):
    """The same-code checks recorded in <output-dir>/code_checks.json (a list, oldest first)."""
    path = os.path.join(out_dir, "code_checks.json")
    return json.load(open(path)) if os.path.exists(path) else []


def still_current(commit, variants, checks):
    """True if a recorded same-code check found every one of `variants` bitwise identical between
    `commit` and code equal to this checkout's (a .py-identical commit). Never for a '-dirty' commit:
    a check of the committed code says nothing of what was uncommitted."""
    return not str(commit).endswith("-dirty") and any(
        str(commit).startswith(c["from"]) and not code_changed_since(c["to"]) and
        all(c["variants"].get(v) for v in variants) for c in checks)


def pending_reasons(args, res):
    """Why the results cannot carry verdicts about HEAD yet (empty: the study is final)."""
    why = [f"{t} not run" for t in ("ablation", "injection", "hparams", "efficiency") if t not in res]
    few = sorted({n for t, r in res.items() if t not in ("base", "pilot")
                  for n, v in r["metrics"].items() if len(v["seeds"]) < 3})
    if few:
        why.append(f"fewer than 3 seeds: {', '.join(few)}")
    runs = os.path.join(args.output_dir, "runs")
    by_commit = {}  # commit -> variants of the runs at the study's budget made there
    for f in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if f"-n{args.steps}-s" in f and f.endswith(".json"):
            c = json.load(open(os.path.join(runs, f))).get("commit")
            by_commit.setdefault(c, set()).add(f.rsplit("-n", 1)[0])
    checks = code_checks(args.output_dir)
    for c, variants in sorted(by_commit.items(), key=lambda kv: str(kv[0])):
        changed = code_changed_since(c)
        if changed and not still_current(c, variants, checks):
            why.append(f"runs made at {str(c)[:12]}{'-dirty' if str(c).endswith('-dirty') else ''}; the code differs "
                       f"at HEAD {common.git_commit()[:12]} ({changed})")
    if args.model == "base" and "base" in res and not plateaued(res["base"]["metrics"]):
        why.append(f"the base PLM's L_MLM still fell {fmt(res['base']['metrics']['relative_drop_last_tenth'])}% "
                   "over its last tenth (raise --base-steps)")
    rec = res.get("pilot", {}).get("recommendation")
    if rec is None:
        why.append("no pilot (--task pilot) chose the budget")
    elif rec["steps"] > args.steps or not rec["resolves"]:
        why.append(f"the pilot recommends --steps {rec['steps']} (resolves: {rec['resolves']}); "
                   f"this run used {args.steps}")
    return why


# -----------------------------------------------------------------------------
# REPORT.md

def mlm_control(eff):
    """Plain MLM's cost (or time) to DKPLM's final / DKPLM's of an efficiency results block: (per-seed ratios,
    verdict, how), as --task efficiency recorded it, or, for results made before it did, recomputed from the
    recorded curves (how says so: no cost-noise check then); (None, None, "") without mlm's curves."""
    if "mlm_ratio_verdict" in eff:
        return eff["mlm_time_to_dkplm_final"], eff["mlm_ratio_verdict"], ""
    curves = eff.get("curves", {})
    if not {"mlm", "dkplm"} <= set(curves):
        return None, None, ""
    res = {n: {"records": {s: {"curve": c} for s, c in curves[n].items()}} for n in ("mlm", "dkplm")}
    ratios = efficiency_ratios(res, "dkplm", variant="mlm", x=eff.get("x", "elapsed"))
    return ratios, ratio_verdict(ratios, variant="plain MLM"), " (recomputed from the recorded curves)"


def claims(res, roles, f1_verdicts=True):
    """The claims table's rows for one study's results (load_results), its variants named by `roles`
    (ROLES, or STRICT for the first study's): the paper's value, ours, the seed-paired effect, the verdict
    (none for F1 when its fine-tuning budget lies below the noise floor, f1_verdicts False)."""
    m = {t: r["metrics"] for t, r in res.items()}
    lines, T = [], roles["trelm"]

    def ours(task, names, key):
        return ", ".join(f"{n} {fmt(m[task][n]['mean'].get(key), m[task][n]['std'].get(key))}"
                         for n in names if n in m.get(task, {}))

    def row(claim, paper, task, names, key, v):
        said = v["verdict"] if f1_verdicts or not key.startswith("f1_") else "no verdict (below F1's noise floor)"
        lines.append(f"| {claim} | {paper} | {ours(task, names, key)} | {effect(v)} | {said} |")

    def pair(task, a, b, key):
        return verdict(values(m[task], a, key), values(m[task], b, key))

    def per_seed(ratios):  # a ratio of a seed that never reached the target is a lower bound: '>'
        return ", ".join(f"{'>' if not r['reached'] else ''}{r['ratio']:.2f}" for r in ratios.values())

    if "efficiency" in m:
        P = PAPER
        for other, paper in (("mlm", f"T-REx P@1 BERT {P['table2_trex_p1']['BERT']} vs TRELM_BERT "
                                     f"{P['table2_trex_p1']['TRELM_BERT']} (Table 2)"),
                             ("dkplm", f"T-REx P@1 DKPLM {P['table1_trex_p1']['DKPLM']} vs TRELM "
                                       f"{P['table1_trex_p1']['TRELM']} (Table 1)")):
            row(f"TRELM probes better than {other}", paper, "efficiency", [T, other], PRIMARY,
                pair("efficiency", T, other, PRIMARY))
        for key, label, paper in (("f1_fewrel", "FewRel F1",
                                   lambda o: f"TACRED F1 {'RoBERTa' if o == 'mlm' else 'DKPLM'} "
                                   f"{P['table5_tacred_f1']['RoBERTa' if o == 'mlm' else 'DKPLM']} vs TRELM "
                                   f"{P['table5_tacred_f1']['TRELM']} (Table 5)"),
                                  ("f1_open-entity", "Open Entity F1",
                                   lambda o: f"TRELM {P['table4_open_entity_f1']['TRELM']} best (Table 4)")):
            for other in ("mlm", "dkplm"):
                row(f"TRELM beats {other} on {label}", paper(other), "efficiency", [T, other], key,
                    pair("efficiency", T, other, key))
        eff = res["efficiency"]["efficiency"]
        rs, word = eff["time_to_dkplm_final"], "cost" if eff.get("x") == "cost" else "in-process time"
        rv, (mr, mv, how) = eff["ratio_verdict"], mlm_control(eff)
        if mv is not None and "mlm" not in rv:
            rv = against_mlm(rv, mv)
        lines.append(f"| TRELM needs <= {P['efficiency_ratio']:.0%} of DKPLM's pre-training {word} to reach its final "
                     f"score (Sec. 4.4) | {P['efficiency_ratio']} | "
                     f"ratio per seed: {per_seed(rs)} | {effect(rv, scale=1)} (0.5 - ratio){cost_note(rv)} | "
                     f"{verdict_text(rv)} |")
        if mv is not None:
            lines.append(f"| control: plain MLM needs <= {P['efficiency_ratio']:.0%} of DKPLM's {word} to reach its "
                         f"final score | n/a | ratio per seed: {per_seed(mr)}{how} | {effect(mv, scale=1)} "
                         f"(0.5 - ratio){cost_note(mv)} | {mv['verdict']} |")
        for role, label in (("no-memory-bank", "the memory bank"), ("no-routing", "knowledge routing")):
            n = roles[role]
            key = role if role in eff["time_to_ablation_final"] else n  # the first study keyed them by name
            r, v = eff["time_to_ablation_final"][key], eff["module_verdicts"][key]
            lines.append(f"| {label} speeds convergence (Fig. 6) | ratio < 1 | TRELM's {word} to {n}'s final / its "
                         f"{word}: {per_seed(r)} | {effect(v, scale=1)} (1 - ratio){cost_note(v)} | "
                         f"{verdict_text(v)} |")
    if "ablation" in m:
        for role, label in (("no-injection", "knowledge injection"), ("no-memory-bank", "memory bank"),
                            ("no-routing", "knowledge routing")):
            n = roles[role]
            for key, paper in ((PRIMARY, "n/a"),
                               ("f1_fewrel", f"TACRED {PAPER['table6_tacred_f1']['trelm']} vs "
                                             f"{PAPER['table6_tacred_f1']['trelm_' + role]}"),
                               ("f1_open-entity", f"Open Entity {PAPER['table6_open_entity_f1']['trelm']} vs "
                                                  f"{PAPER['table6_open_entity_f1']['trelm_' + role]}")):
                row(f"removing {label} lowers {key} (Table 6)", paper, "ablation", [T, n], key,
                    pair("ablation", T, n, key))
    if "injection" in m:
        v = res["injection"]["verdicts"]
        row("long-tail injection beats frequent (Fig. 3)", "yes (figure)", "injection",
            [roles["inj-long-tail"], roles["inj-frequent"]], PRIMARY, v["long-tail > frequent"])
        row("important entities beat all entities (Fig. 3)", "yes (figure)", "injection", [T, roles["inj-all"]],
            PRIMARY, v["important > all"])
        b = v["important best"]
        rivals = [roles[r] for r in ("inj-long-tail", "inj-frequent", "inj-all")]
        lines.append(f"| important entities are best (Fig. 3) | yes (figure) | "
                     f"{ours('injection', [T, *rivals], PRIMARY)} | " +
                     "; ".join(f"vs {k}: {effect(x)}" for k, x in b["pairs"].items()) + f" | {b['verdict']} |")
    if "hparams" in m:
        for p, v in res["hparams"]["verdicts"].items():
            pts = res["hparams"]["sweeps"][p.split()[0]]
            lines.append(f"| {p} (Figs. 7-8) | {PAPER_PEAKS[p.split()[0]]} | " +
                         ", ".join(f"{x['value']}: {fmt(x[PRIMARY + '_mean'], x[PRIMARY + '_std'])}" for x in pts) +
                         " | " + "; ".join(f"vs {k}: {effect(x)}" for k, x in v["pairs"].items()) +
                         f" | {v['verdict']} |")
    return lines


SCALE2_DIR = "scale2"  # <output-dir>/scale2/scale.json: the second scale (`--task scale --output-dir results/scale2`)


def current(doc):
    """True for a study results doc in the prior-free format (plots.load's test), quietly."""
    return all(isinstance(v, dict) and PRIMARY in v.get("mean", {}) for v in doc.get("metrics", {}).values())


def scale_docs(out_dir):
    """(scale 1, scale 2) of the trend, each {"config", "metrics", "curves"} or None where absent. Scale 1:
    <out_dir>/frontier.json, completed by efficiency.json's variants at the same steps (the same run
    records); scale 2: <out_dir>/scale2/scale.json (--task scale)."""
    doc1 = None
    for task in ("frontier", "efficiency"):
        path = os.path.join(out_dir, f"{task}.json")
        d = json.load(open(path)) if os.path.exists(path) else None
        if d is None or not current(d) or (doc1 and d["config"].get("steps") != doc1["config"].get("steps")):
            continue
        curves = d.get("curves") or d.get("efficiency", {}).get("curves", {})
        doc1 = doc1 or {"config": d["config"], "metrics": {}, "curves": {}}
        for n, v in d["metrics"].items():
            doc1["metrics"].setdefault(n, v)
            if n in curves:
                doc1["curves"].setdefault(n, curves[n])
    path = os.path.join(out_dir, SCALE2_DIR, "scale.json")
    doc2 = json.load(open(path)) if os.path.exists(path) else None
    return doc1, doc2 if doc2 is not None and current(doc2) else None


def scale_trend(out_dir):
    """Each claim of study_stats.SCALE_CLAIMS at the study's scale and the second (scale_docs): {"scale1",
    "scale2": the scale's shape (None if it did not run), "claims": [{"claim", "kind", "scale1", "scale2":
    claim_effects' effect or None, "trend": study_stats.trend's label, or "not run yet"}]}."""
    docs = scale_docs(out_dir)
    effects = [claim_effects(d) if d else None for d in docs]

    def shape(d):
        if d is None:
            return None
        c, se = d["config"], [v["mean"].get("se_MRR") for v in d["metrics"].values()]
        se = [x for x in se if x is not None]
        return {**{k: c.get(k) for k in ("steps", "train_batch_size", "seq_len", "data", "seeds", "base_steps")},
                "probe_se": sum(se) / len(se) if se else None}
    claims = [{"claim": c, "kind": kind,
               **{f"scale{i + 1}": e[c] if e else None for i, e in enumerate(effects)},
               "trend": trend(effects[0][c] if effects[0] else None, effects[1][c]) if effects[1] else "not run yet"}
              for c, kind, *_ in SCALE_CLAIMS]
    return {"scale1": shape(docs[0]), "scale2": shape(docs[1]), "claims": claims}


def write_scale_trend(out_dir):
    """<out_dir>/scale_trend.json (scale_trend), which plots.py draws as figures/scale_trend.png."""
    path = os.path.join(out_dir, "scale_trend.json")
    common.atomic_write_json(path, scale_trend(out_dir))
    return path


def scale_line(s, label):
    """'Scale N: S steps of B x L tokens, data D, seeds, probe-set SE ...' of one scale's shape."""
    return (f"{label}: {s['steps']} steps of {s['train_batch_size']} x {s['seq_len']} tokens, data {s['data']}, "
            f"seeds {s['seeds']}, base PLM {s['base_steps']} steps; probe-set SE of one run's score "
            f"{fmt(s['probe_se'])} (x 100, mean over variants: the probes' resolution)")


def effect_cell(e):
    """'+1.2 [-0.3, +2.7] (n=3)' (x 100) for a score difference, '0.46 [0.22, 0.70] (n=3)' for a ratio
    ('>' where some seed's ratio is a lower bound); 'not run' for None."""
    if e is None:
        return "not run"
    sc, f = (100, "+.1f") if e["ref"] == 0 else (1, ".2f")
    bound = "> " if e["bounded"] else ""
    if e["se"] is None:
        return f"{bound}{format(sc * e['effect'], f)} (1 seed)"
    return (f"{bound}{format(sc * e['effect'], f)} [{format(sc * e['lo'], f)}, {format(sc * e['hi'], f)}] "
            f"(n={e['n']})")


def scale_section(out_dir, figures):
    """REPORT.md's section on the two scales (scale_trend): each claim's effect [± 2 SE] at the study's scale
    (frontier.json / efficiency.json) and at the second (scale2/scale.json), and whether it grows, shrinks
    or holds as the run grows (study_stats.trend's rule). Scale 2 missing: it says "not run yet"."""
    t = scale_trend(out_dir)
    lines = ["## The claims at two scales (results/frontier.json, results/" + SCALE2_DIR + "/scale.json)",
             "Effect: a seed-paired score difference (x 100) or a mean per-seed cost ratio (to DKPLM's final / "
             "DKPLM's; '>': lower bounds in some seeds), [± 2 SE]. As the run grows: 'grows' / 'shrinks' when "
             "the change between scales exceeds 2 SE of the difference (SEs added in quadrature) away from / "
             "towards the null (0, or a ratio of 1), 'reverses' when scale 2's effect lies beyond 2 SE on the "
             "other side of the null, else 'holds' (study_stats.trend).", ""]
    lines.append("- " + (scale_line(t["scale1"], "Scale 1") if t["scale1"] else
                         "Scale 1: not run yet (`python evaluate.py --task frontier`)"))
    lines.append("- " + (scale_line(t["scale2"], "Scale 2") if t["scale2"] else
                         f"Scale 2: not run yet (`python evaluate.py --task scale --output-dir results/{SCALE2_DIR}` "
                         "with study_variants.SCALE2's data and steps: docs/study.md)"))
    lines += ["", "| claim | scale 1 | scale 2 | as the run grows |", "|---|---|---|---|"]
    for c in t["claims"]:
        lines.append(f"| {c['claim']} | {effect_cell(c['scale1'])} | "
                     f"{effect_cell(c['scale2']) if t['scale2'] else 'not run yet'} | {c['trend']} |")
    if t["scale1"] and t["scale2"]:
        lines += ["", f"Figure: {figures}/scale_trend.png."]
    return lines


def write_report(args):
    """REPORT.md: the paper's value, ours (mean ± std), the seed-paired effect with its 2-SE interval and
    the verdict of every claim; a status line saying whether the study is final or pending, and why.
    Sections, each from its file in --output-dir when present: the base PLM (base.json), the pilot
    (pilot.json), F1's noise floor (f1_floor.md), the claims (ablation, injection, hparams, efficiency
    .json), the first study's claims (strict/*.json, kept from the first study's code), the frontier
    (frontier.md), our DKPLM reading by reading (dkplm.md), the claims at two scales (scale_section), the
    conclusions (conclusions.md, written by hand) and the noise of the score."""
    res = load_results(args.output_dir)
    why = pending_reasons(args, res)
    m = {t: r["metrics"] for t, r in res.items()}
    lines = ["# Small-scale study of TRELM's claims", "",
             ("**Status: final.**" if not why else "**Status: PENDING.** These numbers are not verdicts on the "
              "current code: " + "; ".join(why) + ". Rerun `python evaluate.py --task reproduce` from a clean "
              "checkout at the recommended budget."), ""]
    if "base" in res:
        b = res["base"]["metrics"]
        p = b["probe"]
        lines += [f"Base PLM ({b['key']['base_model']}, plain MLM on {b['generic_lines']} generic lines, "
                  f"{b['key']['steps']} steps): L_MLM {b['l_mlm_first']:.2f} -> {b['l_mlm_last_tenth']:.2f} "
                  f"(last tenth; {100 * (b['relative_drop_last_tenth'] or 0):.1f}% below the tenth before); "
                  f"seen P@1 {fmt(p.get('seen_P@1'))}, held-out {fmt(p.get('heldout_P@1'))}, score_MRR "
                  f"{fmt(p['score_MRR'])} ± {fmt(p.get('se_MRR'))} (probe-set SE).", ""]
    lines += [f"Study: every variant continues from --model {args.model} for {args.steps} steps of "
              f"{args.train_batch_size} x {args.seq_len} tokens, seeds {args.seeds}, data {args.data}. Score = "
              "per-relation seen - held-out MRR, macro-averaged (x 100). F1: fine-tuned on FewRel (TACRED "
              f"stand-in) and Open Entity, {args.ft_train_limit} training rows, {args.ft_epochs} epochs, "
              f"{args.ft_max_seq_len} tokens, {args.ft_eval_limit} test rows. Effect = seed-paired mean difference "
              "[± 2 SE]; held if the interval lies above 0 in the claimed direction, did not hold if below, else "
              "inconclusive.", ""]
    if "pilot" in res:
        r = res["pilot"]["recommendation"]
        lines += [f"Pilot: recommends --steps {r['steps']} (resolves a {args.target_effect:.0%} difference with "
                  f"{r['seeds']} seeds: {r['resolves']}); estimated pre-training time "
                  f"{r['estimated_hours']:.1f} h for the full study on the machine that ran the pilot. See "
                  "results/pilot.md.", ""]
    floor_path = os.path.join(args.output_dir, "f1_floor.json")
    floor = json.load(open(floor_path))["recommendation"] if os.path.exists(floor_path) else None
    f1_ok = floor is None or f"{args.ft_train_limit}x{args.ft_epochs}" in floor["resolving"]
    if floor is not None:
        lines += [open(os.path.join(args.output_dir, "f1_floor.md")).read(),
                  f"F1 verdicts below: {'given' if f1_ok else 'none'} (the study fine-tunes at {args.ft_train_limit} "
                  f"rows x {args.ft_epochs} epochs).", ""]
    head = ["| claim (paper) | paper's value | ours (mean ± std) | effect | verdict |", "|---|---|---|---|---|"]
    lines += [f"Reading of every verdict in the table below: {READING}.", "", *head, *claims(res, ROLES, f1_ok)]
    strict = load_results(os.path.join(args.output_dir, "strict"))
    if strict:
        lines += ["", "## The first study: the strict reading (results/strict/)",
                  f"Reading of every verdict in this table: {FIRST_READING}. Kept as its own table: under this reading "
                  "the model learns almost no facts (the frontier below), so these verdicts describe that reading "
                  "only.",
                  "", *head, *claims(strict, STRICT, f1_ok)]
    frontier = os.path.join(args.output_dir, "frontier.md")
    if os.path.exists(frontier):  # its own readings: every verdict names the one it was made under
        lines += ["", open(frontier).read().replace("## Frontier", "## Frontier (results/frontier.md)", 1),
                  f"Figure: {args.figures}/frontier.png. The efficiency verdicts there use the cost axis "
                  "(results/costs.json), not wall time; the table above used in-process seconds of runs that shared "
                  "the machine, which measure the load as much as the method (docs/study.md)."]
    dkplm = os.path.join(args.output_dir, "dkplm.md")
    lines += ["", open(dkplm).read().strip() if os.path.exists(dkplm) else
              "## Our DKPLM, reading by reading\nNot run yet (`python evaluate.py --task dkplm`: results/dkplm.md)."]
    lines += ["", *scale_section(args.output_dir, args.figures)]
    conclusions = os.path.join(args.output_dir, "conclusions.md")
    if os.path.exists(conclusions):  # prose written by hand from the tables above, committed beside them
        lines += ["", f"## Conclusions, claim by claim ({conclusions}: written by hand from the tables above)", "",
                  open(conclusions).read().strip()]
    noise = [(n, v) for t in ("efficiency", "ablation", "injection", "hparams") for n, v in m.get(t, {}).items()]
    if noise:
        seen = {}
        for n, v in noise:
            seen.setdefault(n, v)
        lines += ["", "Noise of the score (x 100): seed std vs the probe-set SE of one run (the same probes serve "
                  "every run, so paired differences cancel most of the latter).", "",
                  "| variant | seeds | seed std | probe-set SE |", "|---|---|---|---|"]
        lines += [f"| {n} | {len(v['seeds'])} | {fmt(v['std'].get(PRIMARY))} | {fmt(v['mean'].get('se_MRR'))} |"
                  for n, v in sorted(seen.items())]
    lines += ["", "Not run here: GLUE (Table 3) and LAMA / LAMA-UHN on the real corpora (Tables 1-2) need the "
              "paper's scale; the paper's values above are for BERT/RoBERTa-base on Wikipedia + Wikidata5M, ours for "
              "a 6-layer MiniLM, a few hundred facts and minutes of CPU. A verdict here is about this scale only.",
              f"Figures: {args.figures}/; tables: {args.output_dir}/*.md; per-run JSON: {args.output_dir}/runs/. "
              f"Code of commit {code_commit()}.", ""]
    common.atomic_write(args.report, lambda tmp: open(tmp, "w").write("\n".join(lines)))
    print("\n".join(lines))
    return args.report


