"""bench.py's harness: the reliability verdict and the invariants on hand-made timing lists, the
interleaved timer, the profiler table's nesting, and a tiny-shape run of bench.main."""
import os
import time

import pytest
import torch

import bench
import bench_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "tiny_data")


def test_quiet_spread_is_reliable_and_reports_median_and_min_max():
    values, spread, warnings = bench.summarise(
        {"trelm_step_over_mlm": [0.80, 0.82, 0.81], "mlm_step_s": [1.0, 1.02, 0.99],
         "matmul_gflops": [250.0, 260.0, 255.0]}, max_spread=0.10)
    assert warnings == []
    assert values["trelm_step_over_mlm"] == pytest.approx(0.81)  # median
    assert values["matmul_gflops"] == 260.0  # the peak: best repeat, not the median
    assert spread["trelm_step_over_mlm"] == [0.80, 0.82]


def test_loaded_spread_gives_reliable_false_with_a_warning_naming_the_key():
    out = bench.report({"routed_step_over_full": [0.51, 0.75, 0.77], "mlm_step_s": [1.0, 1.1, 1.0]}, max_spread=0.10)
    assert out["reliable"] is False
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("routed_step_over_full")
    assert "loaded" in out["warnings"][0]
    assert out["routed_step_over_full"] == 0.75 and out["spread"]["routed_step_over_full"] == [0.51, 0.77]


def test_loaded_matmul_peak_alone_marks_the_run_unreliable():
    out = bench.report({"matmul_gflops": [260.0, 120.0, 130.0]}, max_spread=0.10)  # (260-130)/260 = 50%
    assert out["reliable"] is False and out["matmul_gflops"] == 260.0
    hiccup = bench.report({"matmul_gflops": [260.0, 120.0, 255.0]}, max_spread=0.10)  # one slow probe
    assert hiccup["reliable"] is True and hiccup["spread"]["matmul_gflops"] == [120.0, 260.0]


def test_absolute_times_may_drift_without_a_verdict():
    out = bench.report({"ig_s": [4.0, 6.0, 5.0], "mlm_tokens_per_s": [1000.0, 1500.0, 1200.0],
                        "step_peak_bytes": [10]}, max_spread=0.10)
    assert out["reliable"] is True and out["step_peak_bytes"] == 10


def test_mfu_above_one_in_any_repeat_is_null_and_unreliable():
    out = bench.report({"mfu_plain": [0.60, 0.62, 1.02]}, max_spread=0.9)  # median fine, one repeat impossible
    assert out["mfu_plain"] is None and "mfu_plain" not in out["spread"]
    assert out["reliable"] is False and "bound" in out["warnings"][0]
    ok = bench.report({"mfu_plain": [0.60, 0.62, 0.61]}, max_spread=0.10)
    assert ok["mfu_plain"] == 0.61 and ok["reliable"] is True


def test_more_work_measured_faster_breaks_an_invariant_beyond_the_tie():
    bad = bench.report({"bank_step_over_no_bank": [0.70, 0.72, 0.71]}, max_spread=0.10)  # the bank made it faster
    assert bad["bank_step_over_no_bank"] is None and bad["reliable"] is False
    tie = bench.report({"bank_step_over_no_bank": [0.99, 0.99, 0.995]}, max_spread=0.10)  # within TIE = 5%
    assert tie["bank_step_over_no_bank"] == 0.99 and tie["reliable"] is True
    routed = bench.report({"routed_step_over_full": [1.10, 1.11, 1.12]}, max_spread=0.10)
    assert routed["routed_step_over_full"] is None and routed["reliable"] is False


def test_interleaved_returns_one_value_per_repeat_and_a_peak_per_round(monkeypatch):
    clock = [0.0]

    def now():  # a fake clock: each read advances 1 us, fn "a" takes 2 ms and "b" 6 ms, whatever the load
        clock[0] += 1e-6
        return clock[0]
    monkeypatch.setattr(bench.time, "perf_counter", now)
    calls = []

    def work(name, dt):
        calls.append(name)
        clock[0] += dt
    out = bench.interleaved({"a": lambda: work("a", 0.002), "b": lambda: work("b", 0.006)},
                            repeats=4, peak_shapes=[(64, 64, 64)], warmup=1)
    assert set(out) == {"a", "b", "matmul_gflops"} and all(len(v) == 4 for v in out.values())
    assert calls.count("a") == 5 and calls.count("b") == 5  # 1 warm-up + 4 timed
    assert out["a"] == pytest.approx([0.002 + 1e-6] * 4) and out["b"] == pytest.approx([0.006 + 1e-6] * 4)
    assert min(out["matmul_gflops"]) > 0


def test_matmul_probe_measures_gflops_of_the_given_shape():
    t0 = time.perf_counter()
    g = bench.matmul_probe([(256, 256, 256)], tries=1)()
    dt = time.perf_counter() - t0
    assert g >= 2 * 256 ** 3 / dt / 1e9 * 0.999  # one timed mm is faster than the whole call


def test_profile_tree_nests_labels_and_counts_torch_ops():
    from torch.profiler import ProfilerActivity, profile, record_function
    x = torch.randn(64, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step"):
            with record_function("fwd"):
                y = (x @ x).sum()
            y.backward()
    tree = bench_profile.profile_tree(prof.events(), {"step", "fwd"})
    step, fwd, bwd = tree[("step",)], tree[("step", "fwd")], tree[("step", bench_profile.BACKWARD)]
    assert fwd[0] + bwd[0] <= step[0] and fwd[0] > 0 and bwd[0] > 0
    assert 0 < fwd[1] <= fwd[0] and step[1] >= fwd[1]  # torch-op time inside its row and counted upward
    nodes = [p[-1] for p in tree if p[:2] == ("step", bench_profile.BACKWARD) and len(p) == 3]
    assert "MmBackward0" in nodes
    assert sum(tree[("step", bench_profile.BACKWARD, n)][0] for n in nodes) == pytest.approx(bwd[0])


def test_labelled_wraps_and_restores_and_refuses_a_missing_name():
    import common
    orig = common.mlm_logits
    with bench_profile.labelled([("head", "common:mlm_logits")]):
        assert common.mlm_logits is not orig and common.mlm_logits.__wrapped__ is orig
    assert common.mlm_logits is orig
    with pytest.raises(SystemExit, match=r"no longer exist.*gone \(common:no_such_function\)"):
        with bench_profile.labelled([("head", "common:mlm_logits"), ("gone", "common:no_such_function")]):
            pass
    assert common.mlm_logits is orig  # nothing was wrapped


def test_profile_spans_all_exist():
    """Every function bench.py profiles by name exists (a rename must update PROFILE_SPANS)."""
    assert [t for _, t in bench_profile.PROFILE_SPANS if bench_profile._resolve(t) is None] == []


def tiny_argv(tiny_model_dir, tmp_path, *extra):
    return ["--model", tiny_model_dir, "--data", FIX, "--layers", "2", "--hidden", "32", "--vocab", "120",
            "--batch", "4", "--seq", "32", "--repeats", "2", "--workdir", str(tmp_path / "bench"),
            "--route-every", "50", *extra]


def test_main_tiny_shape_prints_every_key_with_spread_and_verdict(tiny_model_dir, tmp_path):
    res = bench.main(tiny_argv(tiny_model_dir, tmp_path))
    for k in ("matmul_gflops", "mlm_step_s", "mlm_tokens_per_s", "mfu_plain", "routed_step_over_full", "ig_over_step",
              "bank_step_over_no_bank", "trelm_step_over_mlm", "trelm_full_step_over_mlm", "ig_peak_rss_over_step",
              "mlm_s", "trelm_routed_s", "ig_s", "ig_peak_bytes", "step_peak_bytes", "routed_ffn_step_over_full",
              "routed_blocks_step_over_full", "trelm_step_over_mlm_every1", "attr_first_order_over_step",
              "attr_joint_over_step", "attr_target_over_step", "attr_joint_topk_jaccard_vs_exact",
              "attr_target_topk_jaccard_vs_exact", "attr_first_order_topk_jaccard_vs_exact"):
        assert k in res
    assert isinstance(res["reliable"], bool) and isinstance(res["warnings"], list)
    assert set(res["spread"]) >= {"trelm_step_over_mlm", "mlm_step_s", "matmul_gflops"}
    lo, hi = res["spread"]["trelm_step_over_mlm"]
    assert lo <= res["trelm_step_over_mlm"] <= hi
    assert res["mfu_plain"] is None or 0 < res["mfu_plain"] <= 1
    assert res["reliable"] == (res["warnings"] == [])


def test_profile_step_tiny_rows_add_up(tiny_model_dir, tmp_path):
    args = bench.get_parser().parse_args(tiny_argv(tiny_model_dir, tmp_path))
    args.pretrain_flags = []
    prof = bench.profile_step(args, steps=1)
    rows = {label: (depth, ms, pct) for depth, label, ms, pct, _ in prof["rows"]}
    assert rows[bench_profile.STEP][0] == 0
    for label in ("get_batch", "forward", bench_profile.BACKWARD, "CKA loss (Eq. 2)",
                  "bank observe (Eq. 4-6)", "knowledge plan", "_SliceLinear", "_SliceLinearBackward"):
        assert label in rows, label
    slice_ops = [label for depth, label, ms, pct, _ in prof["rows"] if label.startswith("aten::")]
    assert slice_ops  # the custom Function's forward / backward split by aten op
    assert [label for _, label, *_ in prof["rows"]].count("_SliceLinearBackward") == 1  # not nested in itself
    top = [pct for depth, label, ms, pct, _ in prof["rows"] if depth == 0]
    assert sum(top) == pytest.approx(100.0)  # routed step + amortised re-routing = the amortised step
    kids = [pct for depth, label, ms, pct, _ in prof["rows"] if depth == 1]
    assert sum(kids) == pytest.approx(rows[bench_profile.STEP][2])  # the step's parts (with its rest) add up to it
    text = bench_profile.format_profile("tiny", args, prof)
    assert "| part | ms / step |" in text and "CKA loss (Eq. 2)" in text


def test_bad_flags_name_the_flag(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--only"):
        bench.main(tiny_argv(tiny_model_dir, tmp_path, "--only", "plain,nosuch"))
    with pytest.raises(SystemExit, match="--max-spread"):
        bench.main(tiny_argv(tiny_model_dir, tmp_path, "--max-spread", "1.5"))


def test_costs_of_study_variants_tiny(tiny_model_dir, tmp_path):
    """bench.py --costs: one cost per variant, MLM's exactly 1, a per-batch variant really routes every step
    (its own --route-every wins over the bench's), routed variants train a smaller share, and FLOPs
    counted per step fall under routing."""
    args = bench.get_parser().parse_args(tiny_argv(tiny_model_dir, tmp_path))
    args.pretrain_flags = []
    assert bench.trainer(["--method", "trelm", "--route-every", "1"], args).cfg.routing.route_every == 1
    variants = [("mlm", ["--method", "mlm"]), ("full", ["--method", "trelm", "--no-routing"]),
                ("strict", ["--method", "trelm", "--route-scope", "strict"]),
                ("e1", ["--method", "trelm", "--route-scope", "ffn", "--route-every", "1", "--ig-form", "first-order"])]
    out = bench.measure_costs(args, variants)["costs"]
    assert out["mlm"]["cost_over_mlm"] == 1.0 and out["mlm"]["flops_over_mlm"] == 1.0
    assert out["full"]["trainable_share"] == 1.0 and 0 < out["strict"]["trainable_share"] < 0.2
    assert out["strict"]["flops_over_mlm"] < out["full"]["flops_over_mlm"]
    assert out["e1"]["route_every"] == 1 and out["strict"]["route_every"] == 50


def test_costs_file_keeps_measured_variants_and_adds_the_missing(tmp_path, monkeypatch):
    """bench.py --costs PATH on an existing file measures only the variants it lacks (against MLM again)
    and leaves every recorded cost as it was; with nothing missing it measures nothing."""
    import json

    import study_variants
    names = [n for n, _ in study_variants.COSTED]
    path = tmp_path / "costs.json"
    old = {n: {"cost_over_mlm": 0.5 + i} for i, n in enumerate(names[:-1])}  # the last one is missing
    path.write_text(json.dumps({"costs": old, "seconds": {}}))
    asked = []

    def fake(study, variants):
        asked.append([n for n, _ in variants])
        return {"costs": {n: {"cost_over_mlm": 9.0} for n, _ in variants}, "seconds": {"mlm_step_s": 1.0}}

    monkeypatch.setattr(bench, "measure_costs", fake)
    args = bench.get_parser().parse_args(["--costs", str(path)])
    bench.write_costs(args)
    got = json.loads(path.read_text())["costs"]
    assert asked == [["mlm", names[-1]]]
    assert {n: got[n]["cost_over_mlm"] for n in names[:-1]} == {n: c["cost_over_mlm"] for n, c in old.items()}
    assert got[names[-1]]["cost_over_mlm"] == 9.0 and "commit" in got[names[-1]]["measured"]
    bench.write_costs(args)
    assert len(asked) == 1
    scale2 = tmp_path / "scale2.json"  # a second scale's data: its five variants only
    bench.write_costs(bench.get_parser().parse_args(["--costs", str(scale2), "--data", str(tmp_path)]))
    assert asked[-1] == [n for n, _ in study_variants.VARIANTS["scale"]]


def test_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(2_000_000)  # 8 MB
        b = torch.ones(4_000_000)  # 16 MB, while a is alive
        del a, b
        c = torch.ones(1_000_000)  # 4 MB, after both are freed
        del c
    peak = bench_profile.peak_memory(fn)
    assert 24_000_000 <= peak < 24_100_000
