"""Contrastive Knowledge Assessing, CKA (TRELM Sec. 3.1, Eq. 2-3). Not centered kernel alignment.

At every token position i of an injected entity span, the encoder sees the pseudo token h_e
instead of the entity, and must recover the entity's original i-th token y_i from its final
hidden state h_d^i against K negative tokens y' drawn from Q (unigram^0.75 over the tokens of KG
entity labels). Eq. 2 is a sampled softmax over the K + 1 candidates, scored with the tied MLM
head, so CKA adds no parameters and never computes full-vocabulary logits:

    f(h, y)  = head_transform(h) . W_dec[y] + b_dec[y]                         (tied MLM logit)
    L_CKA    = mean_i -log( exp f(h_i, y_i) / (exp f(h_i, y_i) + sum_k exp f(h_i, y'_ik)) )  # Eq. (2)
    L        = theta * L_MLM + (1 - theta) * L_CKA                             # Eq. (3)

| paper          | here                                                  |
|----------------|-------------------------------------------------------|
| h_d^i          | `hidden` (N, H), final hidden states at span positions |
| y_i, y'        | `targets` (N,), `negatives` (N, K)                     |
| Q              | `NegativeSampler(label_token_counts(...), power=0.75)` |
| K              | `negatives.shape[1]` (pretrain flag, default 16)       |
| theta          | `total_loss(..., theta=0.5)`                           |
| P_x (Eq. 9)    | `cka_response_prob` (used by routing.py)               |

Decisions (docs/departures.md, "Eq. 2" and "Eq. 3"):
- f is the tied MLM head's logit, so Eq. 2 is a sampled softmax over K + 1 candidates, K = 16.
- Q = unigram^0.75 over the tokens of the KG's entity labels; a negative never equals its target.
- Eq. 3 weights every batch alike: a batch without an injected span trains on theta * L_MLM.

Positions and targets come from entity_importance.span_positions: hidden = last_hidden[row, col],
targets = original_input_ids[row, col]. Tests: `python -m pytest -q tests/test_cka.py`.
"""
import numpy as np
import torch
import torch.nn.functional as F

import common


def label_token_counts(kg, tokenizer, vocab_size, chunk=65536):
    """(V,) int64: how often each token occurs in the tokenized KG entity labels (each entity's
    label once, as a mid-sentence word with a leading space, no special tokens), tokenized `chunk`
    labels at a time. Special tokens (e.g. [UNK]) get count 0 so they are never drawn as negatives."""
    counts = np.zeros(vocab_size, np.int64)
    for i in range(0, len(kg.entity_labels), chunk):  # a chunk at a time: Wikidata5M has 4.8M labels
        ids = tokenizer([" " + s for s in kg.entity_labels[i:i + chunk]], add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for x in ids for t in x), np.int64, sum(len(x) for x in ids))
        if flat.size and flat.max() >= vocab_size:
            raise ValueError(f"cka.label_token_counts: token id {flat.max()} >= vocab_size {vocab_size}")
        counts += np.bincount(flat, minlength=vocab_size)
    counts[[i for i in tokenizer.all_special_ids if i < vocab_size]] = 0
    return counts


class NegativeSampler:
    """Draws negatives y' ~ Q(y) proportional to count(y)^power, never equal to the row's target:
    for each row the draws follow Q conditioned on y != target (rejection sampling; collided
    entries are redrawn, vectorised, for up to max_rounds rounds; any left then are drawn from Q with
    the target's mass removed, which is the same conditional law)."""

    def __init__(self, token_counts, power=0.75, max_rounds=64):
        counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)  # (V,)
        if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("cka.NegativeSampler: token_counts must be a 1-D non-negative array with "
                             "a positive sum (see label_token_counts)")
        q = counts.pow(power) * (counts > 0)
        self.q = q / q.sum()  # (V,) Q
        self.power = power
        self.max_rounds = max_rounds

    def sample(self, targets, k, generator=None):
        """targets (N,) -> negatives (N, k) long on targets.device, negatives[i, j] != targets[i]."""
        t = targets.detach().to("cpu", torch.long)  # (N,)
        N, V = t.numel(), self.q.numel()
        if N and (t.min() < 0 or t.max() >= V):
            raise ValueError(f"cka.NegativeSampler.sample: targets must lie in [0, {V}), found [{t.min()}, {t.max()}]")
        if k == 0 or N == 0:
            return torch.zeros(N, k, dtype=torch.long, device=targets.device)
        if (self.q[t] >= 1.0).any():
            only = int(self.q.argmax())
            raise ValueError(f"cka.NegativeSampler.sample: Q puts all its mass on token {only}, which is also a "
                             "target, so no negative different from it exists; the negative vocabulary needs at "
                             "least two tokens (check label_token_counts)")
        neg = torch.multinomial(self.q, N * k, replacement=True, generator=generator).view(N, k)  # (N, k)
        for _ in range(self.max_rounds):
            bad = neg == t.unsqueeze(1)  # (N, k) collisions with the row's target
            if not bad.any():
                break
            neg[bad] = torch.multinomial(self.q, int(bad.sum()), replacement=True, generator=generator)
        bad = neg == t.unsqueeze(1)
        if bad.any():  # rows whose target holds most of Q: draw the rest from Q without the target, exactly
            rows = torch.nonzero(bad)[:, 0]  # (n_bad,)
            cond = self.q.expand(rows.numel(), V).clone()  # (n_bad, V)
            cond[torch.arange(rows.numel()), t[rows]] = 0.0
            neg[bad] = torch.multinomial(cond, 1, generator=generator).squeeze(1)
        return neg.to(targets.device)


def sampled_logits(features, W, b, targets, negatives):
    """f(h, y) for y in [target, negatives...]: features (N, H) after the head transform, W (V, H),
    b (V,), targets (N,), negatives (N, K) -> (N, K + 1), column 0 the correct response."""
    cand = torch.cat([targets.unsqueeze(1), negatives], dim=1)  # (N, K+1)
    return torch.einsum("nh,nkh->nk", features, W[cand]) + b[cand]  # (N, K+1)


def _at_least_fp32(x):
    """bf16 / fp16 logits (autocast) -> fp32 for the softmax; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sampled_softmax_loss(features, W, b, targets, negatives):
    """Eq. (2) on head-transformed features (N, H) -> scalar mean over N. N = 0 gives a 0 that is
    still attached to the graph (so every rank runs the same backward under DDP)."""
    if features.shape[0] == 0:
        return features.sum() * 0.0
    logits = _at_least_fp32(sampled_logits(features, W, b, targets, negatives))  # (N, K+1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()  # Eq. (2); K = 0 gives exactly 0


def cka_loss(model, hidden, targets, negatives):
    """L_CKA, Eq. (2): hidden (N, H) final hidden states at injected span positions, targets (N,)
    original entity tokens, negatives (N, K) from NegativeSampler -> scalar."""
    W, b = common.head_decoder(model)
    return sampled_softmax_loss(common.head_transform(model, hidden), W, b, targets, negatives)


def cka_response_prob(model, hidden, targets, negatives):
    """(N,) softmax probability of the correct response among the K + 1 candidates of Eq. (2);
    P_x of Eq. (9). Differentiable (routing integrates its gradients)."""
    W, b = common.head_decoder(model)
    logits = sampled_logits(common.head_transform(model, hidden), W, b, targets, negatives)  # (N, K+1)
    return F.softmax(_at_least_fp32(logits), dim=1)[:, 0]


def total_loss(l_mlm, l_cka, theta=0.5):
    """Eq. (3): theta * L_MLM + (1 - theta) * L_CKA."""
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"cka.total_loss: theta (--theta) must be in [0, 1], got {theta}")
    return theta * l_mlm + (1.0 - theta) * l_cka  # Eq. (3)
