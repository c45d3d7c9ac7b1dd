"""The layering holds where it matters to users: commands that only read results load neither torch nor
Ray, and the import contracts (pyproject.toml, run by ``make lint``) catch a layer that breaks them."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.test_render import write_segment_output

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray")


def modules_loaded_by(argv: list[str]) -> set[str]:
    """The heavy packages a ``batchseg`` command imports, run in a fresh interpreter."""
    code = (
        "import sys\nfrom batchseg.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('\\n' + __import__('json').dumps([code or 0, sorted(m for m in {HEAVY!r} if m in sys.modules)]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    exit_code, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exit_code == 0, proc.stderr
    return set(heavy)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_segment_output(tmp_path_factory.mktemp("light")).uri


def test_help_imports_neither_torch_nor_ray() -> None:
    assert modules_loaded_by(["--help"]) == set()
    assert modules_loaded_by(["segment", "--help"]) == set()


@pytest.mark.parametrize(
    "command",
    [
        ["query", "{output}", "SELECT category, count(*) FROM instances GROUP BY 1"],
        ["export-coco", "{output}", "--out", "{tmp}/coco.json", "--images", "{tmp}/images.json"],
        ["report", "{output}", "--out", "{tmp}/report.html", "--gallery", "2"],
        ["render", "{output}", "--out", "{tmp}/png", "--limit", "2"],
        ["diff", "{output}", "{output}", "--out", "{tmp}/diff.csv"],
        ["report", "{output}", "--out", "{tmp}/compared.html", "--compare", "{output}", "--gallery", "1"],
    ],
    ids=lambda c: " ".join(c[:1] + [a for a in c if a == "--compare"]),
)
def test_read_side_commands_import_neither_torch_nor_ray(
    output: str, tmp_path: pathlib.Path, command: list[str]
) -> None:
    argv = [part.format(output=output, tmp=tmp_path) for part in command]
    assert modules_loaded_by(argv) == set()
    assert any(tmp_path.iterdir()) or command[0] == "query", "the command did its work"


def test_the_core_of_each_product_runs_without_ray() -> None:
    """The shard processor, the driver's bookkeeping and the training recipe import no Ray at run time."""
    core = [
        "batchseg.segment.job",
        "batchseg.segment.processor",
        "batchseg.segment.scheduling",
        "batchseg.train.engine",
        "batchseg.train.data",
        "batchseg.inference.predictor",
    ]
    code = (
        f"import importlib, sys\nfor m in {core!r}: importlib.import_module(m)\nprint('ray' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.stdout.strip() == "False", proc.stderr


def lint_imports(package_parent: pathlib.Path) -> subprocess.CompletedProcess[str]:
    linter = pathlib.Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(linter), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=package_parent,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_parent)},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("format/rle.py", "import torch", "io/ and format/ import neither torch nor Ray"),
        ("io/manifest.py", "from ray import data", "io/ and format/ import neither torch nor Ray"),
        (
            "analysis/query.py",
            "import torchvision",
            "The read side (analysis/) imports neither torch nor Ray",
        ),
        ("segment/processor.py", "import ray", "Only the segment driver and the Ray Train glue import Ray"),
        ("cli.py", "import ray", "Only the segment driver and the Ray Train glue import Ray"),
        ("io/storage.py", "from batchseg.format import records", "Layers"),
    ],
)
def test_the_import_contracts_catch_a_layer_that_breaks_them(
    tmp_path: pathlib.Path, module: str, line: str, contract: str
) -> None:
    shutil.copytree(
        ROOT / "batchseg", tmp_path / "batchseg", ignore=shutil.ignore_patterns("*.pt", "__pycache__")
    )
    assert lint_imports(tmp_path).returncode == 0, "the copy as it is keeps every contract"
    target = tmp_path / "batchseg" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert f"{contract}" in broken.stdout.replace("\n", " ") and "BROKEN" in broken.stdout
