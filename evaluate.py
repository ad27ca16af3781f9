"""Evaluation CLI (TRELM Sec. 4.2-4.8): parses --task and runs it in the file that implements it.

    python evaluate.py --task lama      --model-dir D [--data-dir DIR] [--output-dir results]
    python evaluate.py --task lama-uhn  --model-dir D [--uhn-filter-model bert-base-cased|self|M]
    python evaluate.py --task mini      --model-dir D      # probes of the embedded default data
    python evaluate.py --task tacred|fewrel|open-entity|glue --model-dir D
    python evaluate.py --task reproduce                     # the small-scale study, end to end

Tasks by file (each exposes add_args(parser), check(args) and TASKS = {task: fn(args) -> results path}):
  lama.py         lama, google-re, trex, lama-uhn, mini   LAMA / LAMA-UHN probing (Sec. 4.2, Tables 1-2)
  finetune.py     tacred, fewrel, open-entity, glue      fine-tuning (Sec. 4.3-4.5, Tables 3-5)
  experiments.py  base, pilot, f1-floor, ablation, injection, hparams, efficiency, frontier, same-code,
                  reproduce, report                       the study of the paper's claims (Table 6, Figs. 3-8)
This file owns the flags every task shares (--task, --model-dir, --data-dir, --output-dir, --seed,
--batch-size); `python evaluate.py --task T --help` lists T's own flags too. Every flag is checked
(check, and the task module's check(args)) before any data is read or any model trained: a bad one ends
the run in one line naming it and its range. A task then holds <output-dir>/.<task>.lock (study tasks:
one per task and --seeds, experiments.lock_names) until it ends, taken before anything is written
there: a second run of the same task into the same --output-dir is refused in one line, and an
unwritable --output-dir is refused before the task trains. A malformed data file ends the run with one
line naming the file, the line or record, and what was expected (ONE_LINE_ERRORS).
"""
import argparse
import contextlib

import common
import experiments
import finetune
import lama

MODULES = (lama, finetune, experiments)
TASK_MODULE = {task: mod for mod in MODULES for task in mod.TASKS}  # task -> the module that runs it
# errors whose message says it all (one line, as pretrain.main prints them): a data file's format (the
# message names the file and what was expected) and pre-training's non-finite loss (names the step)
ONE_LINE_ERRORS = (common.DataError, FloatingPointError)


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help unless the help already states its default or there is
    none to state (None, False)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def build_parser(task=None):
    """The shared flags, plus the flags of `task`'s module when a task is given."""
    p = argparse.ArgumentParser(description="TRELM evaluation: LAMA probing, downstream tasks and the study.",
                                formatter_class=HelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASK_MODULE))
    p.add_argument("--model-dir", default=common.DEFAULT_MODEL,
                   help="masked-LM directory (AutoModelForMaskedLM) or 'minilm' (the embedded default)")
    p.add_argument("--data-dir", default=lama.default_data_dir(),
                   help="benchmark data root (holds lama/, fewrel/, ...); default ../shared/data if present")
    p.add_argument("--output-dir", default="results", help="one <task>.json per task is written here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"examples per forward pass (default: the task's own; probing {lama.PROBE_BATCH_SIZE})")
    if task is not None:
        TASK_MODULE[task].add_args(p)
    return p


def check(args):
    """The shared flags' ranges (the task module checks its own): one line naming the flag."""
    if not 0 <= args.seed < 2 ** 32:
        raise SystemExit(f"--seed: expected an integer in [0, 2**32) (numpy's seed range), got {args.seed}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"--batch-size: expected a positive integer (or leave it out: the task's own), "
                         f"got {args.batch_size}")


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=list(TASK_MODULE))
    task = pre.parse_known_args(argv)[0].task
    args = build_parser(task).parse_args(argv)
    module = TASK_MODULE[args.task]
    check(args)
    module.check(args)
    names = experiments.lock_names(args) if module is experiments else [args.task]
    with contextlib.ExitStack() as locks:
        for name in names:
            label = f"evaluate.py --task {args.task}: --output-dir"
            locks.enter_context(common.output_lock(args.output_dir, name, label))
        common.seed_everything(args.seed)
        try:
            return module.TASKS[args.task](args)
        except ONE_LINE_ERRORS as e:
            raise SystemExit(f"evaluate.py --task {args.task}: {e}") from e


if __name__ == "__main__":
    main()
