"""KVzap's server settings: one frozen record, validated once at start-up, carried to SGLang's processes by env vars.

Why environment variables: SGLang spawns its scheduler/detokenizer with ``multiprocessing`` "spawn", and a plugin
cannot add fields to the sealed ``ServerArgs`` record (../shared/notes/sglang-internals.md §6.2). The launcher
(CLI flags or ``sglang.Engine(kvzap_...=...)``) validates the settings and exports them; every child inherits them
and rebuilds the same record with ``KVzapSettings.from_env()``. They are also the documented config for callers
that set them directly:

=====================  =====================================================  ================
variable               meaning                                                flag
=====================  =====================================================  ================
``KVZAP_THRESHOLD``    τ (log-score); unset = KVzap off                       --kvzap-threshold
``KVZAP_SURROGATE``    ``linear`` | ``mlp`` (bundled for the model) | folder  --kvzap-surrogate
``KVZAP_WINDOW``       protected recent tokens per request (default 128)      --kvzap-window
``KVZAP_NO_DECODE``    ``1`` = do not score decode tokens (they are kept)     --kvzap-no-decode
=====================  =====================================================  ================
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from kvzap_sglang.policy import DEFAULT_WINDOW
from kvzap_sglang.surrogate import BUNDLED_CHECKPOINTS, CONFIG_FILE, KINDS, KVzapConfig

ENV_THRESHOLD = "KVZAP_THRESHOLD"
ENV_SURROGATE = "KVZAP_SURROGATE"
ENV_WINDOW = "KVZAP_WINDOW"
ENV_NO_DECODE = "KVZAP_NO_DECODE"
ENV_VARS = (ENV_THRESHOLD, ENV_SURROGATE, ENV_WINDOW, ENV_NO_DECODE)
DEFAULT_SURROGATE = "mlp"


class KVzapConfigError(ValueError):
    """An invalid KVzap setting; raised at start-up, never mid-request. The message names the fix."""


@dataclass(frozen=True)
class KVzapSettings:
    """KVzap switched on with these values (KVzap off is ``None``, not a settings object)."""

    threshold: float
    surrogate: str = DEFAULT_SURROGATE  # "linear" | "mlp" | checkpoint folder
    window: int = DEFAULT_WINDOW
    score_decode: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise KVzapConfigError(f"kvzap threshold must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold):
            raise KVzapConfigError(f"kvzap threshold must be a finite number, got {self.threshold!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise KVzapConfigError(f"kvzap window must be an integer >= 0, got {self.window!r}")
        if self.surrogate not in KINDS and not Path(self.surrogate).is_dir():
            raise KVzapConfigError(
                f"kvzap surrogate must be one of {'|'.join(KINDS)} or an existing checkpoint folder, "
                f"got {self.surrogate!r}"
            )

    def to_env(self) -> dict[str, str]:
        env = {ENV_THRESHOLD: repr(float(self.threshold)), ENV_SURROGATE: self.surrogate, ENV_WINDOW: str(self.window)}
        if not self.score_decode:
            env[ENV_NO_DECODE] = "1"
        return env

    def export(self) -> None:
        """Write the settings to ``os.environ`` (replacing any earlier KVZAP_* values) for spawned children."""
        clear_env()
        os.environ.update(self.to_env())

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KVzapSettings | None:
        """The settings exported by the launcher, or ``None`` when KVzap is off (``KVZAP_THRESHOLD`` unset)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_THRESHOLD, "").strip()
        if not raw:
            return None
        return cls(
            threshold=parse_threshold(raw),
            surrogate=env.get(ENV_SURROGATE, DEFAULT_SURROGATE) or DEFAULT_SURROGATE,
            window=parse_window(env.get(ENV_WINDOW, str(DEFAULT_WINDOW))),
            score_decode=env.get(ENV_NO_DECODE, "").strip() not in ("1", "true", "True"),
        )


def clear_env() -> None:
    for key in ENV_VARS:
        os.environ.pop(key, None)


def parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise KVzapConfigError(f"kvzap threshold must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise KVzapConfigError(f"kvzap threshold must be a finite number, got {text!r}")
    return value


def parse_window(text: str | int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise KVzapConfigError(f"kvzap window must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise KVzapConfigError(f"kvzap window must be an integer >= 0, got {value}")
    return value


@dataclass(frozen=True)
class ModelDims:
    """What a surrogate must fit: (layers, hidden size, KV heads) of the served model."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int

    @classmethod
    def from_hf_config(cls, config) -> ModelDims:
        """From a transformers config object or its ``config.json`` dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_key_value_heads") or get("num_attention_heads")
        return cls(int(get("num_hidden_layers")), int(get("hidden_size")), int(heads))

    @classmethod
    def from_model_path(cls, model_path: str | os.PathLike) -> ModelDims | None:
        """From a local model folder's ``config.json``; ``None`` when the folder is not local."""
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            return None
        return cls.from_hf_config(json.loads(config_file.read_text()))


def _checkpoint_dims(folder: Path) -> ModelDims:
    config = KVzapConfig.from_json(json.loads((folder / CONFIG_FILE).read_text()), str(folder / CONFIG_FILE))
    return ModelDims(config.n_modules, config.input_dim, config.output_dim)


def resolve_surrogate(spec: str, dims: ModelDims | None) -> Path:
    """Checkpoint folder for ``spec`` that fits the served model.

    ``linear`` / ``mlp`` pick the bundled checkpoint of that kind whose (layers, hidden, KV heads) equal the model's;
    a folder must hold a KVzap checkpoint of the model's dims. ``dims=None`` (non-local model) skips the dim check
    for folders; the scheduler checks again with the loaded model config.

    Raises:
        KVzapConfigError: unknown kind, missing/malformed checkpoint, or no checkpoint fits the model.
    """
    if spec in KINDS:
        candidates = sorted(p.parent for p in BUNDLED_CHECKPOINTS.glob(f"*/{spec}/{CONFIG_FILE}"))
        for folder in candidates:
            if dims is None or _checkpoint_dims(folder) == dims:
                return folder
        have = ", ".join(f"{p.parent.name} {_checkpoint_dims(p)}" for p in candidates) or "none"
        raise KVzapConfigError(
            f"no bundled {spec} KVzap surrogate fits this model {dims} (bundled: {have}); "
            "train one with `kvzap-sglang train --model ... --kind linear|mlp --out DIR` and pass --kvzap-surrogate DIR"
        )
    folder = Path(spec)
    if not (folder / CONFIG_FILE).is_file():
        raise KVzapConfigError(f"kvzap surrogate {spec!r} is neither linear|mlp nor a KVzap checkpoint folder")
    try:
        found = _checkpoint_dims(folder)
    except ValueError as error:
        raise KVzapConfigError(f"kvzap surrogate {spec!r}: {error}") from None
    if dims is not None and found != dims:
        raise KVzapConfigError(
            f"kvzap surrogate {spec!r} was trained for (layers, hidden, KV heads) = "
            f"({found.num_layers}, {found.hidden_size}, {found.num_kv_heads}) but the model has "
            f"({dims.num_layers}, {dims.hidden_size}, {dims.num_kv_heads})"
        )
    return folder
