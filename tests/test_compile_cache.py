"""torch.compile's on-disk caches are keyed on this installation of dho_fast (dho_fast/_compile_cache.py)."""

import os

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import dho_fast
from dho_fast.ops.compile_cache import CACHE_KEY_ENTRY, installation_files, installation_identity

pytestmark = pytest.mark.slow  # torch.compile and its caches


def test_identity_changes_with_any_file(tmp_path):
    files = [tmp_path / "a.py", tmp_path / "_C.so"]
    for f in files:
        f.write_text("x")
    before = installation_identity(files)
    assert installation_identity(files) == before
    os.utime(files[1], ns=(0, 10**9))  # a rebuilt extension: same size, another modification time
    assert installation_identity(files) != before
    later = installation_identity(files)
    files[0].write_text("xy")
    assert installation_identity(files) != later


def test_import_keys_the_caches_on_the_extension_and_python_sources():
    names = {f.name for f in installation_files()}
    assert {"registry.py", "linear_loss.py", "dual_head_loss.py"} <= names
    assert any(name.startswith("_C.") for name in names)
    want = installation_identity(installation_files())
    assert inductor_config.unsafe_marked_cacheable_functions[CACHE_KEY_ENTRY] == want


def test_graph_cached_by_another_installation_is_not_reused():
    head = dho_fast.DualHead(4, 5)
    features = torch.randn(6, 4, requires_grad=True)
    teacher, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, -100, -100, -100])

    def compile_and_step() -> None:
        torch._dynamo.reset()  # drop the in-memory graphs: the next call looks in the on-disk caches
        compiled = torch.compile(lambda x: head.loss(x, teacher, labels, backend="cpu"), fullgraph=True)
        compiled(features).backward()

    def on_disk(event: str) -> int:
        return counters["aot_autograd"][event]

    with fresh_cache():
        counters.clear()
        compile_and_step()
        assert on_disk("autograd_cache_saved") == 1
        compile_and_step()
        assert on_disk("autograd_cache_hit") == 1
        entries = {**inductor_config.unsafe_marked_cacheable_functions, CACHE_KEY_ENTRY: "another build"}
        # config.patch, not pytest's monkeypatch: undoing that deletes (hides) the config entry for later tests.
        with inductor_config.patch(unsafe_marked_cacheable_functions=entries):
            compile_and_step()
        assert on_disk("autograd_cache_hit") == 1 and on_disk("autograd_cache_miss") == 2
    torch._dynamo.reset()
    assert inductor_config.unsafe_marked_cacheable_functions[CACHE_KEY_ENTRY] != "another build"
