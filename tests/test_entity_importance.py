"""Tests for entity_importance.py: long tail, SI (Eq. 1), strategies, h_e, injection."""
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import entity_importance as ei
from conftest import make_bert_tokenizer, make_model, make_roberta_tokenizer


# ----------------------------------------------------------------------------- helpers

def token_span(offsets, char_start, char_end):
    """[start, end) of the tokens whose character offsets overlap [char_start, char_end)."""
    idx = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    return idx[0], idx[-1] + 1


def encode_batch(tok, sentences, entities):
    """Right-padded batch plus flat mention tensors from character spans (as data.py will give)."""
    enc = tok(sentences, padding=True, return_offsets_mapping=True, return_tensors="pt")
    b, s, e = [], [], []
    for row, (text, ents) in enumerate(zip(sentences, entities)):
        for surface in ents:
            c = text.index(surface)
            ts, te = token_span(enc["offset_mapping"][row].tolist(), c, c + len(surface))
            b.append(row), s.append(ts), e.append(te)
    return enc["input_ids"], enc["attention_mask"], torch.tensor(b), torch.tensor(s), torch.tensor(e)


def reference_si(model, input_ids, attention_mask, ent_batch, ent_start, ent_end, mask_id, window=None):
    """SI per mention, one mention at a time, each window cut out by hand without padding: h_o
    pooled over its positions outside the span, h_rep over the same tokens of the window with the
    span replaced by ONE mask token, every token keeping its window position id: (SI, cos) lists."""
    si, cos = [], []
    off = getattr(model.base_model.embeddings, "padding_idx", None)
    off = 0 if off is None else off + 1  # RoBERTa's first position id
    for j in range(ent_batch.numel()):
        r, s, e = int(ent_batch[j]), int(ent_start[j]), int(ent_end[j])
        n = int(attention_mask[r].sum())
        lo, hi = (0, n) if window is None else (max(0, s - window), min(n, e + window))
        x = input_ids[r, lo:hi].tolist()
        left, right = x[:s - lo], x[e - lo:]
        ids = torch.tensor([x])
        rep = torch.tensor([left + [mask_id] + right])
        rep_pos = torch.tensor([[off + i for i in range(s - lo + 1)] + [off + i for i in range(e - lo, hi - lo)]])
        with torch.no_grad():
            h = model.base_model(input_ids=ids).last_hidden_state[0]
            hr = model.base_model(input_ids=rep, position_ids=rep_pos).last_hidden_state[0]
        h_o = torch.cat([h[:len(left)], h[e - lo:]]).mean(0)
        h_r = torch.cat([hr[:len(left)], hr[len(left) + 1:]]).mean(0)
        c = float(F.cosine_similarity(h_o, h_r, dim=0))
        si.append(1 - c), cos.append(c)
    return si, cos


SENTS = ["Paris is the capital of France.", "The capital of the United States is in New York.",
         "Berlin is in Germany."]
ENTS = [["Paris", "France"], ["United States", "New York"], ["Berlin", "Germany"]]


# ----------------------------------------------------------------------------- long tail

def test_long_tail_below_percentile_of_occurring_entities():
    freq = np.array([0, 1, 1, 2, 5, 10, 0])  # occurring: 1 1 2 5 10 -> median 2
    lt = ei.long_tail_mask(freq, 50.0)
    assert lt.tolist() == [False, True, True, False, False, False, False]  # zero-frequency never long-tail
    assert ei.long_tail_mask(freq, 50.0, inclusive=True).tolist() == [False, True, True, True, False, False, False]
    # 80th percentile of [1, 1, 2, 5, 10] with linear interpolation: 6.0
    assert ei.long_tail_mask(freq, 80.0).tolist() == [False, True, True, True, True, False, False]
    frequent = (freq > 0) & ~lt
    assert frequent.tolist() == [False, False, False, True, True, True, False]


def test_long_tail_ties_at_threshold_are_frequent():
    freq = np.array([3, 3, 3, 0])
    assert not ei.long_tail_mask(freq).any()
    assert ei.long_tail_mask(freq, inclusive=True).tolist() == [True, True, True, False]
    assert not ei.long_tail_mask(np.zeros(4, dtype=int)).any()


# ----------------------------------------------------------------------------- semantic importance

def test_si_batched_equals_one_at_a_time_unpadded(tiny_mlm):
    model, tok = tiny_mlm
    ids, am, b, s, e = encode_batch(tok, SENTS, ENTS)
    assert (am == 0).any()  # the batch has padding, which the pooling must ignore
    ref, cos = reference_si(model, ids, am, b, s, e, tok.mask_token_id)
    si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)
    assert si.shape == (6,) and not si.requires_grad
    torch.testing.assert_close(si, torch.tensor(ref), atol=1e-5, rtol=0)
    for chunk in (1, 4):
        torch.testing.assert_close(ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id, chunk=chunk),
                                   si, atol=1e-5, rtol=0)
    assert ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id, window=0).abs().max() == 0  # no context
    for w in (1, 3):  # symmetric windows of +-w tokens, clipped to the row
        ref_w, _ = reference_si(model, ids, am, b, s, e, tok.mask_token_id, window=w)
        torch.testing.assert_close(ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id, window=w),
                                   torch.tensor(ref_w), atol=1e-5, rtol=0)
    for j in range(6):  # a single mention alone gives the same value
        one = ei.semantic_importance(model, ids, am, b[j:j + 1], s[j:j + 1], e[j:j + 1], tok.mask_token_id)
        assert abs(float(one[0]) - ref[j]) < 1e-5
    # Eq. 1 as printed (1/cos) ranks the mentions the same way whenever cos > 0
    assert min(cos) > 0 and len(set(np.round(ref, 7))) == 6
    assert np.argsort(ref).tolist() == np.argsort(1.0 / np.array(cos)).tolist()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_si_does_not_grow_with_span_length_when_context_is_unaffected(kind, tmp_path):
    """Hand-made case: an encoder without attention layers (each output depends on its own token
    only) cannot let the entity affect its context, so SI is exactly 0 for spans of 1, 2 and 3
    tokens; pooling the replaced positions too (the old definition) gave SI growing with length."""
    tok = make_bert_tokenizer(tmp_path) if kind == "bert" else make_roberta_tokenizer(tmp_path)
    model = make_model(kind, tok, layers=0)
    ids, am, b, s, e = encode_batch(tok, ["Paris is the capital of France.", "New York is in the United States."],
                                    [["Paris", "France"], ["New York", "United States"]])
    assert sorted(set((e - s).tolist())) and int((e - s).max()) >= 2
    for w in (None, 2):
        si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id, window=w)
        assert si.abs().max() < 1e-6, si
    with torch.no_grad():  # the old pooling over every real token, span included
        pool = lambda x: (model.base_model(input_ids=x, attention_mask=am).last_hidden_state * am[..., None]).sum(1)
        old = []
        for j in range(len(b)):
            rep = ids.clone()
            rep[b[j], s[j]:e[j]] = tok.mask_token_id
            old.append(1 - float(F.cosine_similarity(pool(ids)[b[j]], pool(rep)[b[j]], dim=0)))
    assert min(old) > 1e-3


def test_si_zero_when_span_is_already_masked(tiny_mlm):
    model, tok = tiny_mlm
    ids, am, b, s, e = encode_batch(tok, SENTS[:1], ENTS[:1])
    ids[0, int(s[1]):int(e[1])] = tok.mask_token_id  # "France" already masked
    si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)
    assert abs(float(si[1])) < 1e-6
    assert float(si[0]) > 1e-6  # replacing "Paris" does change its context (a small effect in a random tiny model)


def test_si_larger_for_the_entity_whose_replacement_changes_more(bert_tok):
    tok = bert_tok
    model = make_model("bert", tok)
    ids, am, b, s, e = encode_batch(tok, ["Paris is the capital of France."], [["Paris", "France"]])
    W = model.get_input_embeddings().weight
    with torch.no_grad():  # "paris" almost looks like [MASK] to the model, "france" does not
        torch.manual_seed(1)
        W[tok.convert_tokens_to_ids("paris")] = W[tok.mask_token_id] + 1e-3 * torch.randn(W.shape[1])
    si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)
    assert float(si[0]) < float(si[1]) / 10


def test_si_restores_training_mode_and_handles_no_mentions(tiny_mlm):
    model, tok = tiny_mlm
    ids, am, b, s, e = encode_batch(tok, SENTS[:1], ENTS[:1])
    model.train()
    ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)
    assert model.training
    model.eval()
    ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)
    assert not model.training
    assert ei.semantic_importance(model, ids, am, b[:0], s[:0], e[:0], tok.mask_token_id).shape == (0,)


def test_si_overlapping_mentions_are_scored_separately(bert_tok):
    model = make_model("bert", bert_tok)
    ids, am, b, s, e = encode_batch(bert_tok, ["New York is a city."], [["New York", "York"]])
    si = ei.semantic_importance(model, ids, am, b, s, e, bert_tok.mask_token_id)
    ref, _ = reference_si(model, ids, am, b, s, e, bert_tok.mask_token_id)
    torch.testing.assert_close(si, torch.tensor(ref), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- strategies

def test_select_mentions_strategies():
    long_tail = np.array([True, False, True, True, False])  # (E,)
    ent_id = torch.tensor([0, 1, 2, 3, 4, 0, 2])  # (M,) long-tail mentions: 0, 2, 3, 5, 6
    si = torch.tensor([0.1, 9.0, 0.3, 0.3, 9.0, 0.05, 0.3])
    sel = lambda strat, **kw: ei.select_mentions(strat, ent_id, long_tail, si=si, **kw).tolist()
    assert sel("none") == [False] * 7
    assert sel("all") == [True] * 7
    assert sel("long-tail") == [True, False, True, True, False, True, True]
    assert sel("frequent") == [False, True, False, False, True, False, False]
    # a corpus-level threshold, not a share of this batch: frequent SI 9.0 is ignored
    assert sel("important", si_threshold=0.3) == [False, False, True, True, False, False, True]
    assert sel("important", si_threshold=0.31) == [False] * 7  # a batch of unimportant entities injects nothing
    assert sel("important", si_threshold=0.0) == sel("long-tail")
    assert sel("important", si_threshold=None) == [False] * 7


def test_important_threshold_is_corpus_level():
    si = np.array([0.1, 9.0, 0.3, 0.2, 9.0, 0.05, 0.4])
    cand = np.array([True, False, True, True, False, True, True])  # 5 candidates: .1 .3 .2 .05 .4
    assert ei.important_threshold(si, cand, 0.5) == 0.2   # k = ceil(2.5) = 3 -> .4 .3 .2
    assert ei.important_threshold(si, cand, 0.2) == 0.4   # k = 1
    assert ei.important_threshold(si, cand, 1.0) == 0.05
    assert ei.important_threshold(si, np.zeros(7, bool), 0.5) is None
    with pytest.raises(ValueError, match="--important-fraction"):
        ei.important_threshold(si, cand, 0.0)


def test_select_mentions_dkplm_score_and_degree():
    """DKPLM's KLT(e) = 1[long-tail] * SI * KC, above the mean KLT of its sequence (hand values)."""
    triples = np.array([[0, 0, 1], [0, 1, 2], [3, 0, 0], [2, 0, 1]])
    deg = ei.kg_degree(triples, 5)
    assert deg.tolist() == [3, 2, 2, 1, 0]
    long_tail = np.array([True, True, True, True, False])
    ent_id = torch.tensor([0, 1, 2, 4, 3, 2])
    ent_batch = torch.tensor([0, 0, 0, 0, 1, 1])
    si = torch.tensor([0.5, 0.5, 1.0, float("nan"), 0.1, 0.2])  # the frequent mention is not scored
    # row 0: KLT = .5*3=1.5, .5*2=1.0, 1.0*2=2.0, 0 (frequent) -> mean 1.125 -> mentions 0 and 2
    # row 1: KLT = .1*1=.1, .2*2=.4 -> mean .25 -> mention 5
    out = ei.select_mentions("dkplm", ent_id, long_tail, si=si, ent_batch=ent_batch, degree=deg)
    assert out.tolist() == [True, False, True, False, False, True]
    eligible = torch.tensor([True, True, False, True, True, True])  # mention 2 cannot be injected
    out = ei.select_mentions("dkplm", ent_id, long_tail, si=si, ent_batch=ent_batch, degree=deg, eligible=eligible)
    assert out.tolist() == [True, True, False, False, False, True]  # row 0 mean (1.5+1+0)/3 = .83 < 1.0
    # a sequence whose only candidate is its mean: never selected strictly above it, selected at least it
    one = dict(ent_batch=torch.tensor([0, 0]), degree=deg, eligible=torch.tensor([True, True]))
    args = ("dkplm", torch.tensor([0, 4]), long_tail)  # entity 4 is frequent: KLT 0, counted in the mean
    assert ei.select_mentions(*args, si=torch.tensor([0.5, 0.1]), **one).tolist() == [True, False]  # 1.5 > .75
    one["ent_batch"] = torch.tensor([0, 1])  # each mention alone in its sequence: KLT = its mean
    assert ei.select_mentions(*args, si=torch.tensor([0.5, 0.1]), **one).tolist() == [False, False]
    assert ei.select_mentions(*args, si=torch.tensor([0.5, 0.1]), at_least_mean=True, **one).tolist() == [True, False]


def test_select_mentions_eligible_and_errors():
    long_tail = torch.tensor([True, True, False])
    ent_id = torch.tensor([0, 1, 0, 2])
    si = torch.tensor([5.0, 1.0, 4.0, 0.0])
    eligible = torch.tensor([False, True, True, True])  # mention 0 (highest SI) has no triple
    out = ei.select_mentions("important", ent_id, long_tail, si=si, si_threshold=1.0, eligible=eligible)
    assert out.tolist() == [False, True, True, False]
    assert ei.select_mentions("all", ent_id, long_tail, eligible=eligible).tolist() == eligible.tolist()
    assert ei.select_mentions("frequent", ent_id, long_tail, eligible=eligible).tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="strategy must be one of"):
        ei.select_mentions("random", ent_id, long_tail, si=si)
    with pytest.raises(ValueError, match="needs si"):
        ei.select_mentions("important", ent_id, long_tail)
    with pytest.raises(ValueError, match="ent_batch and degree"):
        ei.select_mentions("dkplm", ent_id, long_tail, si=si)


def _si_store(bert_tok, path, ent_id):
    """The three test sentences as a one-shard store, their mentions' entities `ent_id` (per sequence)."""
    from conftest import store_from_rows
    ids, am, b, s, e = encode_batch(bert_tok, SENTS, ENTS)
    rows = {"input_ids": [ids[i, :int(am[i].sum())].tolist() for i in range(3)], "ent_id": ent_id,
            "word_start": [[0] * int(am[i].sum()) for i in range(3)],
            "ent_start": [s[b == i].tolist() for i in range(3)], "ent_end": [e[b == i].tolist() for i in range(3)]}
    return store_from_rows(path, rows), (ids, am, b, s, e)


def test_corpus_si_matches_semantic_importance(bert_tok, tmp_path):
    """CorpusSI.score over a store (batches of 2 sequences, written per shard) = semantic_importance on the
    whole batch, for the candidate mentions only (NaN elsewhere); a rerun reads the shard file back."""
    model = make_model("bert", bert_tok)
    store, (ids, am, b, s, e) = _si_store(bert_tok, tmp_path / "s", [[0, 0]] * 3)
    ref = ei.semantic_importance(model, ids, am, b, s, e, bert_tok.mask_token_id, window=2)
    si = ei.CorpusSI(np.ones(5, bool), 0.5, window=2, refresh=0, batch_size=2)
    si.score(store, model, bert_tok.mask_token_id, str(tmp_path / "si"))
    torch.testing.assert_close(torch.from_numpy(si.values), ref, atol=1e-5, rtol=0)
    assert si.threshold == ei.important_threshold(si.values.astype(np.float64), np.ones(6, bool), 0.5)
    store, _ = _si_store(bert_tok, tmp_path / "s2", [[0, 1], [2, 3], [0, 4]])
    part = ei.CorpusSI(np.array([True, False, False, True, False]), 0.5, window=2, refresh=0, batch_size=2)
    part.score(store, model, bert_tok.mask_token_id, str(tmp_path / "si2"))
    scored = np.array([True, False, False, True, True, False])
    torch.testing.assert_close(torch.from_numpy(part.values[scored]), ref[scored], atol=1e-5, rtol=0)
    assert np.isnan(part.values[~scored]).all()
    os.remove(os.path.join(tmp_path, "s2", "shard-00000", "tokens.npy"))  # a rerun must not need the text again
    again = ei.CorpusSI(part.candidate, 0.5, window=2, refresh=0, batch_size=2)
    again.score(store, model, bert_tok.mask_token_id, str(tmp_path / "si2"))
    assert np.array_equal(again.values, part.values, equal_nan=True)


def test_shares_balance_candidate_mentions_and_cover_every_shard():
    from types import SimpleNamespace
    shard = lambda ids: {"ent_id": np.asarray(ids)}
    store = SimpleNamespace(shards=[shard([0] * 5), shard([1] * 9), shard([0, 1]), shard([0] * 4), shard([])])
    cand = np.array([True, False])  # candidate mentions per shard: 5, 0, 1, 4, 0
    assert ei.shares(store, cand, 2) == [[0, 1, 4], [2, 3]]  # 5 against 5
    assert ei.shares(store, cand, 1) == [[0, 1, 2, 3, 4]]
    assert sorted(sum(ei.shares(store, cand, 3), [])) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- KnowledgeInjector

def tiny_kg():
    entities = ["Paris", "France", "Germany", "Berlin", "Europe", "Rome"]
    relations = ["capital of", "located in", "country"]
    triples = np.array([[1, 1, 4], [0, 0, 1], [3, 0, 2], [1, 2, 1], [0, 1, 4], [3, 1, 4], [0, 2, 1]],
                       dtype=np.int32)  # not sorted by head; Germany (2), Europe (4), Rome (5) head none
    return types.SimpleNamespace(entity_ids=[f"Q{i}" for i in range(6)], entity_labels=entities,
                                 relation_ids=["P1", "P2", "P3"], relation_labels=relations, triples=triples)


def test_injector_chooses_one_of_each_heads_triples_seeded():
    kg = tiny_kg()
    inj = ei.KnowledgeInjector(kg, make_bert_tokenizer(None), seed=0)
    assert inj.has_knowledge.tolist() == [True, True, False, True, False, False]
    own = {h: {tuple(t) for t in kg.triples.tolist() if t[0] == h} for h in range(6)}
    seen = {0: set(), 1: set(), 3: set()}
    for seed in range(40):
        inj = ei.KnowledgeInjector(kg, make_bert_tokenizer(None), seed=seed)
        for h in seen:
            t = tuple(inj.triple[h].tolist())
            assert t in own[h]
            seen[h].add(t)
    assert all(seen[h] == own[h] for h in seen)  # uniform choice reaches every triple of the head
    a = ei.KnowledgeInjector(kg, make_bert_tokenizer(None), seed=7).triple
    assert torch.equal(a, ei.KnowledgeInjector(kg, make_bert_tokenizer(None), seed=7).triple)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_h_e_is_tail_minus_relation_mean_embeddings(kind, tmp_path):
    tok = make_bert_tokenizer(tmp_path) if kind == "bert" else make_roberta_tokenizer(tmp_path)
    kg = tiny_kg()
    kg.triples = np.array([[0, 0, 1], [3, 0, 2]], dtype=np.int32)  # Paris capital-of France, Berlin - Germany
    inj = ei.KnowledgeInjector(kg, tok)
    W = torch.randn(len(tok), 8, dtype=torch.float64, requires_grad=True)
    ids = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"]
    # mid-sentence forms: the tail token is the one "... capital of France." uses
    assert ids("France") == [t for t in tok("The capital of France.")["input_ids"]
                             if tok.convert_ids_to_tokens(t).lstrip("Ġ").lower() == "france"]
    expect = torch.stack([W[ids("France")].mean(0) - W[ids("capital of")].mean(0),
                          W[ids("Germany")].mean(0) - W[ids("capital of")].mean(0)])
    h = inj.embed(W, torch.tensor([0, 3]))
    torch.testing.assert_close(h, expect, atol=1e-12, rtol=0)
    h.sum().backward()
    touched = set(torch.nonzero(W.grad.abs().sum(1)).squeeze(1).tolist())
    assert touched == set(ids("France") + ids("Germany") + ids("capital of"))
    assert inj.injectable(torch.tensor([0, 1, 3])).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="no KG triple"):
        inj.embed(W, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- span positions

def test_span_positions_hand_case():
    b, s, e = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 5, 4]), torch.tensor([3, 3, 8, 5])
    row, col, mention, offset = ei.span_positions(b, s, e, torch.tensor([True, False, True, True]))
    assert row.tolist() == [0, 0, 1, 1, 1, 0]
    assert col.tolist() == [1, 2, 5, 6, 7, 4]
    assert mention.tolist() == [0, 0, 2, 2, 2, 3]
    assert offset.tolist() == [0, 1, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="overlap"):
        ei.span_positions(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="ent_start < ent_end"):
        ei.span_positions(torch.tensor([0]), torch.tensor([2]), torch.tensor([2]))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_si_replaces_the_span_by_one_mask_keeping_positions(kind, tmp_path):
    """h_rep is the window with the whole span replaced by one mask token, every context token at
    its original position id (RoBERTa's ids start at padding_idx + 1): matches the by-hand
    reference for spans of 1-3 tokens, and disturbs less than one mask per span token."""
    tok = make_bert_tokenizer(tmp_path) if kind == "bert" else make_roberta_tokenizer(tmp_path)
    model = make_model(kind, tok)
    ids, am, b, s, e = encode_batch(tok, ["New York is in the United States of America.", "Paris is in France."],
                                    [["New York", "United States of America"], ["Paris", "France"]])
    assert int((e - s).max()) >= 3 and int((e - s).min()) == 1
    for w in (None, 2):
        ref, _ = reference_si(model, ids, am, b, s, e, tok.mask_token_id, window=w)
        si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id, window=w)
        torch.testing.assert_close(si, torch.tensor(ref), atol=1e-5, rtol=0)
    si = ei.semantic_importance(model, ids, am, b, s, e, tok.mask_token_id)  # whole rows
    j = int(torch.argmax(e - s))  # the longest span: one mask per token gives another value
    rep = ids.clone()
    rep[b[j], s[j]:e[j]] = tok.mask_token_id
    ctx = torch.ones(ids.shape[1], dtype=torch.bool)
    ctx[s[j]:e[j]] = False
    ctx &= am[b[j]].bool()
    with torch.no_grad():
        h = model.base_model(input_ids=ids[b[j]:b[j] + 1]).last_hidden_state[0, ctx].mean(0)
        hr = model.base_model(input_ids=rep[b[j]:b[j] + 1]).last_hidden_state[0, ctx].mean(0)
    multi = 1 - float(F.cosine_similarity(h, hr, dim=0))
    assert multi > float(si[j]) > 0 and multi - float(si[j]) > 0.25 * multi  # more masks, more change
