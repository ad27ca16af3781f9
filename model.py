"""The model of a pre-training run: a masked LM that takes injected knowledge and computes its losses.

KnowledgeMLM wraps any Hugging Face masked LM (BERT, RoBERTa) without new parameters. One forward
(everything that needs gradients happens inside it, so DDP sees it):
  input   E_p, and at each injected span and shown long-tail word Eq. (7)'s mix of h_e (or E_p) with
          the memory (memory_bank.span_input); what is injected is a Plan (knowledge.Knowledge.plan)
  losses  L_MLM at the masked positions (the MLM head on those positions only) and the method's
          decoding loss on the injected spans (DECODERS: CKA's sampled softmax, Eq. 2, or DKPLM's
          decoding of the entity's tokens, plain or relation-conditioned), combined by LOSSES (Eq. 3
          for TRELM)
P_x of Eq. (9), the probability routing attributes (KnowledgeProb), is read from the same model.

| paper            | here                                                        |
|------------------|-------------------------------------------------------------|
| E_p, I_p (Eq. 7) | KnowledgeMLM.inputs                                         |
| h_e = E(t)-E(r)  | Plan.h_e, or injector.embed(E, ent_id) inside the forward   |
| L_CKA (Eq. 2)    | DECODERS["cka"] -> cka.cka_loss                             |
| L (Eq. 3)        | LOSSES["theta"] -> cka.total_loss(l_mlm, l_cka, theta)      |
| P_x (Eq. 9)      | response_prob(mlm, hidden, labels, plan); KnowledgeProb     |

Tests: python -m pytest -q tests/test_pretrain.py
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

import common
from cka import cka_loss, cka_response_prob, total_loss
from memory_bank import span_input


# -----------------------------------------------------------------------------
# What a micro-batch injects

@dataclass(frozen=True)
class WordNotes:
    """The long-tail words of one micro-batch (--long-tail-words; Sec. 3.2, 3.4): N occurrences.

    rows, cols (N,): every position of a long-tail word in the original text, outside linked mention
    spans; key (N,): its memory-bank key, num_entities + token id (never an entity's key);
    shown (N,) bool: the word is visible in the input (not masked or replaced by MLM), where Eq. 7
    mixes its memory into E_p; mem (local (N, H), global (N, H)): the memory read before the step.
    Every occurrence updates the memory after the forward (Eq. 4-6), shown or not."""
    rows: torch.Tensor
    cols: torch.Tensor
    key: torch.Tensor
    shown: torch.Tensor
    mem: Optional[tuple] = None

    def head(self, n):
        keep = self.rows < n  # (N,)
        return WordNotes(self.rows[keep], self.cols[keep], self.key[keep], self.shown[keep],
                         None if self.mem is None else tuple(m[keep] for m in self.mem))

    def tile(self, c, batch_size):
        shift = torch.arange(c, device=self.rows.device).repeat_interleave(len(self.rows))  # (c*N,)
        rep = lambda t: t.repeat(c, *([1] * (t.dim() - 1)))
        return WordNotes(self.rows.repeat(c) + shift * batch_size, rep(self.cols), rep(self.key), rep(self.shown),
                         None if self.mem is None else tuple(rep(m) for m in self.mem))


@dataclass(frozen=True)
class Plan:
    """What one micro-batch injects: S selected mentions and their P span positions.

    rows, cols (P,): input position of each injected token; mention (P,): which of the S mentions
    it belongs to; targets (P,): the entity's original token there (what CKA / DKPLM decode);
    ent_id (S,), sel (S,): the mentions' KG entities and their index among the batch's M mentions;
    h_e (S, H) or None: the span input before Eq. 7 when fixed (--no-injection: the mask
    embedding), None: h_e = E(t) - E(r), built in forward() so it stays differentiable;
    negatives (P, K): CKA's draws from Q; mem (local (S, H), global (S, H)), lam, match_norm: Eq. 7;
    words: the long-tail words (--long-tail-words), mixed with the same lam and match_norm. A batch
    with long-tail words and no injected entity has a plan with S = P = 0.
    """
    rows: torch.Tensor
    cols: torch.Tensor
    mention: torch.Tensor
    targets: torch.Tensor
    ent_id: torch.Tensor
    sel: torch.Tensor
    h_e: Optional[torch.Tensor] = None
    negatives: Optional[torch.Tensor] = None
    mem: Optional[tuple] = None
    lam: float = 0.0
    match_norm: bool = True
    words: Optional[WordNotes] = None

    def head(self, n):
        """The plan restricted to the first n sequences (per-mention tensors stay whole)."""
        keep = self.rows < n  # (P,)
        return replace(self, rows=self.rows[keep], cols=self.cols[keep], mention=self.mention[keep],
                       targets=self.targets[keep], negatives=None if self.negatives is None else self.negatives[keep],
                       words=None if self.words is None else self.words.head(n))

    def tile(self, c, batch_size):
        """The plan of the batch (batch_size sequences) repeated c times along the batch dimension."""
        if c == 1:
            return self
        P, S = len(self.rows), len(self.ent_id)
        shift = torch.arange(c, device=self.rows.device).repeat_interleave(P)  # (c*P,) copy index
        rep = lambda t: None if t is None else t.repeat(c, *([1] * (t.dim() - 1)))
        return replace(self, rows=self.rows.repeat(c) + shift * batch_size, cols=self.cols.repeat(c),
                       mention=self.mention.repeat(c) + shift * S, targets=self.targets.repeat(c),
                       ent_id=self.ent_id.repeat(c), sel=self.sel.repeat(c), h_e=rep(self.h_e),
                       negatives=rep(self.negatives), mem=None if self.mem is None else tuple(rep(m) for m in self.mem),
                       words=None if self.words is None else self.words.tile(c, batch_size))


def relation_decoding_loss(mlm, hidden, targets, relation):
    """DKPLM's relation-conditioned decoding of the entity tokens (--dkplm-decoder relation; costs 6.5
    points of probe score at the study's shape, docs/departures.md): the full-softmax MLM head on
    h * r_hat, r_hat = E(r) / rms(E(r)) (DKPLM multiplies the output by its projected relation
    embedding; here E(r) is rescaled to unit RMS instead of learning a projection, so no new
    parameters). hidden (P, H), targets (P,), relation (P, H) -> scalar; P = 0 gives an attached 0."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    r_hat = relation * torch.rsqrt(relation.pow(2).mean(-1, keepdim=True).clamp(min=1e-12))  # (P, H)
    return F.cross_entropy(common.mlm_logits(mlm, hidden * r_hat.to(hidden.dtype)).float(), targets)


def cka_decoding(net, h_span, targets, plan):
    """Eq. (2): CKA's sampled softmax of each injected token against its K negatives from Q."""
    negatives = plan.negatives if plan is not None else targets.new_zeros(0, 0)
    return cka_loss(net.mlm, h_span, targets, negatives)


def relation_decoding(net, h_span, targets, plan):
    """DKPLM: relation-conditioned full-softmax decoding (relation_decoding_loss)."""
    relation = h_span if plan is None else net.injector.relation_embed(net.kg_table(), plan.ent_id)[plan.mention]  # (P, H)
    return relation_decoding_loss(net.mlm, h_span, targets, relation)


def plain_decoding(net, h_span, targets, plan):
    """DKPLM's decoding (--dkplm-decoder plain, the default): the full-softmax MLM head on h itself."""
    if h_span.shape[0] == 0:
        return h_span.sum() * 0.0
    return F.cross_entropy(common.mlm_logits(net.mlm, h_span).float(), targets)


# Method.decoding -> (loss name, fn(net, h_span (P, H), targets (P,), plan or None) -> scalar)
DECODERS = {"cka": ("l_cka", cka_decoding), "relation": ("l_dec", relation_decoding), "plain": ("l_dec", plain_decoding)}
# Method.loss -> fn(l_mlm, l_decoding, theta): Eq. (3) for TRELM; DKPLM's code sums its two losses (its paper,
# as we read it, weights them as Eq. 3 does: --dkplm-loss theta)
LOSSES = {"theta": total_loss, "sum": lambda l_mlm, l_dec, theta: l_mlm + l_dec}


class KnowledgeMLM(torch.nn.Module):
    """Masked LM + knowledge injection + MLM / CKA / entity-decoding losses in one forward.
    decoding and loss: a Method's (config.method_of); kg_grad: E(t), E(r) of h_e and of DKPLM's relation
    take gradients into the word embeddings (True) or not (--kg-grad off)."""

    def __init__(self, mlm, injector=None, decoding="none", loss="mlm", kg_grad=True):
        super().__init__()
        self.mlm = mlm
        self.injector = injector
        self.decoding, self.loss, self.kg_grad = decoding, loss, kg_grad

    def kg_table(self):
        """The table E(x) of h_e = E(t) - E(r) is read from: the word embeddings (V, H), or their detached view."""
        W = self.mlm.get_input_embeddings().weight
        return W if self.kg_grad else W.detach()

    def inputs(self, input_ids, plan):
        """(B, T, H) encoder input: E_p, and Eq. (7) at the injected spans and the shown long-tail words."""
        emb = self.mlm.get_input_embeddings()
        x = emb(input_ids)  # (B, T, H)
        if plan is None:
            return x
        h_e = plan.h_e if plan.h_e is not None else self.injector.embed(self.kg_table(), plan.ent_id)  # (S, H)
        x = span_input(x, plan.rows, plan.cols, plan.mention, h_e, plan.mem, plan.lam, plan.match_norm)  # Eq. (7)
        w = plan.words
        if w is not None:  # Eq. (7) at the shown long-tail words, their own embedding E_p in the place of h_e
            r, c = w.rows[w.shown], w.cols[w.shown]
            mem = (w.mem[0][w.shown], w.mem[1][w.shown])
            x = span_input(x, r, c, torch.arange(len(r), device=x.device), x[r, c], mem, plan.lam, plan.match_norm)
        return x

    def forward(self, input_ids, attention_mask, mlm_labels, plan=None, theta=0.5, return_hidden=False):
        hidden = self.mlm.base_model(inputs_embeds=self.inputs(input_ids, plan),
                                     attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        sel = mlm_labels != -100
        out = {"l_mlm": F.cross_entropy(common.mlm_logits(self.mlm, hidden[sel]).float(), mlm_labels[sel])
               if sel.any() else hidden.sum() * 0.0}
        out["loss"] = out["l_mlm"]
        if self.decoding != "none":  # every batch, with or without injected spans (an empty one adds 0)
            rows, cols = (plan.rows, plan.cols) if plan is not None else (input_ids[:0, 0], input_ids[:0, 0])
            targets = plan.targets if plan is not None else rows
            name, decode = DECODERS[self.decoding]
            out[name] = decode(self, hidden[rows, cols], targets, plan)
            out["loss"] = LOSSES[self.loss](out["l_mlm"], out[name], theta)
        if return_hidden:
            out["hidden"] = hidden  # (B, T, H) the memory bank reads it detached; routing's P_x needs its graph
        return out


def response_prob(mlm, hidden, labels, plan):
    """P_x of Eq. (9) from a forward's last hidden states (B, T, H): the probability of the correct CKA
    response at each injected span token (cka.cka_response_prob); a batch without one: of the masked
    tokens' MLM labels (B, T)."""
    if plan is not None and len(plan.rows):
        return cka_response_prob(mlm, hidden[plan.rows, plan.cols], plan.targets, plan.negatives)
    sel = labels != -100
    return common.mlm_logits(mlm, hidden[sel]).softmax(-1).gather(1, labels[sel, None])[:, 0]


class KnowledgeProb:
    """P_x of Eq. (9) on one micro-batch, in the forms routing.Attribution asks for:
      of_forward(hidden)  P_x of the training forward that produced hidden (B, T, H): its graph is kept
                          (the first-order form differentiates it)
      px(mlm, c=1)        P_x of the first `rows` sequences (--ig-batch; 0 = all) with a forward of their
                          own, on the batch tiled c times along dim 0 (the alpha steps of integrated
                          gradients stacked, routing.ffn_attributions) -> (c*N,)
      positions()         (rows, cols) of those sequences where P_x is defined: the CKA targets, else the
                          masked tokens (the target form scales only these)"""

    def __init__(self, net, batch, rows=0):
        self.net, self.batch = net, batch
        B = batch["input_ids"].shape[0]
        self.n = min(rows or B, B)
        self.head = {k: batch[k][:self.n] for k in ("input_ids", "attention_mask", "mlm_labels")}
        self.plan = None if batch["plan"] is None else batch["plan"].head(self.n)

    def of_forward(self, hidden):
        return response_prob(self.net.mlm, hidden, self.batch["mlm_labels"], self.batch["plan"])

    def __call__(self, mlm, c=1):
        b = {k: v.repeat(c, 1) for k, v in self.head.items()}  # (c*N, T)
        tiled = None if self.plan is None else self.plan.tile(c, self.n)
        h = self.net(b["input_ids"], b["attention_mask"], b["mlm_labels"], tiled, return_hidden=True)["hidden"]
        return response_prob(mlm, h, b["mlm_labels"], tiled)

    def positions(self):
        if self.plan is not None and len(self.plan.rows):
            return self.plan.rows, self.plan.cols
        return (self.head["mlm_labels"] != -100).nonzero(as_tuple=True)
