"""Speed measurements (TRELM Sec. 4.4, 4.7), printed as one JSON object.

    python bench.py                          # MiniLM-L6-H384 shape, batch 16 x 128, CPU
    python bench.py --layers 4 --hidden 256 --batch 16 --seq 128 --repeats 5

Absolute times on a shared machine are noise; every figure that matters is a ratio of medians
measured in this one process, with the variants interleaved repeat by repeat.

  matmul_gflops          measured fp32 matmul peak (median of repeats)
  mlm_step_s             one plain MLM training step (forward, backward, AdamW), median
  mlm_tokens_per_s       batch * seq / mlm_step_s
  mfu_plain              model FLOP/s of that step / matmul_gflops, with model FLOPs per step =
                         6 * tokens * N_enc + 12 * L * T * H * tokens (attention scores and values)
                         + 6 * masked_tokens * (H * H + H * V) (the MLM head on masked positions)
  (the ratios below run pretrain.Trainer on the embedded default: real batches, mentions, SI)
  routed_step_over_full  routed TRELM step (route-ratio 0.1) / the same step with all parameters training
  ig_over_step           one attribution pass (m = --ig-steps) / one full training step
  ig_peak_rss_over_step  peak tensor memory of one attribution / of one training step (torch
                         profiler memory events above the live baseline; RSS never goes down, so
                         it cannot separate two phases of one process)
  bank_step_over_no_bank training step with memory bank read/mix/update / the same without (issue 4)
  (issue 11, measure_injection: pretrain.Trainer on the embedded default)
  mix_norm_over_embedding_norm  median over injected span positions of |I_p| (Eq. 7 input) / |E_p| (the
                         word embedding it replaces), after --inj-steps TRELM steps fill the memory;
                         mix_norm_over_embedding_norm_raw the same with --memory-scale raw
  si_length_corr         Pearson r of SI(e) (the corpus column) and span length over the scored mentions
  trelm_norouting_step_over_mlm  TRELM step without routing (SI from the corpus column) / plain MLM step
  trelm_step_over_mlm    amortised TRELM step (injection + SI + CKA + memory bank + routed update +
                         IG every --route-every steps) / plain MLM step, same model and batch
"""
import argparse
import json
import os
import statistics
import time

import torch

import common


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(fns, repeats, warmup=1):
    """Median seconds of each fn, timed round-robin so machine noise hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def matmul_gflops(n=1024, repeats=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), repeats, warmup=3)
    return 2 * n ** 3 / t / 1e9


def make_model(args):
    """A BERT masked LM of the benchmark shape (default: MiniLM-L6-H384's config), random init."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.hidden // 32), intermediate_size=4 * args.hidden,
                     max_position_embeddings=max(512, args.seq))
    return BertForMaskedLM(cfg)


def make_batch(args, mask_id=103):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
    attn = torch.ones_like(ids)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, mask_id), ids)
    return ids, attn, labels


def model_flops(model, args, masked):
    cfg = model.config
    enc = sum(p.numel() for n, p in model.bert.encoder.named_parameters() if p.ndim == 2)
    tokens = args.batch * args.seq
    return (6 * tokens * enc + 12 * cfg.num_hidden_layers * args.seq * cfg.hidden_size * tokens
            + 6 * masked * (cfg.hidden_size ** 2 + cfg.hidden_size * cfg.vocab_size))


def plain_step_fn(args):
    """A plain MLM step through pretrain.py's own model wrapper and optimizer."""
    import pretrain
    model = make_model(args)
    net = pretrain.KnowledgeMLM(model).train()
    opt_args = argparse.Namespace(lr=1e-4, weight_decay=0.01)
    opt = pretrain.make_optimizer(net.parameters(), opt_args)
    ids, attn, labels = make_batch(args)

    def step():
        out = net(ids, attn, labels)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step, int((labels != -100).sum())


def trainer(method_flags, args):
    """A pretrain.Trainer on the embedded default with the benchmark batch shape."""
    import pretrain
    argv = [*method_flags, "--model", args.model, "--data", args.data, "--batch-size", str(args.batch),
            "--seq-len", str(args.seq), "--output-dir", os.path.join(args.workdir, "_".join(method_flags)),
            "--route-every", str(args.route_every)]
    return pretrain.Trainer(pretrain.resolve_config(pretrain.get_parser().parse_args(argv)))


def trelm_ratios(args):
    """TRELM's step costs against plain MLM on the real pipeline (pretrain.Trainer, embedded data):
    every variant trains on the same batch (step index fixed), timed round-robin."""
    from routing import peak_memory
    ts = {"mlm": trainer(["--method", "mlm"], args),
          "trelm_full_no_bank": trainer(["--method", "trelm", "--no-routing", "--no-memory-bank"], args),
          "trelm_full": trainer(["--method", "trelm", "--no-routing"], args),
          "trelm_routed": trainer(["--method", "trelm"], args)}
    routed = ts["trelm_routed"]
    routed.net.eval()
    routed.reroute(routed.get_batch(0))

    def step_fn(t):
        def f():
            t.step = 1  # the same batch every time; step 1 never re-routes
            t.train_step()
        return f
    fns = {k: step_fn(t) for k, t in ts.items()}

    def ig():
        routed.step = 1
        routed.net.eval()
        routed.reroute(routed.get_batch(0))
    fns["ig"] = ig
    med = interleaved(fns, args.repeats)
    full = med["trelm_full"]
    out = {f"{k}_s": round(v, 4) for k, v in med.items()}
    out["routed_step_over_full"] = round(med["trelm_routed"] / full, 3)
    out["ig_over_step"] = round(med["ig"] / full, 2)
    out["bank_step_over_no_bank"] = round(full / med["trelm_full_no_bank"], 3)
    amortised = med["trelm_routed"] + med["ig"] / args.route_every
    out["trelm_step_over_mlm"] = round(amortised / med["mlm"], 3)
    out["trelm_full_step_over_mlm"] = round(full / med["mlm"], 3)
    step_peak = peak_memory(step_fn(ts["trelm_full"]))
    ig_peak = peak_memory(ig)
    out["ig_peak_bytes"], out["step_peak_bytes"] = ig_peak, step_peak
    out["ig_peak_rss_over_step"] = round(ig_peak / step_peak, 3)
    return out


def measure_routing(args):
    """Dynamic knowledge routing's costs and the IG form check (routing.py) on the embedded default:
      routed_step_over_full     routed TRELM step / the same step with every parameter training
      ig_over_step              one Eq. 11 attribution (--ig-form layer, the default) / one full step
      ig_joint_over_step        the same for the joint form (all layers scaled together)
      ig_topk_jaccard_vs_exact  per-layer Jaccard of the top --route-ratio neuron sets, joint vs
                                Eq. 11, mean over layers, on the same micro-batch
    Steps and both attributions are timed round-robin, args.repeats rounds (medians)."""
    import pretrain
    full = trainer(["--method", "trelm", "--no-routing"], args)
    routed = trainer(["--method", "trelm"], args)
    batch = routed.get_batch(0)
    paths = {}

    def step_fn(t):
        def f():
            t.step = 1  # the same batch every time; step 1 never re-routes
            t.train_step()
        return f

    def ig_fn(form):
        def f():
            routed.args.ig_form = form
            routed.step = 1
            routed.net.eval()
            routed.reroute(batch)
            paths[form] = routed.paths
        return f
    for f in (ig_fn("layer"), step_fn(routed), step_fn(full)):  # warm-up (and the first routing)
        f()
    med = interleaved({"full": step_fn(full), "routed": step_fn(routed), "ig_layer": ig_fn("layer"),
                       "ig_joint": ig_fn("joint")}, args.repeats, warmup=0)
    return {"routing_full_step_s": round(med["full"], 4), "routing_routed_step_s": round(med["routed"], 4),
            "ig_layer_s": round(med["ig_layer"], 3), "ig_joint_s": round(med["ig_joint"], 3),
            "routed_step_over_full": round(med["routed"] / med["full"], 3),
            "ig_over_step": round(med["ig_layer"] / med["full"], 2),
            "ig_joint_over_step": round(med["ig_joint"] / med["full"], 2),
            "ig_topk_jaccard_vs_exact": round(pretrain.path_jaccard(paths["joint"], paths["layer"]), 3),
            "ig_batch": routed.args.ig_batch, "ig_steps": routed.args.ig_steps}


def measure_injection(args):
    """Issue 11's three measurements (see the module docstring) -> dict."""
    import numpy as np
    from memory_bank import span_input
    mlm, trelm = trainer(["--method", "mlm"], args), trainer(["--method", "trelm", "--no-routing"], args)
    starts = np.fromiter((v for r in trelm.ds["ent_start"] for v in r), dtype=np.float64)
    ends = np.fromiter((v for r in trelm.ds["ent_end"] for v in r), dtype=np.float64)
    si = np.fromiter((v for r in trelm.ds["ent_si"] for v in r), dtype=np.float64)
    scored = ~np.isnan(si)  # SI is computed for the candidate mentions (long-tail, with a triple)
    out = {"si_length_corr": round(float(np.corrcoef(si[scored], (ends - starts)[scored])[0, 1]), 3),
           "si_mentions": int(scored.sum())}
    for _ in range(args.inj_steps):  # fill the memory with last-layer outputs
        trelm.train_step()
    W = trelm.net.mlm.get_input_embeddings().weight.detach()
    ratios = {True: [], False: []}
    for step in range(trelm.step, trelm.step + 4):
        trelm.step = step
        b = trelm.get_batch(0)
        p = b["plan"]
        if p is None:
            continue
        with torch.no_grad():
            h_e = trelm.injector.embed(W, p.ent_id)
            for match in (True, False):
                x = span_input(W[b["input_ids"]], p.rows, p.cols, p.mention, h_e, p.mem, p.lam, match)
                ratios[match] += (x[p.rows, p.cols].norm(dim=1) / W[b["orig_ids"][p.rows, p.cols]].norm(dim=1)).tolist()
    out["mix_norm_over_embedding_norm"] = round(statistics.median(ratios[True]), 3)
    out["mix_norm_over_embedding_norm_raw"] = round(statistics.median(ratios[False]), 3)
    out["inj_lambda"] = p.lam if p is not None else None

    def step_fn(t, at):
        def f():
            t.step = at  # the same batch every time
            t.train_step()
        return f
    med = interleaved({"mlm": step_fn(mlm, 1), "trelm": step_fn(trelm, trelm.step)}, args.repeats)
    out["trelm_norouting_step_s"], out["mlm_trainer_step_s"] = round(med["trelm"], 4), round(med["mlm"], 4)
    out["trelm_norouting_step_over_mlm"] = round(med["trelm"] / med["mlm"], 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default=None, help="comma list of measurement groups: plain,trelm,routing,injection")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="trelm group: the model (default MiniLM-L6-H384)")
    p.add_argument("--data", default="mini", help="trelm group: pre-training data")
    p.add_argument("--route-every", type=int, default=100, help="IG amortised over this many steps")
    p.add_argument("--workdir", default="runs/bench")
    p.add_argument("--inj-steps", type=int, default=10, help="injection group: TRELM steps before measuring Eq. 7")
    args = p.parse_args(argv)
    groups = set((args.only or "plain,trelm,routing,injection").split(","))
    res = {"shape": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "batch", "seq")},
           "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": common.git_commit()}
    peak = matmul_gflops()
    res["matmul_gflops"] = round(peak, 1)
    if "plain" in groups:
        model, step, masked = plain_step_fn(args)
        t = median_time(step, args.repeats)
        res["mlm_step_s"] = round(t, 4)
        res["mlm_tokens_per_s"] = round(args.batch * args.seq / t, 1)
        res["mfu_plain"] = round(model_flops(model, args, masked) / t / 1e9 / peak, 3)
    if "trelm" in groups:
        res.update(trelm_ratios(args))
    if "routing" in groups:
        res.update(measure_routing(args))
    if "injection" in groups:
        res.update(measure_injection(args))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
