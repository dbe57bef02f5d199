"""scripts/gpu_check.py --tiny on the CPU, as the GPU machine would run it: only its packages importable.

The GPU machine has torch and transformers but no Ray, vLLM, LiteLLM or wandb, and deepspeed travels as carried
wheels. The subprocess here gets an import hook that refuses every distribution installed in this environment that
the GPU machine lacks (its package list, from the device tool's KINDS.md, plus the carried wheels and whatever
torch, transformers and deepspeed need here), so an import of one of them anywhere on the script's path fails the
test here instead of the check there.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"

# The GPU machine's image, as the device tool lists it (KINDS.md, "Python packages already there").
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split()
CARRIED = ["deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
           "hjson"]
FIRST_PARTY = {"actors", "launch", "eva_ray", "scripts", "tests"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_closure(roots: list[str]) -> set[str]:
    """The roots and everything they require here (their versions here may need other packages than there)."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = _norm(stack.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


def _top_level_modules(dist: md.Distribution) -> set[str]:
    names = set((dist.read_text("top_level.txt") or "").split())
    for file in dist.files or []:
        head = str(file).split("/")[0]
        if head.endswith(".py"):
            head = head[:-3]
        if head and head != ".." and not head.endswith((".dist-info", ".egg-info", ".pth", ".data")):
            names.add(head.split(".")[0])
    return names


def modules_absent_on_device() -> dict[str, str]:
    """Top-level module -> distribution, for every distribution here that the GPU machine lacks."""
    allowed = {_norm(n) for n in DEVICE_PACKAGES + CARRIED} | _requirements_closure(
        ["torch", "transformers", *CARRIED])
    allowed_modules: set[str] = set()
    absent: dict[str, str] = {}
    for dist in md.distributions():
        name = _norm(dist.metadata["Name"] or "")
        for module in _top_level_modules(dist):
            if name in allowed:
                allowed_modules.add(module)
            else:
                absent.setdefault(module, name)
    return {m: d for m, d in absent.items() if m not in allowed_modules | FIRST_PARTY}


def run_as_on_device(tmp_path: Path, script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a subprocess in which the project's own imports of packages the GPU machine lacks fail."""
    absent = modules_absent_on_device()
    assert {"ray", "litellm", "wandb", "tenacity"} <= set(absent), "the hook would not catch what it exists for"
    (tmp_path / "absent.json").write_text(json.dumps(absent))
    launcher = textwrap.dedent(f"""
        import importlib.abc, json, os, runpy, sys
        ABSENT = json.load(open({str(tmp_path / "absent.json")!r}))
        STDLIB = os.path.dirname(os.__file__) + os.sep

        def importer():  # the file whose import statement started this import, past importlib's own frames
            frame = sys._getframe(2)
            while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                         or "importlib" in frame.f_code.co_filename):
                frame = frame.f_back
            return frame.f_code.co_filename if frame is not None else ""

        class Absent(importlib.abc.MetaPathFinder):
            # Only imports written in the project's own files are refused: the installed libraries' optional
            # imports differ between their versions here and there, and each library there has what it needs.
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top in ABSENT:
                    source = importer()
                    if not source.startswith(STDLIB) and "-packages" + os.sep not in source:
                        raise ModuleNotFoundError(f"No module named {{name!r}} (the GPU machine lacks "
                                                  f"{{ABSENT[top]}}; imported from {{source}})", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        sys.argv = [{str(script)!r}, *{list(args)!r}]
        runpy.run_path({str(script)!r}, run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", launcher], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out_json = tmp_path / "gpu_check.json"
    proc = run_as_on_device(tmp_path, SCRIPT, *args, "--json", str(out_json))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out_json.read_text()) == last
    return proc, last


def test_tiny_check_runs_every_part_and_reports_positive_figures(tmp_path):
    proc, result = run_check(tmp_path, "--tiny")
    assert result["status"] == "ok" and result["errors"] == {} and result["skipped"] == [], result
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["shape"] == "tiny"
    for key in ("learner_step_s", "learner_tokens_per_s", "learner_tflops", "mfu", "mfu_all_passes",
                "rollout_tokens_per_s", "rollout_call_s", "rollout_warmup_s", "sync_s", "sync_gb_per_s",
                "sync_bytes", "params", "learner_tokens_per_step"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result.get(key))
    assert result["learner_tokens_per_step"] == 4 * 2 * 128
    assert len(result["learner_steps_s"]) == 5 and result["zero_stage"] == 3
    assert result["sync_backend"] == "gloo" and result["sync_weights_match"] is True
    # The worker received what the learner holds after its 2 warm-up and 5 timed steps.
    assert result["sync_version"] == 7
    for label in ("learner: step", "learner: MFU", "rollout:", "tokens/s", "sync:", "GB/s", "gloo"):
        assert label in proc.stdout, label


def test_an_exhausted_budget_skips_every_part_and_still_prints_the_json_line(tmp_path):
    proc, result = run_check(tmp_path, "--tiny", "--budget-s", "0")
    assert result["status"] == "partial" and result["errors"] == {}
    assert sorted(result["skipped"]) == ["learner", "rollout", "softcap", "sync"], result
    assert "mfu" not in result and "SKIPPED" in proc.stdout


def test_the_device_hook_refuses_what_the_gpu_machine_lacks(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import transformers, yaml\nprint('present ok')\nimport ray\n")
    proc = run_as_on_device(tmp_path, probe)
    assert "present ok" in proc.stdout and proc.returncode != 0
    assert "No module named 'ray' (the GPU machine lacks ray" in proc.stderr
