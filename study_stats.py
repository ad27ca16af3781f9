"""The study's statistics: the prior-free probe score, the one verdict rule every claim is judged by, and
time (or cost) to quality. Pure functions of numbers; experiments.py and study_report.py apply them.

Score, primary and prior-free: for each probed relation r, seen minus held-out, then the macro average
over relations with both splits,

    score_MRR = 1/R sum_r (MRR_r(seen) - MRR_r(heldout)),   score_P@1 likewise;

relation priors (always answering "Europe") lift both splits and cancel. Probe-set sampling error of a
run's score: SE^2 = 1/R^2 sum_r (v_r,seen / n_r,seen + v_r,held / n_r,held), v = p (1 - p) (exact for
P@1, an upper bound for MRR, a mean of values in [0, 1]).

Verdict rule, one for every claim: d_s = a_s - b_s over the seeds both variants ran (same seed = same
data order and masking), mean d and SE = std(d) / sqrt(n); "held" if mean d > 2 SE in the claimed
direction, "did not hold" if the opposite direction passes the same test, else "inconclusive" (always
with one seed). A peak (or "best of") holds when it beats every neighbour by the rule, does not hold
when any neighbour beats it, else inconclusive.

Efficiency: per seed, the interpolated x (in-process time, or cost: steps x per-step cost over MLM) at
which TRELM's snapshot curve first reaches DKPLM's final score, over DKPLM's x; the claim "ratio <= 0.5"
is judged by the same rule on 0.5 - ratio_s. A seed where TRELM never reaches it gives only a lower
bound (TRELM's whole run / DKPLM's), which can refute the claim but not confirm it. Every such claim is
computed for plain MLM too (against_mlm): a claim MLM passes as well is no evidence for TRELM.

Cost noise: on the cost axis ratio_s = (steps to reach / baseline's steps) x q, q = the variant's per-step
cost over the baseline's (the bench's medians), so every per-seed ratio scales with q. cost_ratio_range
gives q's range over the bench's repeats (results/costs.json); ratio_verdict(..., cost=) judges the claim
at both ends of it (the labels are monotone in q: held, inconclusive, did not hold as q grows), and a
held / did not hold that changes within the range is "inconclusive (decided by the cost median alone, within
the bench's spread)".

Scale trend (SCALE_CLAIMS, claim_effects, trend): each claim's effect at the study's scale and at the
second one (study_variants.SCALE2), and whether it grows, shrinks or holds as the run grows.
"""
import math
import statistics

from paper_values import PAPER, PRIMARY
from study_variants import ROLES


def fmean(xs):
    """Mean of the values that are not None (None if there are none)."""
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def stdev(xs):
    """Sample std of the values that are not None; None with fewer than two (one seed: no spread)."""
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def prior_free(per_relation, key):
    """(macro mean over relations of seen - held-out `key`, its probe-set SE). Relations lacking a
    split are skipped. SE uses v = p (1 - p) per split (exact for P@1, an upper bound for MRR)."""
    rows = [(m["seen"], m["heldout"]) for m in per_relation.values()
            if m.get("seen", {}).get("facts") and m.get("heldout", {}).get("facts")]
    if not rows:
        return None, None
    diff = statistics.fmean(s[key] - h[key] for s, h in rows)
    var = sum(s[key] * (1 - s[key]) / s["facts"] + h[key] * (1 - h[key]) / h["facts"] for s, h in rows)
    return diff, math.sqrt(var) / len(rows)


def verdict(a, b):
    """Claim 'a > b'. a, b: {seed: value}. Seed-paired d_s = a_s - b_s; held if mean > 2 SE, did not
    hold if -mean > 2 SE, else inconclusive (always with fewer than 2 paired seeds)."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return {"verdict": "not measured", "n": 0}
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"verdict": "inconclusive (one seed: no standard error)", "diff": mean, "se": None, "n": 1}
    se = statistics.stdev(d) / math.sqrt(len(d))
    v = "held" if mean > 2 * se else "did not hold" if -mean > 2 * se else "inconclusive"
    return {"verdict": v, "diff": mean, "se": se, "n": len(d), "lo": mean - 2 * se, "hi": mean + 2 * se}


def beats_all(a, others):
    """Claim 'a beats every one of others' ({label: {seed: value}}): held if every pairwise claim held,
    did not hold if any other beats a by the rule, else inconclusive."""
    pair = {k: verdict(a, b) for k, b in others.items()}
    vs = [p["verdict"] for p in pair.values()]
    overall = ("held" if vs and all(v == "held" for v in vs) else "did not hold" if "did not hold" in vs
               else "not measured" if all(v == "not measured" for v in vs) else "inconclusive")
    return {"verdict": overall, "pairs": pair}


def values(res, name, key):
    """{seed: value of `key`} of variant `name` in a task's metrics ({} if it did not run)."""
    return {s: x.get(key) for s, x in res[name]["seeds"].items()} if name in res else {}


def time_to_reach(points, target, key=PRIMARY, x="elapsed"):
    """The x (in-process time, or cost) at which a snapshot curve first reaches `target` (linear
    interpolation between snapshots; from the first snapshot's x if already reached there), or None."""
    prev = None
    for p in points:
        if p[key] is not None and p[key] >= target:
            if prev is None or p[key] == prev[key]:
                return p[x]
            f = (target - prev[key]) / (p[key] - prev[key])
            return prev[x] + max(0.0, f) * (p[x] - prev[x])
        prev = p
    return None


def efficiency_ratios(res, baseline="dkplm", key=PRIMARY, variant="trelm", x="elapsed"):
    """Per seed: the variant's x (time or cost) to the baseline's final score / the baseline's x;
    unreached seeds give a lower bound (the variant's whole run / the baseline's)."""
    out = {}
    for s, rec in res[baseline]["records"].items():
        tr = res[variant]["records"].get(s)
        if tr is None:
            continue
        dk, pts = rec["curve"]["snapshots"], tr["curve"]["snapshots"]
        target, t_dk = dk[-1][key], dk[-1][x]
        t_tr = time_to_reach(pts, target, key, x)
        out[s] = {"dkplm_final": target, "dkplm_time": t_dk, "trelm_time": t_tr, "reached": t_tr is not None,
                  "ratio": (t_tr if t_tr is not None else pts[-1][x]) / t_dk}
    return out


COST_INCONCLUSIVE = "inconclusive (decided by the cost median alone, within the bench's spread)"
NOT_EVIDENCE = "holds for plain MLM as well: not evidence for TRELM"


def cost_ratio_range(costs, variant, baseline):
    """The variant's per-step cost over the baseline's, from the cost axis (results/costs.json's "costs":
    per variant "cost_over_mlm", the median over the bench's rounds, "repeats", each round's ratio to MLM,
    "spread" [min, max] of them, and "measured" for a variant benched in a later session):
    {"median": the medians' quotient, "lo", "hi": the range of repeat_a / repeat_b (the median included),
    "paired"}. Repeats are paired by round when both were measured in the same session (as many repeats,
    and the same "measured" entry or neither has one), else every pair counts (then [min, max] of
    each suffices: a variant with no "repeats" is read by its "spread"; with neither, by its median)."""
    a, b = costs[variant], costs[baseline]
    med = a["cost_over_mlm"] / b["cost_over_mlm"]
    ra, rb = (c.get("repeats") or c.get("spread") or [c["cost_over_mlm"]] for c in (a, b))
    paired = ("repeats" in a and "repeats" in b and len(ra) == len(rb) and a.get("measured") == b.get("measured"))
    qs = [x / y for x, y in zip(ra, rb)] if paired else [x / y for x in ra for y in rb]
    return {"median": med, "lo": min(qs + [med]), "hi": max(qs + [med]), "paired": paired}


def _ratio_label(ratios, claim, baseline, variant):
    """The rule on claim - ratio_s; an unreached seed's ratio is only a lower bound."""
    v = verdict({s: claim for s in ratios}, {s: r["ratio"] for s, r in ratios.items()})
    if v["verdict"] == "held" and not all(r["reached"] for r in ratios.values()):
        v["verdict"] = f"inconclusive ({variant} did not reach {baseline}'s final score in some seeds)"
    return v


def ratio_verdict(ratios, claim=PAPER["efficiency_ratio"], baseline="DKPLM", cost=None, variant="TRELM"):
    """'ratio <= claim' by the rule on claim - ratio_s; an unreached seed's ratio is only a lower bound.
    cost (cost_ratio_range of the two variants; None off the cost axis): the claim is judged again with every
    ratio_s scaled to each end of the bench's range ("at_cost_ends"); if the two ends disagree, a verdict the
    median decided ("held" or "did not hold") becomes COST_INCONCLUSIVE (the median's label kept as
    "verdict_at_cost_median"), and an inconclusive one stays as it is."""
    v = _ratio_label(ratios, claim, baseline, variant)
    if cost is None or not ratios:
        return v
    ends = {e: _ratio_label({s: dict(r, ratio=r["ratio"] * cost[e] / cost["median"]) for s, r in ratios.items()},
                            claim, baseline, variant)["verdict"] for e in ("lo", "hi")}
    v.update(cost_range=[cost["lo"], cost["hi"]], cost_median=cost["median"], cost_paired=cost["paired"],
             at_cost_ends=ends)
    if ends["lo"] != ends["hi"] and v["verdict"] in ("held", "did not hold"):
        v["verdict_at_cost_median"], v["verdict"] = v["verdict"], COST_INCONCLUSIVE
    return v


def against_mlm(v, mlm_v):
    """A variant's cost-to-X verdict with plain MLM's verdict on the same claim beside it ("mlm"); when both
    held, the note NOT_EVIDENCE."""
    out = dict(v, mlm=mlm_v["verdict"])
    if v["verdict"] == "held" and mlm_v["verdict"] == "held":
        out["note"] = NOT_EVIDENCE
    return out


def verdict_text(v):
    """A verdict as the tables print it: its label, and plain MLM's on the same claim where it was computed
    ("held; holds for plain MLM as well: not evidence for TRELM", "inconclusive; plain MLM: held")."""
    if "mlm" not in v:
        return v["verdict"]
    return f"{v['verdict']}; {v['note']}" if v.get("note") else f"{v['verdict']}; plain MLM: {v['mlm']}"


def cost_note(v):
    """', cost ratio [lo, hi] (paired rounds)' for a verdict judged over the bench's range, else ''."""
    if "cost_range" not in v:
        return ""
    lo, hi = v["cost_range"]
    return f", per-step cost ratio {lo:.3f}-{hi:.3f} ({'paired rounds' if v['cost_paired'] else 'all pairs'})"


# -----------------------------------------------------------------------------
# The claims at two scales

# (claim, kind, a, b): "diff", the seed-paired score difference a - b (null 0); "ratio", a's cost to b's final
# score over b's cost (null 1: as costly as b). The attribution control is the frontier's random every-100 reading.
SCALE_CLAIMS = [
    ("injection + CKA + memory bank: TRELM without routing > MLM", "diff", ROLES["no-routing"], "mlm"),
    ("routing: TRELM > TRELM without routing", "diff", ROLES["trelm"], ROLES["no-routing"]),
    ("attribution: TRELM > random neurons held as long", "diff", ROLES["trelm"], "trelm-ffn-e100-random"),
    ("TRELM > DKPLM", "diff", ROLES["trelm"], "dkplm"),
    ("TRELM's cost to DKPLM's final / DKPLM's", "ratio", ROLES["trelm"], "dkplm"),
    ("TRELM without routing's cost to DKPLM's final / DKPLM's", "ratio", ROLES["no-routing"], "dkplm"),
    ("plain MLM's cost to DKPLM's final / DKPLM's (control)", "ratio", "mlm", "dkplm"),
]


def claim_effects(doc, key=PRIMARY):
    """{claim: effect} of SCALE_CLAIMS in one scale's results ({"metrics": {name: {"seeds"}}, "curves":
    {name: {seed: curve}}}, the cost in each snapshot): effect = {"effect", "se", "n", "ref", "lo", "hi",
    "bounded"}: the mean paired difference (ref 0) or the mean per-seed ratio (ref 1) with SE = std / sqrt(n)
    over seeds and its 2-SE interval; "bounded": some seed never reached the target (its ratio is a lower
    bound). None where a variant did not run (or, for a ratio, its snapshots have no cost)."""
    m, curves = doc.get("metrics", {}), doc.get("curves", {})
    out = {}
    for claim, kind, a, b in SCALE_CLAIMS:
        out[claim] = None
        if kind == "diff":
            v = verdict(values(m, a, key), values(m, b, key))
            if v["n"]:
                out[claim] = {"effect": v["diff"], "se": v["se"], "n": v["n"], "ref": 0.0, "bounded": False}
        elif a in curves and b in curves and all(p.get("cost") is not None for n in (a, b)
                                                 for c in curves[n].values() for p in c["snapshots"]):
            res = {n: {"records": {s: {"curve": c} for s, c in curves[n].items()}} for n in (a, b)}
            rs = efficiency_ratios(res, b, key=key, variant=a, x="cost")
            if rs:
                r = [x["ratio"] for x in rs.values()]
                out[claim] = {"effect": statistics.fmean(r), "n": len(r), "ref": 1.0,
                              "se": statistics.stdev(r) / math.sqrt(len(r)) if len(r) > 1 else None,
                              "bounded": not all(x["reached"] for x in rs.values())}
        e = out[claim]
        if e is not None and e["se"] is not None:
            e["lo"], e["hi"] = e["effect"] - 2 * e["se"], e["effect"] + 2 * e["se"]
    return out


def trend(e1, e2):
    """Whether a claim's effect grows, shrinks or holds from scale 1 (e1) to scale 2 (e2) (claim_effects).
    The runs of the two scales are independent, so the change delta = e2 - e1 has SE sqrt(se1^2 + se2^2):
      "holds"    |delta| <= 2 SE (no change resolved)
      "grows"    delta beyond 2 SE, away from the null (ref: 0 for a difference, 1 for a cost ratio) in the
                 direction of scale 1's effect (a larger gain, a larger penalty, a larger saving)
      "reverses" delta beyond 2 SE towards the null and past it: scale 2's effect lies on the other side of
                 the null by more than its own 2 SE
      "shrinks"  delta beyond 2 SE towards the null otherwise
    "not measured" when either scale lacks the claim; "unresolved (one seed)" without a standard error.
    A ratio with unreached seeds is a lower bound (e["bounded"]): the label then says so."""
    if e1 is None or e2 is None:
        return "not measured"
    if e1["se"] is None or e2["se"] is None:
        return "unresolved (one seed)"
    delta, se, ref = e2["effect"] - e1["effect"], math.hypot(e1["se"], e2["se"]), e1["ref"]
    if abs(delta) <= 2 * se:
        label = "holds"
    else:
        side1, side2 = e1["effect"] - ref, e2["effect"] - ref
        away = math.copysign(1.0, side1 if side1 else side2)
        if delta * away > 0:
            label = "grows"
        elif side1 * side2 < 0 and abs(side2) > 2 * e2["se"]:
            label = "reverses"
        else:
            label = "shrinks"
    return label + (" (lower bounds in some seeds)" if e1["bounded"] or e2["bounded"] else "")
