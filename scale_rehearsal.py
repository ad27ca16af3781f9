"""The paper-scale path rehearsed on this machine's CPUs, and projected to English Wikipedia + Wikidata5M on
8 x A100 (TRELM Sec. 4.1, 4.4): what a GPU user's first day costs before the first step.

    python scale_rehearsal.py --work /tmp/rehearsal                # every stage, results/scale_rehearsal.json
    python scale_rehearsal.py --work /tmp/rehearsal --stages ddp    # one stage again (the others are kept)

Stages (each records its measurements in the JSON; a stage already recorded is skipped unless named):
  synth    a Wikidata5M-sized KG (synth_kg.py: ~4.8M entities, ~21M triples, the full release's shape) and
           a corpus of >= 20M tokens in WikiExtractor --json --links layout, with titles.tsv
  prepare  `python data.py prepare --num-proc 2 --shard-docs 4000` on them: tokens/s per core, bytes per
           token on disk, peak RSS of the process tree (the KG parse child, the linker, the workers)
  si       SI(e) (Eq. 1) with a BERT-base-shaped model (BertConfig() and the shipped MiniLM tokenizer's 30,522
           tokens, random weights) over one shard of the store: candidate mentions per second (one process)
  ddp      `torchrun --nproc_per_node=2 pretrain.py --data <a 2-shard store of the corpus's first documents>`,
           BERT-base shape, --seq-len 512, TRELM with the memory bank and per-batch routing, a few steps:
           time to first step, s/step, peak RSS per rank, memory-bank bytes per rank
The projection scales these per-unit figures to the paper's data (26M sequences, ~3.5B tokens, 3.09M
entities) on one node of 8 x A100-80G with 32 cores; every factor it assumes is written next to it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
WIKIPEDIA_TOKENS = 3.5e9  # English Wikipedia in RoBERTa/BERT tokens (3.3-3.9B: 26M sequences x ~135 tokens)
PAPER_SEQUENCES = 26_000_000
NODE_CORES, NODE_GPUS = 32, 8
A100_BF16_PEAK, ASSUMED_MFU = 312e12, 0.3  # SI on a GPU: its forward at 30% of the bf16 peak (an assumption)


def tree_rss(pid):
    """{pid: RSS bytes} of a process and its descendants, from /proc."""
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                continue
    rss, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                rss[p] = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
        except (OSError, StopIteration):
            continue
    return rss


def run_measured(cmd, log, env=None):
    """Run cmd (its output to `log`), polling the process tree's RSS every 0.5 s -> (seconds, peak summed
    RSS of the tree, {pid: its own peak RSS}), in bytes."""
    t0, peak, each = time.time(), [0], {}
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=HERE, env={**os.environ, **(env or {})})

        def poll():
            while p.poll() is None:
                now = tree_rss(p.pid)
                peak[0] = max(peak[0], sum(now.values()))
                for k, v in now.items():
                    each[k] = max(each.get(k, 0), v)
                time.sleep(0.5)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = p.wait()
        th.join()
    if rc != 0:
        raise SystemExit(f"scale_rehearsal.py: {' '.join(cmd[:4])} ... failed (exit {rc}); see {log}")
    return time.time() - t0, peak[0], each


def stage_synth(a, w):
    out = os.path.join(w, "synth")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "synth_kg.py", "--out", out, "--scale", str(a.scale), "--triples-per-entity",
                    "4.37", "--docs", str(a.docs), "--words", "120", "--layout", "wikiextractor"], cwd=HERE, check=True,
                   stdout=subprocess.DEVNULL)
    info = json.load(open(os.path.join(out, "synth.json")))
    size = lambda p: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(p) for f in fs)
    return dict(entities=info["entities"], aliases=info["aliases"], triples=info["triples"], docs=info["docs"],
                anchors=info["anchors_written"], mentions=info["mentions_written"], seconds=round(time.time() - t0),
                kg_bytes=size(os.path.join(out, "kg")), corpus_bytes=size(os.path.join(out, "extracted")))


def stage_prepare(a, w):
    synth, store = os.path.join(w, "synth"), os.path.join(w, "store")
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(os.path.join(w, "cache"), ignore_errors=True)
    cmd = [sys.executable, "data.py", "prepare", "--corpus", os.path.join(synth, "extracted"), "--kg",
           os.path.join(synth, "kg"), "--titles", os.path.join(synth, "titles.tsv"), "--model", "minilm", "--seq-len",
           "512", "--out", store, "--num-proc", "2", "--shard-docs", "4000", "--cache-dir", os.path.join(w, "cache")]
    seconds, peak, _ = run_measured(cmd, os.path.join(w, "prepare.log"))
    meta = json.load(open(os.path.join(store, "store.json")))
    t = meta["seconds"]  # the KG parse, the linker and the label tables are per KG, the shards per token
    return dict(seconds=round(seconds, 1), breakdown=t, num_proc=2, tokens=meta["tokens"], sequences=meta["sequences"],
                mentions=meta["mentions"], sources=meta["mention_sources_linked"], shards=len(meta["shards"]),
                tokens_per_s_per_core=round(meta["tokens"] / t["shards"] / 2), bytes_per_token=meta["bytes_per_token"],
                peak_tree_rss_gb=round(peak / 2**30, 2), command=" ".join(cmd[1:]))


def bert_base_dir(w):
    """BERT-base (BertConfig() defaults: 12 x 768, 3072 FFN) with random weights and the MiniLM tokenizer."""
    d = os.path.join(w, "bert-base-random")
    if not os.path.exists(os.path.join(d, "config.json")):
        import torch
        from transformers import BertConfig, BertForMaskedLM
        tok = common.load_tokenizer("minilm")
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=len(tok))).save_pretrained(d)
        tok.save_pretrained(d)
    return d


def stage_si(a, w):
    """One process scores the candidate mentions of the store's first shard (the unit a rank scores)."""
    import numpy as np
    import torch
    import data
    from entity_importance import KnowledgeInjector, long_tail_mask, score_shards
    from kg import load_kg
    torch.set_num_threads(2)
    store = data.Store(os.path.join(w, "store"))
    kg = load_kg(store.meta["kg_dir"], os.path.join(w, "cache", "kg"))
    mlm, tok = common.load_mlm(bert_base_dir(w))
    freq = data.mention_counts(store, kg.num_entities)
    cand = long_tail_mask(freq, 50.0, inclusive=True) & KnowledgeInjector(kg, tok).has_knowledge.numpy()
    ids = np.asarray(store.shards[0]["ent_id"], np.int64)
    out = os.path.join(w, "si")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.time()
    score_shards(store, mlm.eval(), tok.mask_token_id, 8, cand, out, [0], progress=False)
    dt = time.time() - t0
    n = int(cand[ids].sum())
    return dict(shard_mentions=len(ids), candidate_mentions=n, candidate_share=round(n / len(ids), 4),
                seconds=round(dt, 1), candidates_per_s=round(n / dt, 2), threads=2,
                mentions_per_token=round(store.meta["mentions"] / store.meta["tokens"], 5))


def stage_ddp(a, w):
    """torchrun with 2 ranks (1 thread each) from a store of the corpus's first 2,000 documents."""
    synth, small = os.path.join(w, "synth"), os.path.join(w, "store_small")
    first = os.path.join(w, "first_docs")
    shutil.rmtree(first, ignore_errors=True)
    os.makedirs(first)
    with open(os.path.join(first, "wiki_00"), "w") as f:  # the first 2,000 documents, same layout
        src = sorted(os.path.join(r, n) for r, _, fs in os.walk(os.path.join(synth, "extracted")) for n in fs)
        lines = [l for p in src[:3] for l in open(p)][:2000]
        f.writelines(lines)
    shutil.rmtree(small, ignore_errors=True)
    subprocess.run([sys.executable, "data.py", "prepare", "--corpus", first, "--kg", os.path.join(synth, "kg"),
                    "--titles", os.path.join(synth, "titles.tsv"), "--model", bert_base_dir(w), "--seq-len", "512",
                    "--out", small, "--shard-docs", "1000", "--cache-dir", os.path.join(w, "cache")],
                   cwd=HERE, check=True, stdout=subprocess.DEVNULL)
    run = os.path.join(w, "ddp_run")
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(os.path.join(w, "cache", "si"), ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "pretrain.py", "--model",
           bert_base_dir(w), "--data", small, "--seq-len", "512", "--batch-size", "1", "--max-steps", str(a.steps),
           "--route-every", "1", "--route-warmup", "1", "--ig-form", "first-order", "--log-every", "1",
           "--save-every", "0", "--output-dir", run, "--cache-dir", os.path.join(w, "cache")]
    seconds, peak, each = run_measured(cmd, os.path.join(w, "ddp.log"), env={"OMP_NUM_THREADS": "1"})
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    record = json.load(open(os.path.join(run, "config.json")))
    ranks = sorted(each.values())[-2:]  # the two ranks are the largest processes of the tree
    return dict(ranks=2, threads_per_rank=1, seq_len=512, batch_per_rank=1, steps=len(rows), seconds=round(seconds, 1),
                startup_s_per_rank=record["startup_s"], rank_wait_s=round(max(record["startup_s"]) -
                                                                           min(record["startup_s"]), 2),
                s_per_step=round((rows[-1]["elapsed"] - rows[0]["elapsed"]) / (len(rows) - 1), 2),
                peak_rss_per_rank_gb=[round(x / 2**30, 2) for x in ranks], peak_tree_rss_gb=round(peak / 2**30, 2),
                sequences=record["sequences"], mentions=record.get("mentions"),
                bank_bytes_per_rank=rows[-1].get("bank_bytes"), command=" ".join(cmd[3:]))


STAGES = {"synth": stage_synth, "prepare": stage_prepare, "si": stage_si, "ddp": stage_ddp}


def project(r):
    """Per-unit figures -> English Wikipedia + Wikidata5M on one 8 x A100 node (module docstring)."""
    p, si = r["prepare"], r["si"]
    prepare_h = (WIKIPEDIA_TOKENS / (p["tokens_per_s_per_core"] * NODE_CORES) + p["breakdown"]["kg"]
                 + p["breakdown"]["linker"] + p["breakdown"]["labels"]) / 3600  # per-KG parts at this machine's speed
    mentions = WIKIPEDIA_TOKENS * si["mentions_per_token"]
    candidates = mentions * si["candidate_share"]
    flops_per_candidate = 2 * 2 * 85e6 * 20  # 2 windows of ~20 tokens (+-8 around a span) through BERT-base's encoder
    gpu_s = candidates * flops_per_candidate / (A100_BF16_PEAK * ASSUMED_MFU)
    cpu_rate = si["candidates_per_s"]
    return dict(assumptions=dict(wikipedia_tokens=WIKIPEDIA_TOKENS, sequences=PAPER_SEQUENCES, node_cores=NODE_CORES,
                                 gpus=NODE_GPUS, si_gpu="A100 bf16 forward at 30% of 312 TFLOP/s",
                                 mentions_per_token="as in the rehearsal corpus (a mention every ~12 words)",
                                 candidate_share="as measured on the rehearsal corpus"),
                prepare_hours=round(prepare_h, 2), disk_gb=round(WIKIPEDIA_TOKENS * p["bytes_per_token"] / 1e9, 1),
                si_candidate_mentions=round(candidates), si_gpu_hours=round(gpu_s / 3600, 2),
                si_hours_on_the_node=round(gpu_s / 3600 / NODE_GPUS, 2),
                si_cpu_core_hours_at_measured_rate=round(candidates / cpu_rate / 3600 * si["threads"], 1),
                start_hours=round(prepare_h + gpu_s / 3600 / NODE_GPUS, 2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (tens of GB)")
    p.add_argument("--out", default="results/scale_rehearsal.json")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--scale", type=float, default=1.5563, help="synth_kg --scale: 1.5563 x 3.09M = 4.8M entities")
    p.add_argument("--docs", type=int, default=64000, help="synth corpus documents (120 words: ~20M MiniLM tokens)")
    p.add_argument("--steps", type=int, default=4, help="ddp stage: optimizer steps")
    a = p.parse_args(argv)
    res = json.load(open(a.out)) if os.path.exists(a.out) else {}
    for name in a.stages.split(","):
        if name not in STAGES:
            raise SystemExit(f"scale_rehearsal.py: --stages: unknown stage {name!r}; expected some of {list(STAGES)}")
        print(f"stage {name} ...", flush=True)
        res[name] = dict(STAGES[name](a, a.work), commit=common.git_commit(), cores=os.cpu_count(),
                         loadavg_1min=round(os.getloadavg()[0], 2))
        if all(k in res for k in ("prepare", "si")):
            res["projection"] = project(res)
        common.atomic_write_json(a.out, res)
        print(json.dumps(res[name]), flush=True)
    return res


if __name__ == "__main__":
    main()
