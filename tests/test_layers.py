"""The package's layers import one way: dho_fast.kernels (a leaf) <- dho_fast.ops <- dho_fast.select <- dho_fast.train
(only the active-learning loop uses selection; select never imports train).

Read from the source files' import statements, and shown by fresh interpreters importing each layer first."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import dho_fast.ops
import dho_fast.select

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sys.stdlib_module_names


def imports(folder: Path) -> list[tuple[str, str, int]]:
    """(file, absolute module imported, level) of every import statement in folder's Python files; level > 0 is a
    relative import, whose module is given relative to the file's package."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name, 0) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((path.name, node.module or "", node.level))
    return found


def test_kernels_import_only_torch_triton_and_themselves():
    for file, module, level in imports(ROOT / "kernels"):
        top = module.split(".")[0]
        assert level > 0 or top in ("torch", "triton") or top in STDLIB, f"kernels/{file} imports {module}"


def test_ops_never_import_the_trainer_or_selection():
    for file, module, _ in imports(ROOT / "dho_fast" / "ops"):
        assert not module.startswith(("dho_fast.train", "dho_fast.select")), f"dho_fast/ops/{file} imports {module}"


@pytest.mark.parametrize("layer", ["train", "select"])
def test_train_and_select_use_only_the_public_op_api(layer):
    public = set(dho_fast.ops.__all__)
    for path in sorted((ROOT / "dho_fast" / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dho_fast"):
                module = node.module
                if module.startswith(f"dho_fast.{layer}"):
                    assert not module.endswith(".cli"), f"{path.name} imports the CLI"
                    continue
                names = {alias.name for alias in node.names}
                if layer == "train" and module == "dho_fast.select":
                    # The active-learning loop (train/active.py) picks its images through select's public API.
                    private = names - set(dho_fast.select.__all__)
                    assert not private, f"dho_fast/train/{path.name} imports private {private} of dho_fast.select"
                    continue
                if module == "dho_fast.ops.validation":
                    # The one vocabulary of argument errors (ValueError/TypeError, each message written once) is
                    # shared: its public checks, never its private helpers.
                    private = {name for name in names if name.startswith("_")}
                    assert not private, f"dho_fast/{layer}/{path.name} imports private {private}"
                    continue
                assert module == "dho_fast.ops", f"dho_fast/{layer}/{path.name} imports {module}"
                assert names <= public, f"dho_fast/{layer}/{path.name} imports private {names - public}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("dho_fast") or alias.name.startswith(f"dho_fast.{layer}"), (
                        f"dho_fast/{layer}/{path.name} imports {alias.name}"
                    )


def test_nothing_named_kernels_is_installed_at_the_top_level():
    top_level = importlib.metadata.distribution("dho_fast").read_text("top_level.txt").split()
    assert top_level == ["dho_fast"]


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize(
    "first_import",
    [
        "dho_fast.kernels",
        "dho_fast.kernels.dual_head_loss",
        "dho_fast.kernels.blend",
        "dho_fast.ops",
        "dho_fast.train",
        "dho_fast.select",
    ],
)
def test_each_layer_imports_first_in_a_fresh_interpreter(first_import, tmp_path):
    # Run outside the repository, so the source folders are not on sys.path: what is imported is what is installed.
    code = f"import {first_import}; import importlib.util; assert importlib.util.find_spec('kernels') is None"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
