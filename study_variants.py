"""The study's experiments as a list: every variant each `evaluate.py --task` of the study pre-trains
(experiments.py runs them), the role each plays in the tables and figures, and the study's shape.

A variant is (name, pretrain.py flags). Names are shared between tasks, so a run (variant, steps, seed)
is trained once and reused by every task that lists it (study_runs.run_record). Every flag a variant
depends on is spelled out, so no record made under an older default of pretrain.py is reused for it.
This file imports nothing: bench.py reads it (COSTED, the shape) without the study's runners.
"""

# The study's shape: every variant trains batches of BATCH_SIZE x SEQ_LEN tokens with PRETRAIN_ARGS
# added (experiments.py's defaults of --train-batch-size, --seq-len, --pretrain-args; bench.py --config
# study and bench.py --costs time this shape)
BATCH_SIZE = 16
SEQ_LEN = 64
PRETRAIN_ARGS = ""  # extra pretrain.py flags for every variant

# Every TRELM variant spreads the memory bank over the run (Eq. 8 with q counted as LAMBDA_EPOCHS epochs
# of the run: the study's 300 steps are ~8 real epochs of the embedded corpus, which would leave lambda ~ 0
# after the first quarter) and names its reading of routing (Sec. 3.3) explicitly
LAMBDA_EPOCHS = 4
_T = ["--method", "trelm", "--lambda-epochs", str(LAMBDA_EPOCHS)]

MLM = ("mlm", ["--method", "mlm"])
# DKPLM as issue 33 fixed it (docs/departures.md, "Why our DKPLM trailed plain MLM"): entity tokens decoded from
# plain h, KLT at least its sequence's mean; and as the study ran it before (relation-conditioned decoding through
# the shared MLM head, KLT strictly above the mean), the base of the readings of --task dkplm
DKPLM = ("dkplm", ["--method", "dkplm", "--dkplm-decoder", "plain", "--dkplm-select", "at-least-mean"])
DKPLM_RELATION = ("dkplm_relation", ["--method", "dkplm", "--dkplm-decoder", "relation", "--dkplm-select",
                                     "above-mean"])


def flag_values(flags):
    """pretrain.py flags as {flag: its value, or None for a switch}, in their order."""
    out, i = {}, 0
    while i < len(flags):
        has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        out[flags[i]] = flags[i + 1] if has_value else None
        i += 2 if has_value else 1
    return out


def dkplm_reading(name, **changes):
    """DKPLM_RELATION with the flags named (dkplm_decoder="plain" for --dkplm-decoder plain, no_injection=None
    for the switch) set, each flag once: dkplm_<name>."""
    pairs = {**flag_values(DKPLM_RELATION[1]), **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    return f"dkplm_{name}", [x for k, v in pairs.items() for x in ((k,) if v is None else (k, v))]


# TRELM under the study's reading, the default of `pretrain.py --method trelm` (ffn scope, Eq. 11 every
# 100 steps); the ablations and sweeps are named after it
TRELM = ("trelm-ffn-e100", [*_T, "--route-scope", "ffn"])
NOROUTING = ("trelm-norouting", [*_T, "--no-routing"])


def trelm(suffix, *flags):
    """TRELM with `flags` added, named <TRELM's name>_<suffix>."""
    return f"{TRELM[0]}_{suffix}", [*TRELM[1], *flags]


VARIANTS = {
    # --task frontier: the readings of routing side by side, on the cost axis
    "frontier": [
        MLM, DKPLM, NOROUTING,
        ("trelm-strict-e100", [*_T, "--route-scope", "strict"]),  # the reading of the first study
        ("trelm-blocks-e100", [*_T, "--route-scope", "blocks"]),
        TRELM,
        ("trelm-ffn-e1-fo", [*_T, "--route-scope", "ffn", "--route-every", "1", "--ig-form", "first-order"]),
        ("trelm-ffn-e1-random", [*_T, "--route-scope", "ffn", "--route-every", "1", "--route-select", "random"]),
        ("trelm-strict-e1-fo", [*_T, "--route-scope", "strict", "--route-every", "1", "--ig-form", "first-order"]),
        # the random controls of the every-100 readings: as many neurons per layer drawn at random, held for the
        # same 100 steps as Eq. 11's paths (does attribution matter when paths are held?)
        ("trelm-ffn-e100-random", [*_T, "--route-scope", "ffn", "--route-select", "random"]),
        ("trelm-strict-e100-random", [*_T, "--route-scope", "strict", "--route-select", "random"]),
    ],
    # --task dkplm: why our DKPLM learned facts slower than plain MLM, one reading at a time against the DKPLM the
    # study ran before issue 33 (docs/departures.md, "DKPLM baseline"): the loss weighting (theta 0.8: L_dec at a
    # quarter of L_MLM's weight; theta 0.5 is the sum halved, the same AdamW run, measured), the relation in the
    # decoder, the gradient of the KG embeddings, the selection's tie rule, the pseudo token itself; and DKPLM fixed
    "dkplm": [MLM, DKPLM_RELATION, dkplm_reading("theta0.8", dkplm_loss="theta", theta="0.8"),
              dkplm_reading("plain", dkplm_decoder="plain"), dkplm_reading("kg-detach", kg_grad="off"),
              dkplm_reading("select-ge", dkplm_select="at-least-mean"),
              dkplm_reading("no-injection", no_injection=None), DKPLM],
    # and the plateau: DKPLM and MLM trained 4x as long (--task dkplm runs both lists)
    "dkplm-plateau": [MLM, DKPLM],
    # --task scale: the claims' variants at a second scale (about 4x the facts, corpus and steps: SCALE2)
    "scale": [MLM, DKPLM, NOROUTING, TRELM, ("trelm-ffn-e100-random", [*_T, "--route-scope", "ffn",
                                                                     "--route-select", "random"])],
    # --task ablation, Table 6: TRELM without each of its three components
    "ablation": [TRELM, trelm("no-injection", "--no-injection"), trelm("no-memory-bank", "--no-memory-bank"),
                 NOROUTING],
    # --task injection, Fig. 3: which entities are injected (TRELM: the important ones)
    "injection": [trelm("inj-long-tail", "--injection", "long-tail"), trelm("inj-frequent", "--injection", "frequent"),
                  trelm("inj-all", "--injection", "all"), TRELM],
    # --task hparams, Figs. 7-8: one hyper-parameter at a time around TRELM's (theta 0.5, k 16, beta 2)
    "hparams": [trelm("theta0.25", "--theta", "0.25"), TRELM, trelm("theta0.75", "--theta", "0.75"),
                trelm("k4", "--window-k", "4"), trelm("k8", "--window-k", "8"), TRELM,
                trelm("k32", "--window-k", "32"),
                trelm("beta1", "--beta", "1"), TRELM, trelm("beta3", "--beta", "3"), trelm("beta4", "--beta", "4")],
    # --task efficiency, Figs. 4-6: cost to DKPLM's final score, and what each module adds to the speed
    "efficiency": [MLM, DKPLM, TRELM, trelm("no-memory-bank", "--no-memory-bank"), NOROUTING],
    # --task pilot: the seed spread that chooses --steps
    "pilot": [MLM, TRELM],
}

# role -> variant name: what the tables, verdicts and figures call each run (ROLES: this study; STRICT:
# the first study's names, whose records in results/strict/ were made under the strict reading)
ROLES = {"trelm": TRELM[0], "no-routing": NOROUTING[0], "mlm": "mlm", "dkplm": "dkplm",
         **{r: trelm(r)[0] for r in ("no-injection", "no-memory-bank", "inj-long-tail", "inj-frequent", "inj-all",
                                     "theta0.25", "theta0.75", "k4", "k8", "k32", "beta1", "beta3", "beta4")}}
STRICT = {r: r if r in ("mlm", "dkplm", "trelm") else f"trelm_{r}" for r in ROLES}
# the variants fine-tuned for F1 (--finetune-all: every variant)
FINETUNED = {ROLES[r] for r in ("trelm", "no-injection", "no-memory-bank", "no-routing", "mlm", "dkplm")}
# the hyper-parameter sweeps of --task hparams: parameter -> [(value, variant)]
SWEEPS = {"theta": [(0.25, ROLES["theta0.25"]), (0.5, TRELM[0]), (0.75, ROLES["theta0.75"])],
          "k": [(4, ROLES["k4"]), (8, ROLES["k8"]), (16, TRELM[0]), (32, ROLES["k32"])],
          "beta": [(1, ROLES["beta1"]), (2, TRELM[0]), (3, ROLES["beta3"]), (4, ROLES["beta4"])]}
# the variants on the cost axis (bench.py --costs)
COSTED = list({n: (n, f) for t in ("frontier", "efficiency", "dkplm") for n, f in VARIANTS[t]}.values())
# the second scale (--task scale): the embedded default's own sources drawn about 4x larger (data_mini.py
# --facts-per-relation 250 --text-lines 4200: 1,458 facts for 400, 196k corpus words for 49k) and trained
# 4x as many steps (the same epochs); its data folder is built by `python data_mini.py --out-dir DIR` + these flags
SCALE2 = {"data_flags": ["--facts-per-relation", "250", "--text-lines", "4200"], "steps_factor": 4}

# The reading of the first study's tables (results/strict/: the ablation, injection, hparams and
# efficiency tasks as run with METHOD_TABLE's trelm defaults of that time)
FIRST_READING = ("routing scope strict (only the knowledge paths train), re-routed every 100 steps by Eq. 11, the "
                 "memory bank on Eq. 8's real epochs (lambda ~ 0 after the first quarter of a 300-step run); time "
                 "axis: in-process seconds")
# the reading of this study's tables
READING = (f"routing scope ffn (every FFN neuron's weights outside the knowledge paths frozen, everything else "
           f"trains), re-routed every 100 steps by Eq. 11, Eq. 8 over {LAMBDA_EPOCHS} counted epochs of the run "
           "(lambda 0.5, 0.25, 0.125, 0.0625 over the run's quarters at beta 2); cost axis: steps x bench-measured "
           "per-step cost over a plain MLM step")
# reading label of each frontier variant: (scope, route every, selection)
READINGS = {"trelm-strict-e100": "strict, every 100, Eq. 11", "trelm-blocks-e100": "blocks, every 100, Eq. 11",
            "trelm-ffn-e100": "ffn, every 100, Eq. 11", "trelm-ffn-e1-fo": "ffn, per batch, first-order",
            "trelm-ffn-e1-random": "ffn, per batch, random neurons",
            "trelm-strict-e1-fo": "strict, per batch, first-order", "trelm-norouting": "no routing",
            "trelm-ffn-e100-random": "ffn, every 100, random neurons",
            "trelm-strict-e100-random": "strict, every 100, random neurons",
            "mlm": "baseline", "dkplm": "baseline"}
# each attributed reading of the frontier -> its random control (as many neurons, held as long)
RANDOM_CONTROLS = {"trelm-ffn-e1-fo": "trelm-ffn-e1-random", "trelm-ffn-e100": "trelm-ffn-e100-random",
                   "trelm-strict-e100": "trelm-strict-e100-random"}
