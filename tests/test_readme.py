"""The README's commands work as written: its Python runs, its ``dho-fast`` commands parse, its make targets exist
and the files its other commands name are there."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from dho_fast.train import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INLINE = re.findall(r"`([^`\n]+)`", README)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def cli_commands() -> list[list[str]]:
    """Every inline ``dho-fast ...`` command, without its optional ``[...]`` parts."""
    commands = [re.sub(r"\[[^\]]*\]", "", text) for text in INLINE if text.startswith("dho-fast ")]
    return [shlex.split(command)[1:] for command in commands]


def test_the_readme_shows_what_is_checked_here():
    assert python_blocks() and len(cli_commands()) >= 4


@pytest.mark.parametrize("block", python_blocks())
def test_python_runs(block):
    exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("argv", cli_commands(), ids=" ".join)
def test_cli_command_parses(argv):
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        return
    args = cli._parser().parse_args(argv)
    configs = getattr(args, "config", None) or []
    for config in [configs] if isinstance(configs, str) else configs:  # train layers repeated --config files
        assert (ROOT / config).is_file(), config


@pytest.mark.slow  # runs make
def test_make_targets_exist():
    shown = INLINE + re.findall(r"^(make .*)$", README, flags=re.M)
    targets = sorted({shlex.split(text)[1] for text in shown if text.startswith("make ")})
    assert {"demo", "test", "bench", "lint"} <= set(targets)
    for target in targets:
        subprocess.run(["make", "-n", target], cwd=ROOT, check=True, capture_output=True)


def test_files_named_by_commands_exist():
    commands = [text for text in INLINE if re.match(r"(\S*python|pytest|TRITON_INTERPRET=1 pytest) ", text)]
    assert commands
    for command in commands:
        for word in shlex.split(command):
            if re.fullmatch(r"[\w./-]+\.(py|json|yaml)|[\w-]+/", word) and not word.startswith("-"):
                assert (ROOT / word).exists(), f"README command {command!r} names {word}, which does not exist"
