"""fgdata leaves the process it runs in as it found it: no environment variable set by an import,
no global torch seed reset by a generate call, and seeded generation still repeats itself."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.scoped import environment, torch_seed
from pipeline.models.generation import Sampling

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def _run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _third_party_imports() -> list[str]:
    """The libraries pipeline modules import at module level, which may set variables of their own."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names - {"pipeline", "__future__"})


def test_importing_every_pipeline_module_leaves_the_environment_alone():
    # torch, ray and friends set variables of their own when imported: they are imported first,
    # so what is compared is what fgdata's own modules do
    code = f"""
import importlib, json, os, pkgutil
for name in {_third_party_imports()!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
before = dict(os.environ)
import pipeline
modules = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
for name in modules:
    importlib.import_module(name)
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print(json.dumps({{"modules": modules, "changed": changed}}))
"""
    result = _run_python(code)
    assert "pipeline.models.yolo_world" in result["modules"] and "pipeline.stages.fggrn.download" in result["modules"]
    assert result["changed"] == []


def test_a_scoped_variable_is_restored_or_removed_even_when_the_block_fails(monkeypatch):
    monkeypatch.setenv("FGDATA_TEST_KEPT", "mine")
    monkeypatch.delenv("FGDATA_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError), environment(FGDATA_TEST_KEPT="theirs", FGDATA_TEST_NEW="1"):
        assert os.environ["FGDATA_TEST_KEPT"] == "theirs" and os.environ["FGDATA_TEST_NEW"] == "1"
        raise RuntimeError("the import failed")
    assert os.environ["FGDATA_TEST_KEPT"] == "mine"
    assert "FGDATA_TEST_NEW" not in os.environ


@pytest.mark.parametrize("imported_first", [False, True])
def test_ultralytics_never_auto_installs_and_the_environment_is_untouched(imported_first):
    # fresh: the variable is in force while ultralytics is first imported (its own module-level
    # flag reads it); imported earlier by the caller with installs on: the flag its checks read
    # at call time is turned off
    code = f"""
import json, os
os.environ.pop("YOLO_AUTOINSTALL", None)
if {imported_first}:
    import ultralytics.utils.checks
from pipeline.models.yolo_world import ultralytics_without_installs
ultralytics_without_installs()
import ultralytics.utils
from ultralytics.utils import checks
print(json.dumps({{"checks": checks.AUTOINSTALL, "utils": ultralytics.utils.AUTOINSTALL,
                  "variable_left": "YOLO_AUTOINSTALL" in os.environ}}))
"""
    result = _run_python(code)
    assert result["checks"] is False
    assert result["utils"] is imported_first  # only a fresh import could have read the variable
    assert not result["variable_left"]  # (ultralytics' own import sets others of its own)


def test_img2dataset_import_is_scoped(monkeypatch, tmp_path):
    pytest.importorskip("img2dataset")
    from conftest import make_config

    from pipeline.stages.fggrn import download

    monkeypatch.delenv("NO_ALBUMENTATIONS_UPDATE", raising=False)

    class Stop(Exception):
        pass

    def writer(*_, **__):  # the imports are done when the writer is built
        raise Stop

    import img2dataset.writer

    monkeypatch.setattr(img2dataset.writer, "FilesSampleWriter", writer)
    with pytest.raises(Stop):
        download._download([{"key": "a", "url": "http://127.0.0.1:9/a.jpg", "caption": "c"}], tmp_path / "attempt-0", make_config())
    assert "NO_ALBUMENTATIONS_UPDATE" not in os.environ


def test_torch_seed_restores_the_callers_random_stream():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    with torch_seed(7):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with torch_seed(7):
        assert torch.equal(torch.rand(3), inside)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_seed_restores_the_cuda_random_stream_too():
    torch.cuda.manual_seed_all(1234)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(1234)
    with torch_seed(7):
        torch.rand(3, device="cuda")
    assert torch.equal(torch.rand(3, device="cuda"), expected)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from pipeline.models.text_lm import TransformersLM
    from pipeline.models.tiny import build_tiny_llm

    path = build_tiny_llm(tmp_path_factory.mktemp("llm"), ["a red car on a road", "two dogs play in the grass"])
    return TransformersLM(str(path), revision=None, trust_remote_code=False, dtype="float32")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from pipeline.models.seq2seq import Seq2SeqGenerator
    from pipeline.models.tiny import build_tiny_t5

    path = build_tiny_t5(tmp_path_factory.mktemp("t5"), ["a red car on a road", "two dogs play in the grass"])
    return Seq2SeqGenerator(str(path))


def test_sampled_generation_repeats_for_a_seed_and_leaves_the_global_rng_alone(tiny_lm):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    first = [g.text for g in tiny_lm.generate(["describe the car"] * 3, sampling)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # the caller's stream moves on; the seed alone decides the text
    assert [g.text for g in tiny_lm.generate(["describe the car"] * 3, sampling)] == first


def test_tiny_model_building_leaves_the_global_rng_alone(tmp_path):
    from pipeline.models.tiny import build_tiny_clip_text

    state = torch.get_rng_state()
    build_tiny_clip_text(tmp_path / "clip", ["a red car"])
    assert torch.equal(torch.get_rng_state(), state)


def test_seq2seq_sampling_repeats_for_a_seed_and_leaves_the_global_rng_alone(tiny_t5):
    options = {"max_new_tokens": 10, "num_return_sequences": 2, "temperature": 1.0, "seed": 5}
    torch.manual_seed(99)
    state = torch.get_rng_state()
    first = tiny_t5.generate(["a red car on a road"], **options)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)
    assert tiny_t5.generate(["a red car on a road"], **options) == first
