"""Provenance that travels: no import cycle among the project's modules, paths in results recorded
relative to the repository (common.portable_path), no committed result holding an absolute path, and a
new .py file marking the commit '-dirty'."""
import ast
import glob
import json
import os
import subprocess

import common
import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.join(os.path.dirname(REPO), "shared", "data")


def import_graph():
    """{module: set of sibling modules it imports} over the repository's top-level *.py files, every
    import statement counted (top of the file or inside a function)."""
    files = sorted(glob.glob(os.path.join(REPO, "*.py")))
    mods = {os.path.basename(f)[:-3] for f in files}
    graph = {}
    for f in files:
        deps = set()
        for node in ast.walk(ast.parse(open(f).read(), f)):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[os.path.basename(f)[:-3]] = deps & mods
    return graph


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"b"}, "a": set(), "b": {"plots"}, "plots": {"b"}}) == ["b", "plots", "b"]


def test_no_import_cycle_among_the_project_modules():
    graph = import_graph()
    assert {"evaluate", "experiments", "lama", "plots", "paper_values"} <= set(graph)
    assert graph["plots"] & {"experiments", "evaluate"} == set()  # the figures read the paper's values alone
    assert "evaluate" not in graph["experiments"] | graph["subnetworks"] | graph["lama"]  # the CLI is a leaf
    # the study's registry imports nothing, and bench.py reads the study through it alone (not its runners)
    assert graph["study_variants"] == set()
    assert graph["bench"] & {"experiments", "study_runs", "study_stats", "study_report"} == set()
    assert graph["plots"] & {"study_runs", "study_stats", "study_report"} == set()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_portable_path_inside_repo_data_root_and_elsewhere(tmp_path, monkeypatch):
    inside = os.path.join(REPO, "tests", "fixtures", "tiny_data", "probes")
    assert common.portable_path(inside) == os.path.join("tests", "fixtures", "tiny_data", "probes")
    assert common.portable_path(REPO) == "."
    monkeypatch.chdir(os.path.join(REPO, "tests"))  # a relative path is taken from the working directory
    assert common.portable_path(os.path.join("fixtures", "lama")) == os.path.join("tests", "fixtures", "lama")
    # the data root next to the repository (it need not exist here: only where it lies counts)
    assert common.portable_path(os.path.join(DATA_ROOT, "lama", "TREx", "P36.jsonl")) == \
        os.path.join("..", "shared", "data", "lama", "TREx", "P36.jsonl")
    assert common.portable_path(DATA_ROOT + os.sep) == os.path.join("..", "shared", "data")
    # a sibling whose name only starts like the repository's is elsewhere
    assert common.portable_path(REPO + "_other/x") == REPO + "_other/x"
    elsewhere = tmp_path / "model"
    elsewhere.mkdir()
    assert common.portable_path(str(elsewhere)) == str(elsewhere)
    assert common.portable_path(str(tmp_path / "model" / ".." / "model")) == str(elsewhere)
    # names that are not paths are recorded as given
    for name in ("minilm", "bert-base-cased", "org/name", None):
        assert common.portable_path(name) == name
    # a recorded path reads back from the repository, wherever the working directory is
    assert os.path.samefile(os.path.join(REPO, common.portable_path(inside)), inside)


def test_probe_results_record_repository_relative_paths(tiny_model_dir, tmp_path):
    probes = os.path.join(REPO, "tests", "fixtures", "tiny_data", "probes")
    path = evaluate.main(["--task", "mini", "--model-dir", tiny_model_dir, "--probe-dir", probes,
                          "--data-dir", DATA_ROOT, "--output-dir", str(tmp_path / "res")])
    res = json.load(open(path))
    rel = os.path.join("tests", "fixtures", "tiny_data", "probes")
    assert res["config"]["probe_dir"] == rel
    assert res["config"]["data_dir"] == os.path.join("..", "shared", "data")
    assert res["config"]["model_dir"] == res["model_dir"] == tiny_model_dir  # elsewhere: absolute
    sources = {c["source"] for r, c in res["counts"].items() if r != "total"}
    assert sources and all(s.startswith(rel + os.sep) and s.endswith(".jsonl") for s in sources)


def test_git_commit_is_dirty_only_when_code_differs(git_repo):
    """A run records the code it executed: an edited result or test leaves HEAD clean; edited, staged or
    new (untracked, not ignored) code marks it '-dirty'; a new test, an ignored .py file or a new non-code
    file do not (`git diff` alone does not see new files)."""
    head = git_repo.commit({"a.py": "1\n", "requirements.txt": "1\n", "results/x.json": "1\n",
                            "tests/test_a.py": "1\n", ".gitignore": "/runs/\n"})
    git_repo.write({"results/x.json": "2\n", "tests/test_a.py": "2\n"})  # an earlier run rewrote a result
    git_repo.write({"tests/test_new.py": "1\n", "runs/x.py": "1\n", "notes.md": "1\n"})
    assert common.git_commit(git_repo.path) == head
    git_repo.write({"requirements.txt": "2\n"})
    assert common.git_commit(git_repo.path) == head + "-dirty"
    git_repo.git("checkout", "requirements.txt")
    git_repo.write({"a.py": "2\n"})
    git_repo.git("add", "a.py")  # staged counts too
    assert common.git_commit(git_repo.path) == head + "-dirty"
    git_repo.git("reset", "-q", "--hard")
    git_repo.write({"tests/test_new.py": "1\n", "a_new.py": "1\n", "pkg/b.py": "1\n"})
    assert common.git_commit(git_repo.path) == head + "-dirty"
    assert sorted(common.changed_code(head, git_repo.path)) == ["a_new.py", "pkg/b.py"]
    assert common.changed_code(head, git_repo.path, ignore=("tests/", "pkg/", "a_new.py")) == []


def test_committed_results_hold_no_absolute_path():
    """Every string in results/**/*.json that looks like a path is relative (to the repository)."""
    found = []

    def walk(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, str) and (os.path.isabs(x) or x.startswith("~")):
            found.append(f"{where}: {x}")

    files = sorted(glob.glob(os.path.join(REPO, "results", "**", "*.json"), recursive=True))
    assert files
    for f in files:
        walk(json.load(open(f)), os.path.relpath(f, REPO))
    assert not found, found[:10]
