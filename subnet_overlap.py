"""How far the FFN neurons of a knowledge-critical subnetwork (subnetworks.py) coincide with the knowledge
paths of TRELM's routing (routing.py, TRELM Eq. 9-12), and the paths a pretrain.py run saved.

Per layer, two neuron sets A (the subnetwork's, subnetwork_neurons) and B (routing's) of
the n = intermediate-size FFN neurons are compared by their Jaccard index |A & B| / |A | B|, next to
its exact expectation for independent uniform sets of the same sizes (|A & B| is hypergeometric) and
the one-sided p-value P(|A & B| >= observed). Over layers, the total intersection is the sum of the
independent per-layer hypergeometrics (their pmfs convolved).
"""
import os

import numpy as np
import torch
from scipy.stats import hypergeom

import common


def layer_of(name):
    """'encoder.layer.5.attention.self.query.weight' -> 5"""
    return int(name.split(".")[2])


def subnetwork_neurons(names, removed, rule="top", k=None, frac=0.01):
    """{layer: LongTensor of FFN intermediate neurons} touched by the removed subnetwork.
    Neuron j: row j of W_in (intermediate.dense.weight, (I, H)) and column j of W_out (output.dense.weight, (H, I)).
    k (rule top): neurons per layer, an int or {layer: int}."""
    counts, sizes = {}, {}
    for n, m in zip(names, removed):
        if n.endswith("intermediate.dense.weight"):
            c, h = m.sum(1), m.shape[1]  # (I,): removed weights in row j of W_in (I, H)
        elif n.endswith("output.dense.weight") and "attention" not in n:
            c, h = m.sum(0), m.shape[0]  # (I,): removed weights in column j of W_out (H, I)
        else:
            continue
        l = layer_of(n)
        counts[l] = counts.get(l, 0) + c
        sizes[l] = sizes.get(l, 0) + h  # 2H weights per neuron
    out = {}
    for l, c in counts.items():
        if rule == "any":
            out[l] = (c > 0).nonzero().flatten()
        elif rule == "frac":
            out[l] = (c / sizes[l] >= frac).nonzero().flatten()
        elif rule == "top":
            kl = k[l] if isinstance(k, dict) else k
            nz = int((c > 0).sum())
            out[l] = torch.topk(c, min(kl, nz)).indices.sort().values
        else:
            raise ValueError(f"--neuron-rule {rule}: expected any, frac or top")
    return out


def overlaps(names, removed, path_sets, rule, frac, inter_size):
    """{name: overlap_report} of the subnetwork's FFN neurons with each routing path set ({name: paths})."""
    out = {}
    for name, paths in path_sets.items():
        k = {l: len(paths[l]) for l in range(len(paths))}
        subnet = subnetwork_neurons(names, removed, rule, k, frac)
        out[name] = overlap_report(subnet, {l: paths[l] for l in subnet}, inter_size)
    return out


def jaccard(a, b):
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b) if a | b else 0.0


def _intersection_pmf(n, a, b):
    x = np.arange(0, min(a, b) + 1)
    return hypergeom(n, a, b).pmf(x)  # P(|A & B| = x) for random A (size a), B (size b) in [n]


def expected_jaccard(n, a, b):
    """E[|A & B| / |A | B|] for independent uniform random subsets of sizes a, b of n items."""
    return expected_jaccard_overall([n], [a], [b])


def _overall_pmf(ns, as_, bs):
    """pmf of the total intersection over layers: per layer independent uniform subsets, so the sum of
    per-layer hypergeometrics (pmfs convolved)."""
    pmf = np.ones(1)
    for n, a, b in zip(ns, as_, bs):
        pmf = np.convolve(pmf, _intersection_pmf(n, a, b))
    return pmf


def expected_jaccard_overall(ns, as_, bs):
    """E[X / (A + B - X)] for the union over layers, X = total intersection."""
    pmf = _overall_pmf(ns, as_, bs)
    x = np.arange(len(pmf))
    union = sum(as_) + sum(bs) - x
    ratio = np.divide(x, union, out=np.zeros(len(x)), where=union > 0)
    return float((pmf * ratio).sum())


def p_at_least(ns, as_, bs, observed):
    """P(total intersection >= observed) under independent uniform subsets (one-sided p-value)."""
    return float(min(1.0, _overall_pmf(ns, as_, bs)[observed:].sum()))


def overlap_report(subnet, paths, inter_size):
    """Per-layer and overall Jaccard of subnetwork vs routing neuron sets, with the exact random
    expectation and the p-value P(intersection >= observed) for independent uniform sets of the same sizes."""
    per_layer, ns, as_, bs, inter, union = [], [], [], [], 0, 0
    for l in sorted(subnet):
        a, b = subnet[l], paths[l]
        i = len(set(a.tolist()) & set(b.tolist()))
        per_layer.append(dict(layer=l, subnet=len(a), routing=len(b), intersection=i,
                              expected_intersection=len(a) * len(b) / inter_size, jaccard=jaccard(a, b),
                              expected_jaccard=expected_jaccard(inter_size, len(a), len(b)),
                              p_value=p_at_least([inter_size], [len(a)], [len(b)], i)))
        ns.append(inter_size); as_.append(len(a)); bs.append(len(b))
        inter += i
        union += len(a) + len(b) - i
    return dict(per_layer=per_layer, overall=dict(jaccard=inter / union if union else 0.0,
                                                  expected_jaccard=expected_jaccard_overall(ns, as_, bs),
                                                  intersection=inter, p_value=p_at_least(ns, as_, bs, inter)))


def paired_training_state(model_dir):
    """The pretrain.py training_state.pt written at the same step as the model in model_dir, or None.
    A run's final/ is saved right after its last checkpoint/ (so <run>/checkpoint/training_state.pt);
    checkpoint/ holds its own. A step_NNNNNN/ snapshot (or any other directory) has none: checkpoint/
    there may be a later step, whose routing paths are not this model's."""
    d = os.path.normpath(model_dir)
    name = os.path.basename(d)
    if name == "final":
        path = os.path.join(os.path.dirname(d), "checkpoint", "training_state.pt")
    elif name == "checkpoint":
        path = os.path.join(d, "training_state.pt")
    else:
        return None
    return path if os.path.exists(path) else None


def training_state_paths(path):
    """(paths, record) from a pretrain.py training_state.pt: the list of L neuron LongTensors that
    routing last selected, and {step, commit} of that state. paths is None if the run did not route."""
    st = torch.load(path, map_location="cpu", weights_only=False)
    if "paths" not in st:
        raise ValueError(f"--training-state {path}: no 'paths' entry (expected pretrain.py's training_state.pt)")
    return st["paths"], dict(path=common.portable_path(path), step=st.get("step"), commit=st.get("commit"),
                             method=st.get("config", {}).get("method"))
