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
bound (TRELM's whole run / DKPLM's), which can refute the claim but not confirm it.
"""
import math
import statistics

from paper_values import PAPER, PRIMARY


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


def ratio_verdict(ratios, claim=PAPER["efficiency_ratio"], baseline="DKPLM"):
    """'ratio <= claim' by the rule on claim - ratio_s; an unreached seed's ratio is only a lower bound."""
    v = verdict({s: claim for s in ratios}, {s: r["ratio"] for s, r in ratios.items()})
    if v["verdict"] == "held" and not all(r["reached"] for r in ratios.values()):
        v["verdict"] = f"inconclusive (TRELM did not reach {baseline}'s final score in some seeds)"
    return v
