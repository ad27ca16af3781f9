"""Run by test_prepare.py (alone or under torchrun): build a Trainer from a prepared store, take two steps,
and dump this rank's SI values and the shards it scored to OUT/rank<r>.npz. With SLOW_RANK / SLOW_SECONDS
set, that rank sleeps before scoring its share (a rank made slow on purpose)."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import entity_importance  # noqa: E402
import pretrain  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
scored = []
score_shards = entity_importance.score_shards


def slow_score_shards(*args, **kwargs):
    if os.environ.get("SLOW_RANK") == os.environ.get("RANK", "0"):
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    scored.extend(args[6])  # the shards this rank scores
    return score_shards(*args, **kwargs)


entity_importance.score_shards = slow_score_shards
cfg = config.from_argv(argv)
t = pretrain.Trainer(cfg)
while t.step < cfg.optim.max_steps:
    t.train_step()
os.makedirs(out, exist_ok=True)
np.savez(os.path.join(out, f"rank{t.rank}.npz"), si=t.know.si.values, mine=np.asarray(scored, np.int64))
if t.ddp:
    import torch.distributed as dist
    dist.destroy_process_group()
