"""Tests for subnetworks.py (knowledge-critical subnetworks, Bayazit et al. 2023)."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import subnet_data as SD
import subnet_overlap as SO
import subnetworks as S
from conftest import TEXT, make_bert_tokenizer, make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPITALS = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"),
            ("japan", "tokyo"), ("china", "beijing"), ("india", "delhi")]


def capital_facts(tok, template="[X] capital [Y] ."):
    return SD.single_token_facts([dict(relation="P36", sub=s, obj=o, template=template) for s, o in CAPITALS], tok)


def test_masked_names_are_linear_weights_of_top_layers(tiny_mlm):
    model, _ = tiny_mlm
    names = S.masked_weight_names(model, 1)
    # Q, K, V, attention output, FFN in, FFN out of the last layer only; no biases or LayerNorms
    assert len(names) == 6 and all(n.startswith("encoder.layer.1.") and n.endswith(".weight") for n in names)
    assert not any("LayerNorm" in n for n in names)
    assert len(S.masked_weight_names(model, 2)) == 12
    with pytest.raises(ValueError, match="--top-layers"):
        S.masked_weight_names(model, 3)


def test_straight_through_hard_forward_soft_gradient():
    logits = torch.linspace(-3, 3, 50, requires_grad=True)
    m = S.gumbel_sigmoid_st(logits, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}  # forward: exact hard 0/1
    w = torch.randn(50)
    (m * w).sum().backward()
    # backward: d soft / d logits with the same noise, soft = sigmoid(l + logit(u))
    u = torch.rand(50, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid(logits.detach() + torch.logit(u))
    assert torch.equal(m.detach(), (soft > 0.5).float())
    assert torch.allclose(logits.grad, w * soft * (1 - soft), atol=1e-6)
    assert (logits.grad != 0).all()


def test_gumbel_sample_rate_matches_sigmoid():
    # with tau = 1, P(hard = 1) = P(l + logistic noise > 0) = sigmoid(l)
    logits = torch.full((200000,), math.log(0.45 / 0.55))
    m = S.gumbel_sigmoid_st(logits, generator=torch.Generator().manual_seed(1))
    assert abs(m.mean().item() - 0.45) < 0.005


def test_keep_everything_is_bitwise_identical(tiny_mlm):
    model, tok = tiny_mlm
    facts = [dict(query=f"the capital of france is {tok.mask_token} .", obj_id=5),
             dict(query=f"rome is the capital of {tok.mask_token} italy .", obj_id=6)]
    batch = SD.fact_batch(tok, facts)
    masks = S.WeightMasks(model, 2)
    with torch.no_grad():
        full = S.position_logits(model, None, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(full, ref[batch["pos"]], atol=1e-6)  # head on selected positions = HF head
        for l in masks.logits:
            l.fill_(-100.0)  # removal probability ~0: every sample keeps every weight
    assert all(m.sum() == 0 for m in masks.hard())
    removed = masks.sample()  # training path (straight-through)
    params = S.remaining_params(model, masks.names, removed)
    assert torch.equal(S.position_logits(model, params, batch), full)
    cached = S.cache_lower(model, batch, first=1)  # the training path runs only the masked layers
    assert torch.equal(S.top_logits(model, params, cached), full)


def test_removing_weights_changes_only_through_mask(tiny_mlm):
    model, tok = tiny_mlm
    batch = SD.fact_batch(tok, [dict(query=f"paris is in {tok.mask_token} .", obj_id=5)])
    masks = S.WeightMasks(model, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removed = [torch.zeros_like(l) for l in masks.logits]
    removed[0][0, :] = 1.0  # drop row 0 of the last layer's query weight
    params = S.remaining_params(model, masks.names, removed)
    w = dict(model.base_model.named_parameters())[masks.names[0]]
    assert torch.equal(params[masks.names[0]][0], torch.zeros_like(w[0]))
    assert torch.equal(params[masks.names[0]][1:], w[1:])
    with torch.no_grad():
        assert not torch.equal(S.position_logits(model, params, batch), S.position_logits(model, None, batch))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched


def test_kl_terms_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    # KL(U || p) = sum_v 1/3 (log 1/3 - log p_v)
    want = (math.log(1 / 3) - math.log(0.5)) / 3 + 2 * (math.log(1 / 3) - math.log(0.25)) / 3
    assert S.kl_uniform(p.log()).item() == pytest.approx(want, abs=1e-6)
    assert S.kl_uniform(torch.zeros(4, 7)).item() == pytest.approx(0.0, abs=1e-6)
    # KL(p || q) = 0.5 log 2 + 0.25 log 0.5 + 0
    assert S.kl_ref(p.log(), q.log()).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    x = torch.randn(5, 11)
    assert S.kl_ref(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert S.kl_ref(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant logits


def test_sparsity_loss_is_removed_density_and_schedule():
    model = make_model("bert", make_bert_tokenizer(None))
    masks = S.WeightMasks(model, 2, init_prob=0.45)
    assert masks.density().item() == pytest.approx(0.45, abs=1e-6)
    masks.density().backward()  # minimising it lowers every removal logit (removes less)
    assert all((l.grad > 0).all() for l in masks.logits)
    assert [S.sparse_weight(t, 10, 2.0, 3.0, 0.5) for t in (0, 4, 5, 7, 9)] == [2.0, 2.0, 2.0, 2.5, 3.0]


def test_noise_anneal_schedule_and_deterministic_end():
    # 10 steps, last 40% annealed: 1 for steps 0-5, then 0.75, 0.5, 0.25, 0
    assert [S.noise_scale(t, 10, 0.4) for t in range(10)] == pytest.approx([1] * 6 + [0.75, 0.5, 0.25, 0.0])
    assert S.noise_scale(9, 10, 0.0) == 1.0
    logits = torch.tensor([-0.3, 0.2, -2.0, 4.0])
    m = S.gumbel_sigmoid_st(logits, generator=torch.Generator().manual_seed(0), noise=0.0)
    assert m.tolist() == [0.0, 1.0, 0.0, 1.0]  # no noise: exactly the evaluated mask 1[l > 0]


def test_mask_lr_linear_warmup_then_constant():
    # 100 steps, 10% warm-up: lr * (t + 1) / 10 for t < 10, then lr
    assert [S.mask_lr(t, 100, 0.2, 0.1) for t in (0, 4, 9, 10, 99)] == pytest.approx([0.02, 0.1, 0.2, 0.2, 0.2])
    assert S.mask_lr(0, 100, 0.2, 0.0) == 0.2


def test_convergence_hand_computed():
    model = make_model("bert", make_bert_tokenizer(None))
    masks = S.WeightMasks(model, 1)
    total = sum(l.numel() for l in masks.logits)
    with torch.no_grad():
        for l in masks.logits:
            l.fill_(math.log(0.1 / 0.9))  # s = 0.1 everywhere: kept, flips with p = 0.1
        masks.logits[0].view(-1)[:10] = math.log(0.8 / 0.2)  # 10 weights at s = 0.8: removed, flip p = 0.2
    c = masks.convergence()
    assert c["hard_removed"] == pytest.approx(10 / total)
    assert c["expected_removed"] == pytest.approx((10 * 0.8 + (total - 10) * 0.1) / total, rel=1e-4)
    assert c["flip_ratio"] == pytest.approx((10 * 0.2 + (total - 10) * 0.1) / 10, rel=1e-4)


def test_random_baseline_has_same_size_per_matrix_and_layer(tiny_mlm):
    model, _ = tiny_mlm
    masks = S.WeightMasks(model, 2)
    g = torch.Generator().manual_seed(0)
    removed = [(torch.rand(l.shape, generator=g) < f).float() for l, f in zip(masks.logits, np.linspace(0.01, 0.2, 12))]
    rand = S.random_removal_like(removed, g)
    for a, b in zip(removed, rand):
        assert a.sum() == b.sum() and a.shape == b.shape
    assert any(not torch.equal(a, b) for a, b in zip(removed, rand))
    assert S.sparsity_report(masks.names, removed)["per_layer"] == S.sparsity_report(masks.names, rand)["per_layer"]
    rep = S.sparsity_report(masks.names, removed)
    assert rep["kept_fraction"] == pytest.approx(1 - sum(m.sum().item() for m in removed) / rep["masked_weights"])


def test_expected_jaccard_matches_simulation():
    rng = np.random.default_rng(0)
    n, a, b, trials = 20, 5, 8, 20000
    sim = []
    for _ in range(trials):
        A, B = set(rng.choice(n, a, replace=False)), set(rng.choice(n, b, replace=False))
        sim.append(len(A & B) / len(A | B))
    assert SO.expected_jaccard(n, a, b) == pytest.approx(np.mean(sim), abs=0.004)
    # overall over two layers of different sizes
    sim = []
    for _ in range(trials):
        i = u = 0
        for nn, aa, bb in ((10, 3, 4), (30, 6, 2)):
            A, B = set(rng.choice(nn, aa, replace=False)), set(rng.choice(nn, bb, replace=False))
            i, u = i + len(A & B), u + len(A | B)
        sim.append(i / u)
    assert SO.expected_jaccard_overall([10, 30], [3, 6], [4, 2]) == pytest.approx(np.mean(sim), abs=0.004)
    assert SO.expected_jaccard(10, 10, 10) == pytest.approx(1.0)
    # p-value: n = 4, two sets of 2; P(|A & B| >= 2) = 1 / C(4, 2); P(>= 1) = 1 - P(0) = 1 - 1/6
    assert SO.p_at_least([4], [2], [2], 2) == pytest.approx(1 / 6)
    assert SO.p_at_least([4], [2], [2], 1) == pytest.approx(5 / 6)
    assert SO.p_at_least([4, 4], [2, 2], [2, 2], 4) == pytest.approx(1 / 36)  # both layers identical


def test_overlap_report_hand_case():
    subnet = {4: torch.tensor([0, 1]), 5: torch.tensor([2, 3])}
    paths = {4: torch.tensor([0, 1]), 5: torch.tensor([0, 1])}
    rep = SO.overlap_report(subnet, paths, inter_size=4)
    l4, l5 = rep["per_layer"]
    assert (l4["intersection"], l4["jaccard"], l4["expected_intersection"]) == (2, 1.0, 1.0)
    assert l4["p_value"] == pytest.approx(1 / 6) and l5["p_value"] == pytest.approx(1.0)
    assert rep["overall"]["jaccard"] == pytest.approx(2 / 6) and rep["overall"]["intersection"] == 2


def test_mean_tree_and_criteria():
    a = dict(x=1, s="r", l=[dict(v=1.0)], n=None)
    b = dict(x=3, s="r", l=[dict(v=2.0)], n=None)
    assert S.mean_tree([a, b]) == dict(x=2.0, s="r", l=[dict(v=1.5)], n=None)
    rel = lambda t, ck, cl: dict(target=dict(p_at_1=t, ppl=0.0, mean_rank=0.0),
                                 control_kg=dict(p_at_1=ck, ppl=0.05, mean_rank=0.0),
                                 control_lm=dict(p_at_1=cl, ppl=-0.05, mean_rank=0.0))
    m = dict(sparsity=dict(kept_fraction=0.98), relative_subnetwork=rel(-0.8, 0.05, -0.09),
             relative_random=rel(-0.1, 0.0, 0.0))
    c = S.criteria(m)
    assert c["all"] and c["target_p_at_1_drop"]
    m["relative_subnetwork"] = rel(-0.4, 0.2, 0.0)
    c = S.criteria(m)
    assert not c["target_p_at_1_drop"] and not c["control_kg_p_at_1"] and c["control_lm_p_at_1"] and not c["all"]
    assert SO.jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(0.5)


def test_subnetwork_neurons_rules(tiny_mlm):
    model, _ = tiny_mlm
    masks = S.WeightMasks(model, 1)
    removed = [torch.zeros_like(l) for l in masks.logits]
    win = masks.names.index("encoder.layer.1.intermediate.dense.weight")  # (I, H)
    wout = masks.names.index("encoder.layer.1.output.dense.weight")  # (H, I)
    removed[win][3, :10] = 1.0  # neuron 3: 10 of its 2H = 64 weights
    removed[wout][:2, 7] = 1.0  # neuron 7: 2 weights
    removed[wout - 1 if wout - 1 != win else 0][0, 9] = 1.0  # an attention weight: no FFN neuron
    got = SO.subnetwork_neurons(masks.names, removed, "any")
    assert got[1].tolist() == [3, 7]
    assert SO.subnetwork_neurons(masks.names, removed, "top", k=1)[1].tolist() == [3]
    assert SO.subnetwork_neurons(masks.names, removed, "top", k=5)[1].tolist() == [3, 7]  # only touched neurons
    assert SO.subnetwork_neurons(masks.names, removed, "frac", frac=0.1)[1].tolist() == [3]


def test_lama_reader_split_and_queries(tmp_path, tiny_mlm):
    model, tok = tiny_mlm
    d = tmp_path / "lama"
    (d / "labels" / "P1376").mkdir(parents=True)
    (d / "relations.jsonl").write_text(
        json.dumps({"relation": "P36", "template": "The capital of [X] is [Y] ."}) + "\n" +
        json.dumps({"relation": "P1376", "template": "[X] is the capital of [Y] ."}) + "\n")
    (d / "P36.jsonl").write_text("".join(json.dumps({"sub_label": s.title(), "obj_label": o.title()}) + "\n"
                                         for s, o in CAPITALS + [("united states", "new york")]))
    (d / "labels" / "P1376" / "test.jsonl").write_text(json.dumps({"sub": "Paris", "obj": "France"}) + "\n")
    facts = SD.read_facts(str(d))
    assert len(facts) == 8 and facts[0]["template"] == "The capital of [X] is [Y] ."
    assert SD.read_facts(str(d / "labels"))[0] == dict(relation="P1376", sub="Paris", obj="France",
                                                      template="[X] is the capital of [Y] .")
    single = SD.single_token_facts(facts, tok)
    assert "New York" not in [f["obj"] for f in single]  # two tokens in both tiny vocabularies
    batch = SD.fact_batch(tok, single)
    for i, f in enumerate(single):
        assert batch["input_ids"][batch["pos"][0][i], batch["pos"][1][i]] == tok.mask_token_id
        filled = tok(f["query"].replace(tok.mask_token, " " + f["obj"] if tok.mask_token == "<mask>" else f["obj"]))
        assert f["obj_id"] in filled["input_ids"]
    ranks = [1] * len(single)
    t1, c1 = SD.split_facts(single, ranks, seed=3, target_size=2, control_size=100)
    t2, c2 = SD.split_facts(single, ranks, seed=3, target_size=2, control_size=100)
    assert t1 == t2 and c1 == c2 and len(t1) == 2
    assert not {f["sub"] for f in t1} & {f["sub"] for f in c1}


def test_read_facts_names_a_malformed_line(tmp_path):
    d = tmp_path / "lama"
    d.mkdir()
    (d / "relations.jsonl").write_text(json.dumps({"relation": "P36", "template": "The capital of [X] is [Y] ."}) + "\n")
    (d / "P36.jsonl").write_text(json.dumps({"sub_label": "France", "obj_label": "Paris"}) + "\n[1, 2]\n")
    with pytest.raises(common.DataError, match=r"P36\.jsonl:2: expected one JSON object per line; found a JSON list"):
        SD.read_facts(str(d))


def test_recorded_paths_resume_the_committed_seeds():
    """A seed's config records its paths as common.portable_path writes them: the data root as
    '../shared/data', a path in the repository relative to it, names as given. So `--resume` on another
    machine matches the committed results/subnetworks/seed_*.json."""
    args = S.build_parser().parse_args(["--data-dir", os.path.join(REPO, "..", "shared", "data"), "--model", "minilm",
                                        "--facts-dir", os.path.join(REPO, "tests", "fixtures", "lama"),
                                        "--training-state", "no/such/state.pt"])
    rec = common.recorded_config(args, S.PATH_FLAGS)
    assert rec["data_dir"] == os.path.join("..", "shared", "data")
    assert rec["facts_dir"] == os.path.join("tests", "fixtures", "lama")
    assert rec["model"] == "minilm" and rec["training_state"] == "no/such/state.pt"  # as typed: nothing there
    assert rec["work_dir"] == os.path.join("runs", "subnetworks") and rec["output_dir"] == "results"
    committed = os.path.join(REPO, "results", "subnetworks", "seed_0.json")
    if os.path.exists(committed):
        assert json.load(open(committed))["config"]["data_dir"] == rec["data_dir"]


def test_split_targets_known_facts_and_controls_share_no_entity():
    F = lambda r, s, o: dict(relation=r, sub=s, obj=o, template="[X] [Y]")
    facts = [F("P36", "France", "Paris"), F("P36", "Italy", "Rome"), F("P1376", "Paris", "France"),  # inverse of 0
             F("P30", "France", "Europe"), F("P30", "Spain", "Europe"), F("P30", "Japan", "Asia"),
             F("P36", "Japan", "Tokyo"), F("P47", "Rome", "Milan"), F("P30", "Peru", "America")]
    ranks = [1, 4, 1, 2, 1, 1, 7, 1, 9]
    # known (rank 1): 0, 2, 4, 5, 7, in the entity components {0, 2} (France, Paris), {4}, {5}, {7}
    assert SD.entity_components([facts[i] for i in (0, 2, 4, 5, 7)]) == [[facts[0], facts[2]], [facts[4]], [facts[5]], [facts[7]]]
    target, control = SD.split_facts(facts, ranks, seed=0, target_size=1, known_k=1)
    ents = {target[0]["sub"], target[0]["obj"]}
    assert len(target) == 1 and control and all(f["sub"] not in ents and f["obj"] not in ents for f in control)
    assert all(f is not target[0] for f in control)
    for seed in range(6):  # room for all five: whole components, all but one, the one left over is a control
        target, control = SD.split_facts(facts, ranks, seed=seed, target_size=10, known_k=1)
        left = [i for i in (0, 2, 4, 5, 7) if facts[i] not in target]
        assert left in ([0, 2], [4], [5], [7]) and all(facts[i] in control for i in left)
        ents = {f["sub"] for f in target} | {f["obj"] for f in target}
        assert all(f["sub"] not in ents and f["obj"] not in ents for f in control)
    # known at k = 2: fact 3 (France, Europe) joins {0, 2} and {4} into {0, 2, 3, 4}; with room for four,
    # either it alone (then {5} does not fit) or {5} and {7} (then it does not)
    for seed in range(6):
        t3, _ = SD.split_facts(facts, ranks, seed=seed, target_size=4, known_k=2)
        assert sorted(facts.index(f) for f in t3) in ([0, 2, 3, 4], [5, 7])
        t2 = {facts.index(f) for f in SD.split_facts(facts, ranks, seed=seed, target_size=3, known_k=2)[0]}
        assert (len(t2) == 3 and t2 <= {0, 2, 3, 4}) or t2 == {5, 7}  # drawn first and sampled down, or not
    with pytest.raises(ValueError, match="ControlKG"):  # one component of known facts names every other entity
        SD.split_facts([F("P36", "France", "Paris"), F("P1376", "Paris", "France"), F("P30", "France", "Europe")],
                      [1, 1, 5], seed=0, target_size=10)
    with pytest.raises(ValueError, match="--known-k"):
        SD.split_facts(facts, [5] * len(facts), seed=0)


def test_split_inverse_fact_is_not_a_control():
    F = lambda r, s, o: dict(relation=r, sub=s, obj=o, template="[X] [Y]")
    facts = [F("P36", "France", "Paris"), F("P1376", "Paris", "France"), F("P36", "Italy", "Rome"),
             F("P30", "Japan", "Asia"), F("P30", "Spain", "Europe")]
    target, control = SD.split_facts(facts, [1, 9, 9, 9, 9], seed=0, target_size=1)
    assert target == [facts[0]] and sorted(facts.index(f) for f in control) == [2, 3, 4]


def test_split_by_relation(tmp_path):
    facts = [dict(relation=r, sub=f"s{r}{i}", obj=f"o{r}{i}", template="[X] [Y]") for r in ("P1", "P2") for i in range(5)]
    ranks = [1] * len(facts)
    target, control = SD.split_facts(facts, ranks, seed=0, target_relation="P1", target_size=3)
    assert len(target) == 3 and all(f["relation"] == "P1" for f in target)
    assert control and all(f["relation"] == "P2" for f in control)
    with pytest.raises(ValueError, match="--target-relation P9"):
        SD.split_facts(facts, ranks, seed=0, target_relation="P9")


def test_states_fact_whole_words_any_case():
    fact = dict(sub="France", obj="Paris")
    assert SD.states_fact("The capital of france is PARIS.", fact)
    assert SD.states_fact("Paris lies in France", fact)  # either order
    assert not SD.states_fact("Parisian food in France", fact)  # not the whole word
    assert not SD.states_fact("Paris is large.", fact)  # object alone
    texts = ["Paris, France.", "Rome is old.", "Berlin and Germany"]
    assert SD.drop_stating(texts, [fact, dict(sub="Germany", obj="Berlin")]) == ["Rome is old."]


def test_read_lm_texts_sources(tmp_path):
    wiki = tmp_path / "data" / "wikitext-2"
    wiki.mkdir(parents=True)
    (wiki / "valid.txt").write_text(" = Head = \n\n a valid line\n")
    (wiki / "test.txt").write_text(" a test line\n")
    tr, ev, src = SD.read_lm_texts(None, str(tmp_path / "data"), None)  # --data-dir with wikitext-2/
    assert tr == ["a valid line"] and ev == ["a test line"] and src.endswith("wikitext-2")
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\nthree\n")
    assert SD.read_lm_texts(str(f), str(tmp_path / "data"), None) == (["one", "three"], ["two"], str(f))  # --lm-text wins
    with pytest.raises(FileNotFoundError, match="--lm-text"):
        SD.read_lm_texts(str(tmp_path / "nope.txt"), None, None)


def test_lm_batch_masks_real_tokens(bert_tok):
    b = SD.lm_batch(bert_tok, [TEXT], seq_len=16, n_seqs=3, mask_prob=0.15, seed=0)
    assert b["input_ids"].shape == (3, 16)
    rows, cols = b["pos"]
    assert (b["input_ids"][rows, cols] == bert_tok.mask_token_id).all()
    assert set(rows.tolist()) == {0, 1, 2} and (cols > 0).all() and (cols < 15).all()
    assert not (b["labels"] == bert_tok.mask_token_id).any()
    ids = bert_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert b["labels"][0].item() == ids[cols[0].item() - 1]
    sub = SD.sub_batch(b, torch.tensor([1, 2]))
    assert torch.equal(sub["labels"], b["labels"][rows > 0]) and (sub["pos"][0] < 2).all()


def test_score_matches_direct_computation(tiny_mlm):
    model, tok = tiny_mlm
    b = SD.lm_batch(tok, [TEXT], seq_len=16, n_seqs=2, mask_prob=0.3, seed=1)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits[b["pos"]]
    want = torch.nn.functional.cross_entropy(logits, b["labels"])
    got = S.score(model, None, b, chunk=1)
    assert got["ppl"] == pytest.approx(math.exp(want.item()), rel=1e-4)
    assert got["p_at_1"] == pytest.approx((logits.argmax(1) == b["labels"]).float().mean().item())


def _finetune_capitals(tok, steps=80):
    model = make_model("bert", tok)
    batch = SD.fact_batch(tok, capital_facts(tok))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(S.position_logits(model, None, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _cfg(*flags):
    return S.build_parser().parse_args(list(flags))


@pytest.mark.slow
def test_suppresses_target_fact_keeps_controls(bert_tok):
    """A tiny BERT taught 7 capitals; the subnetwork for france -> paris removes that fact only."""
    model = _finetune_capitals(bert_tok)
    facts = capital_facts(bert_tok)
    target, control = SD.fact_batch(bert_tok, facts[:1]), SD.fact_batch(bert_tok, facts[1:])
    assert S.score(model, None, target)["p_at_1"] == 1.0 and S.score(model, None, control)["p_at_1"] == 1.0
    lm = SD.lm_batch(bert_tok, [TEXT], 16, 8, 0.15, 0)
    masks = S.WeightMasks(model, 2)
    cfg = _cfg("--steps", "200", "--batch-size", "8", "--lm-batch-size", "8", "--anneal", "0.3")
    curves = S.train_masks(model, masks, target, control, lm, cfg, seed=0, log=lambda s: None)
    assert curves["suppress"][-1] < curves["suppress"][0]
    params = S.remaining_params(model, masks.names, masks.hard())
    before_t = S.score(model, None, target)
    after_t, after_c = S.score(model, params, target), S.score(model, params, control)
    # the KL to uniform flattens p(. | france capital [MASK]): paris' perplexity rises tenfold (on a
    # 130-word vocabulary a flat distribution may still rank it first), the controls keep rank 1
    assert after_t["ppl"] > 10 * before_t["ppl"]
    assert after_c["p_at_1"] == 1.0
    assert 0.5 < S.sparsity_report(masks.names, masks.hard())["kept_fraction"] < 1.0
    assert all(not p.requires_grad for p in model.parameters())


def test_training_resume_is_exact(bert_tok):
    """N steps + save + resume in a fresh WeightMasks + N steps == 2N steps (logits, Adam, RNG, curves)."""
    model, tok = make_model("bert", bert_tok), bert_tok
    facts = capital_facts(tok)
    target, control = SD.fact_batch(tok, facts[:2]), SD.fact_batch(tok, facts[2:])
    lm = SD.lm_batch(tok, [TEXT], 16, 4, 0.15, 0)
    cfg = _cfg("--steps", "6", "--batch-size", "2", "--lm-batch-size", "2", "--log-every", "1", "--save-every", "3")
    full = S.WeightMasks(model, 2)
    S.train_masks(model, full, target, control, lm, cfg, seed=5, log=lambda s: None)
    saved = []
    part = S.WeightMasks(model, 2)
    S.train_masks(model, part, target, control, lm, cfg, seed=5, save=lambda s: saved.append(copy.deepcopy(s)),
                  log=lambda s: None)  # deepcopy: what went to disk (the state holds live tensors)
    assert [s["step"] for s in saved] == [3, 6]
    state = saved[0]
    resumed = S.WeightMasks(model, 2)
    curves = S.train_masks(model, resumed, target, control, lm, cfg, seed=5, state=state, log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(full.logits, resumed.logits))
    assert curves["step"] == list(range(6)) and curves["loss"] == saved[1]["curves"]["loss"]
    assert not torch.equal(full.logits[0], S.WeightMasks(model, 2).logits[0])  # training moved the logits


def _facts_dir(tmp_path):
    d = tmp_path / "facts"
    d.mkdir()
    (d / "relations.jsonl").write_text(
        json.dumps({"relation": "P36", "template": "The capital of [X] is [Y] ."}) + "\n" +
        json.dumps({"relation": "P30", "template": "[X] is located in [Y] ."}) + "\n")
    (d / "P36.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in CAPITALS))
    (d / "P30.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": c}) + "\n" for s, c in
                                         [("france", "europe"), ("japan", "asia"), ("china", "asia"), ("italy", "europe")]))
    return d


def test_main_end_to_end_seeds_resume(tmp_path, tiny_model_dir, capsys):
    d = _facts_dir(tmp_path)
    text = tmp_path / "text.txt"
    neutral = "a river and a city on the river , a language of a country , born in a city by a river ."
    text.write_text("\n".join([TEXT, TEXT, neutral, neutral] * 3))  # TEXT states every capital: its 6 lines are dropped
    state = tmp_path / "training_state.pt"  # pretrain.py's layout: routing's last paths, one LongTensor per layer
    torch.save({"paths": [torch.arange(6), torch.arange(10, 16)], "step": 7, "commit": "abc",
                "config": {"method": "trelm"}}, state)
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--model", tiny_model_dir, "--facts-dir", str(d), "--lm-text", str(text), "--target-relation", "P36",
            "--known-k", "100000", "--control-known-k", "100000", "--target-size", "3", "--steps", "3",
            "--lm-seqs", "2", "--lm-len", "16",
            "--random-seeds", "2", "--ig-steps", "2", "--output-dir", str(out), "--work-dir", str(work),
            "--training-state", str(state), "--seeds", "0", "1", "--log-every", "1"]
    S.main(argv)
    res = json.loads((out / "subnetworks.json").read_text())
    m = res["metrics"]
    assert res["task"] == "subnetworks" and res["config"]["top_layers"] == 1 and res["seed"] == [0, 1]
    assert set(m["full"]) == {"target", "control_kg", "control_lm"} and m["full"]["target"]["n"] == 3
    assert 0.0 <= m["sparsity"]["kept_fraction"] <= 1.0 and set(m["sparsity"]["per_layer"]) == {"1"}
    assert [p["seed"] for p in m["per_seed"]] == [0, 1]
    assert m["sparsity"]["kept_fraction"] == pytest.approx(np.mean([p["sparsity"]["kept_fraction"] for p in m["per_seed"]]))
    assert set(m["overlap"]) == {"trelm_paths", "ig_paths"}
    assert m["overlap"]["trelm_paths"]["per_layer"][0]["routing"] == 6  # layer 1 of the saved paths
    assert m["overlap"]["ig_paths"]["per_layer"][0]["routing"] == round(0.1 * 64)
    assert res["provenance"]["training_state"]["commit"] == "abc" and "--seeds 0 1" in res["provenance"]["command"]
    assert res["sizes"]["control_lm_lines_dropped"] == 6 and isinstance(m["criteria"]["all"], bool)
    assert (out / "subnetworks" / "seed_1.json").exists() and (work / "seed_1.pt").exists()
    # --resume reuses both seed files (no training: no step lines printed) and gives the same means
    capsys.readouterr()
    S.main(argv + ["--resume"])
    assert "step " not in capsys.readouterr().out
    assert json.loads((out / "subnetworks.json").read_text())["metrics"]["sparsity"] == m["sparsity"]
    with pytest.raises(SystemExit, match="--steps 3 -> 4"):
        S.main(argv + ["--resume", "--steps", "4"])


def test_training_state_is_paired_only_with_the_model_of_its_step(tmp_path):
    """final/ and checkpoint/ are saved at the run's last step, with checkpoint/training_state.pt; a
    step_NNNNNN/ snapshot is earlier, so the routing paths of checkpoint/ are not its own."""
    run = tmp_path / "run"
    for d in ("final", "step_000010", "checkpoint"):
        (run / d).mkdir(parents=True)
    assert SO.paired_training_state(str(run / "final")) is None  # no training_state.pt yet
    (run / "checkpoint" / "training_state.pt").write_bytes(b"")
    state = str(run / "checkpoint" / "training_state.pt")
    assert SO.paired_training_state(str(run / "final")) == state
    assert SO.paired_training_state(str(run / "final") + "/") == state
    assert SO.paired_training_state(str(run / "checkpoint")) == state
    assert SO.paired_training_state(str(run / "step_000010")) is None
    assert SO.paired_training_state(str(tmp_path / "elsewhere" / "model")) is None


def test_split_control_known_k_keeps_only_facts_the_model_nearly_knows():
    F = lambda r, s, o: dict(relation=r, sub=s, obj=o, template="[X] [Y]")
    facts = [F("P36", "France", "Paris"), F("P30", "Spain", "Europe"), F("P30", "Japan", "Asia"),
             F("P36", "Italy", "Rome"), F("P36", "Peru", "Lima")]
    ranks = [1, 3, 40, 10, 11]
    target, control = SD.split_facts(facts, ranks, seed=0, target_size=1, control_known_k=10)
    assert target == [facts[0]] and sorted(facts.index(f) for f in control) == [1, 3]  # ranks 3 and 10, not 40, 11
    _, anyrank = SD.split_facts(facts, ranks, seed=0, target_size=1)
    assert sorted(facts.index(f) for f in anyrank) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="--control-known-k 2"):
        SD.split_facts(facts, ranks, seed=0, target_size=1, control_known_k=2)


def test_control_halves_hold_out_every_other_known_fact():
    F = lambda s: dict(relation="P1", sub=s, obj="o" + s, template="[X] [Y]")
    known = [F("a"), F("b"), F("c"), F("d"), F("e")]
    anyrank = [F("x"), known[1], known[0], F("y"), known[3]]
    train, held = SD.control_halves(known)
    assert train == [known[0], known[2], known[4]] and held == [known[1], known[3]]
    train, held = SD.control_halves(known, anyrank)
    assert held == [known[1], known[3]] and train == [anyrank[0], known[0], anyrank[3]]
