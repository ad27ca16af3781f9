"""Run by test_pretrain.py under torchrun: a few TRELM steps, then each rank dumps its memory bank,
knowledge paths and weights so the test can check that every rank holds the same state."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config
import pretrain  # noqa: E402

out = sys.argv[1]
args = config.from_argv(sys.argv[2:])
t = pretrain.Trainer(args)
while t.step < args.optim.max_steps:
    t.train_step()
torch.save({"bank": t.know.bank.state_dict(), "paths": t.paths, "weights": t.net.mlm.state_dict()},
           os.path.join(out, f"rank{t.rank}.pt"))
torch.distributed.destroy_process_group()
