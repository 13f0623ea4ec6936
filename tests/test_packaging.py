"""What a user gets from `pip install`: a light CLI start, a version, the API reference in step with
the code, the pass functions by their names, a zoo listed without torch, and the trust model.
(The wheel itself is installed and run by scripts/check_wheel.sh, `make wheel-check`.)
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bngraph
import bngraph.passes
from bngraph.cli import main
from bngraph.errors import UserError
from bngraph.zoo import CATALOG, create_model, get_entry, list_models

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "matplotlib")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--help"], ["zoo"], ["zoo", "--json"], ["insert", "--help"], ["train", "--help"]])
def test_help_and_zoo_start_without_torch_or_onnx(argv):
    code = (
        "import sys\nfrom bngraph.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
    if argv[-1] == "--json":
        rows = {row["name"]: row for row in json.loads(done.stdout)["models"]}
        assert rows["mnist-mlp"]["parameters"] == 99_710


@pytest.mark.parametrize("argv", [["--version"], ["reproduce", "mnist", "--help"], ["insert", "zoo:mnist-mlp", "--dry-run"]])
def test_the_cli_runs_under_python_OO_which_strips_docstrings(argv, tmp_path):
    # Every command was an AttributeError traceback: the parser read each command's __doc__.
    done = subprocess.run([sys.executable, "-OO", "-m", "bngraph", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_each_command_is_summed_up_in_whole_sentences(capsys):
    # `bngraph --help` lists each verb by its docstring's first paragraph; a summary cut at the
    # first line ended "an exact --resume. The model".
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out.split("COMMAND", 2)[2].split("options:")[0]
    summaries = [" ".join(s.split()) for s in re.split(r"\n {4}(?=\S)", listing) if s.strip()]
    assert len(summaries) == 9, summaries
    assert all(s.endswith((".", "]")) for s in summaries), summaries


def test_the_deployment_side_does_not_load_the_training_package():
    # bngraph/training's contract: insert, fold, export and verify run without it (verify --data
    # imports it when asked to read data as train does).
    code = ("import sys\nimport bngraph.insert, bngraph.fold, bngraph.export, bngraph.verify, bngraph.onnx_fold\n"
            "print(sorted(m for m in sys.modules if m.startswith('bngraph.training')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    # The README sends users here to see which torch build they have.
    assert capsys.readouterr().out.strip() == f"bngraph {bngraph.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("name", list_models())
def test_the_zoo_catalog_matches_the_models_it_lists(name):
    listed, entry = CATALOG[name], get_entry(name)
    assert listed.input_shape == entry.input_shape and listed.description == entry.description
    assert listed.parameters == sum(p.numel() for p in create_model(name).parameters())


def test_every_pass_module_exports_its_pass_function_by_name():
    for path in sorted((REPO / "passes").glob("*.py")):
        module = importlib.import_module(f"bngraph.passes.{path.stem}")
        own = getattr(module, path.stem, None)
        if inspect.isfunction(own):
            assert path.stem in bngraph.passes.__all__, path.stem
            assert getattr(bngraph.passes, path.stem) is own  # the function, though the module is imported
    from bngraph.passes.insert_bn_before_activation import insert_bn_before_activation

    assert bngraph.passes.insert_bn_before_activation is insert_bn_before_activation
    assert all(callable(getattr(bngraph.passes, name)) for name in bngraph.passes.__all__)


def test_the_api_functions_are_functions_though_modules_share_their_names():
    import bngraph.fold  # noqa: F401 (the module: the package attribute must stay the function)

    for name in ("insert", "fold", "export", "verify", "load", "save"):
        assert inspect.isfunction(getattr(bngraph, name)), name


def test_the_api_reference_is_up_to_date_and_complete():
    api_docs = _script("api_docs")
    assert api_docs.missing_docstrings() == []
    assert (REPO / "docs" / "api.md").read_text() == api_docs.render(), (
        "docs/api.md is stale: run .venv/bin/python scripts/api_docs.py"
    )


def test_the_package_ships_its_license_and_type_marker():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert (Path(bngraph.__file__).parent / "py.typed").is_file()


def test_an_artifact_whose_code_changed_is_refused_before_it_runs(tmp_path):
    """Loading runs model.py (the trust model in the README): a changed one never runs."""
    assert main(["insert", "zoo:mnist-mlp", "-o", str(tmp_path / "a")]) == 0
    ran = tmp_path / "ran"
    code = tmp_path / "a" / "model.py"
    code.write_text(f"open({str(ran)!r}, 'w').close()\n" + code.read_text())
    with pytest.raises(UserError, match="checksum"):
        bngraph.load(tmp_path / "a")
    assert not ran.exists()


def test_the_readme_layout_names_every_module():
    """The README's layout section is the map of the tree: a module it does not name is missing
    from the map (a folder named with a trailing slash covers what is inside it)."""
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout\n", 1)[1].split("```", 2)[1]
    named = set()
    for line in layout.splitlines():
        first, *more = line.split("  ", 1)[0].replace(",", " ").split() or [""]
        folder = first.rsplit("/", 1)[0] + "/" if "/" in first else ""
        named.update([first, *(folder + path for path in more)])  # `bngraph/a.py, b.py`: b in bngraph/
    missing = [
        str(path.relative_to(REPO))
        for top in ("bngraph", "passes", "zoo")
        for path in sorted((REPO / top).glob("*"))
        if path.name not in ("__init__.py", "__main__.py", "py.typed", "__pycache__")
        and str(path.relative_to(REPO)) not in named
        and str(path.relative_to(REPO)) + "/" not in named
        and not (top == "passes" and ("passes/*.py" in named or "passes/_*.py" in named))
        and not (top == "zoo" and "zoo/" in named)
    ]
    assert not missing, f"README's layout does not name {missing}"


def test_every_command_module_is_a_command_and_a_stray_module_does_not_stop_the_cli(tmp_path):
    # The CLI names its commands: a module left over in an installed copy (setuptools' build/
    # keeps deleted files; one such commands/common.py stopped `bngraph` from starting) is not
    # imported, and a new command file must be named.
    from bngraph.cli import COMMANDS

    modules = {p.stem for p in (REPO / "bngraph" / "commands").glob("*.py")} - {"__init__", "args"}
    assert modules == set(COMMANDS)
    stray = tmp_path / "bngraph" / "commands"
    stray.mkdir(parents=True)
    (stray / "common.py").write_text("HELPERS = {}\n")  # what an old version left: no command in it
    code = subprocess.run([sys.executable, "-c", (
        "import sys, bngraph.commands as c; c.__path__.append(sys.argv[1]); "
        "from bngraph.cli import main; sys.exit(main(['zoo']))"), str(stray)], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
