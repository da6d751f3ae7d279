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
``KVZAP_NO_DECODE``    ``1``/true/yes/on: decode tokens unscored (kept)       --kvzap-no-decode
``KVZAP_TENANTS``      tenants file (TOML, ``kvzap_sglang.tenants``)          --kvzap-tenants
=====================  =====================================================  ================
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from kvzap_sglang.policy import DEFAULT_WINDOW, MAX_WINDOW, is_usable_threshold
from kvzap_sglang.surrogate import BUNDLED_CHECKPOINTS, CONFIG_FILE, KINDS, KVzapConfig, KVzapSurrogate

ENV_THRESHOLD = "KVZAP_THRESHOLD"
ENV_SURROGATE = "KVZAP_SURROGATE"
ENV_WINDOW = "KVZAP_WINDOW"
ENV_NO_DECODE = "KVZAP_NO_DECODE"
ENV_TENANTS = "KVZAP_TENANTS"
ENV_VARS = (ENV_THRESHOLD, ENV_SURROGATE, ENV_WINDOW, ENV_NO_DECODE, ENV_TENANTS)
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
    tenants: str | None = None  # tenants file (multi-tenant serving); None = one tenant

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool):
            raise KVzapConfigError(f"kvzap threshold must be a number, got {self.threshold!r}")
        if not is_usable_threshold(self.threshold):
            raise KVzapConfigError(f"kvzap threshold must be a finite float32 number, got {self.threshold!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or not 0 <= self.window <= MAX_WINDOW:
            raise KVzapConfigError(f"kvzap window must be an integer in [0, {MAX_WINDOW}], got {self.window!r}")
        # Values only, no files: τ changes live go through here (``KvzapRuntime.set_threshold``), and re-reading the
        # tenants file or the surrogate folder there turned an edit of either into a crash of the serving
        # scheduler. The launch checks both (``launch.prepare_launch``: ``resolve_surrogate``, ``tenants_config``).
        if not isinstance(self.surrogate, str) or not self.surrogate:
            raise KVzapConfigError(f"kvzap surrogate must be {'|'.join(KINDS)} or a checkpoint folder, "
                                   f"got {self.surrogate!r}")

    def tenants_config(self):
        """The parsed tenants file (``kvzap_sglang.tenants.TenantsConfig``), or ``None`` without one."""
        from kvzap_sglang.tenants import TenantsConfig, TenantsConfigError

        if self.tenants is None:
            return None
        try:
            return TenantsConfig.load(self.tenants)
        except TenantsConfigError as error:
            raise KVzapConfigError(str(error)) from None

    def to_env(self) -> dict[str, str]:
        env = {ENV_THRESHOLD: repr(float(self.threshold)), ENV_SURROGATE: self.surrogate, ENV_WINDOW: str(self.window)}
        if not self.score_decode:
            env[ENV_NO_DECODE] = "1"
        if self.tenants is not None:
            env[ENV_TENANTS] = str(Path(self.tenants).resolve())
        return env

    def export(self) -> None:
        """Write the settings to ``os.environ`` (replacing any earlier KVZAP_* values) for spawned children."""
        clear_env()
        os.environ.update(self.to_env())

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KVzapSettings | None:
        """The settings exported by the launcher, or ``None`` when KVzap is off (``KVZAP_THRESHOLD`` unset)."""
        env = os.environ if environ is None else environ
        if not kvzap_enabled(env):
            return None
        return cls(
            threshold=parse_threshold(env[ENV_THRESHOLD].strip()),
            surrogate=env.get(ENV_SURROGATE, DEFAULT_SURROGATE) or DEFAULT_SURROGATE,
            window=parse_window(env.get(ENV_WINDOW, str(DEFAULT_WINDOW))),
            score_decode=not _parse_flag(env.get(ENV_NO_DECODE, ""), ENV_NO_DECODE),
            tenants=env.get(ENV_TENANTS) or None,
        )


def read_at_plugin_load(from_env):
    """``from_env()`` as the plugin's ``register`` reads it, or ``None`` in the launching process when a ``KVZAP_*``
    variable is malformed: the launcher refuses it with the reason (``sglang: error: ...``, exit 2) as soon as it
    parses its flags (``launch``); raised here as well, it first logged SGLang's "Failed to execute general plugin"
    traceback. A spawned process (scheduler, detokenizer) gets only values its launcher checked, so there an error
    is raised."""
    import multiprocessing

    try:
        return from_env()
    except KVzapConfigError:
        if multiprocessing.parent_process() is not None:
            raise
        return None


def kvzap_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether the launcher exported KVzap settings (``KVZAP_THRESHOLD`` set): one lookup, nothing parsed."""
    env = os.environ if environ is None else environ
    return bool(env.get(ENV_THRESHOLD, "").strip())


def clear_env() -> None:
    for key in ENV_VARS:
        os.environ.pop(key, None)


def _parse_flag(text: str, name: str) -> bool:
    value = text.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise KVzapConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {text!r}")


def parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise KVzapConfigError(f"kvzap threshold must be a number, got {text!r}") from None
    if not is_usable_threshold(value):
        raise KVzapConfigError(f"kvzap threshold must be a finite float32 number, got {text!r}")
    return value


def parse_window(text: str | int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise KVzapConfigError(f"kvzap window must be an integer >= 0, got {text!r}") from None
    if not 0 <= value <= MAX_WINDOW:
        raise KVzapConfigError(f"kvzap window must be an integer in [0, {MAX_WINDOW}], got {value}")
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
    try:  # the weights too (a small file): missing or corrupt, they failed only after the model had loaded
        KVzapSurrogate.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise KVzapConfigError(f"kvzap surrogate {spec!r}: {error}") from None
    return folder


# ---------------------------------------------------------------------------- calibration link (issue #5)
# Optional, only read while KVzap is on. The Redis variables are the calibration service's own names
# (service/core/config.py), so one environment configures both sides of the same Redis.
#
# ======================  ======================================================  ===================
# variable                meaning                                                 flag
# ======================  ======================================================  ===================
# ``KVZAP_REDIS_URL``     calibration Redis; unset = no sampling, τ fixed         --kvzap-redis-url
# ``KVZAP_REDIS_PREFIX``  key prefix shared with the service (default ``kvzap:``) --kvzap-redis-prefix
# ``KVZAP_SAMPLE_RATE``   fraction of finished requests sampled (default 0.25)    --kvzap-sample-rate
# ``KVZAP_TASK``          task label of this server's traffic (default default)   --kvzap-task
# ``KVZAP_MODEL_ID``      model id (default: basename of the served model path)   --kvzap-model-id
# ``KVZAP_TAU_POLL_S``    seconds between τ polls (default 2)                     --kvzap-tau-poll-s
# ======================  ======================================================  ===================

ENV_REDIS_URL = "KVZAP_REDIS_URL"
ENV_REDIS_PREFIX = "KVZAP_REDIS_PREFIX"
ENV_SAMPLE_RATE = "KVZAP_SAMPLE_RATE"
ENV_TASK = "KVZAP_TASK"
ENV_MODEL_ID = "KVZAP_MODEL_ID"
ENV_TAU_POLL_S = "KVZAP_TAU_POLL_S"
CALIBRATION_ENV_VARS = (ENV_REDIS_URL, ENV_REDIS_PREFIX, ENV_SAMPLE_RATE, ENV_TASK, ENV_MODEL_ID, ENV_TAU_POLL_S)
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class CalibrationSettings:
    """Where sampled score summaries go and where the live τ comes from (``plugin/calibration.py``)."""

    redis_url: str
    redis_prefix: str = "kvzap:"
    sample_rate: float = 0.25
    task: str = "default"
    model_id: str | None = None  # None: the served model folder's basename, resolved where the path is known
    tau_poll_s: float = 2.0

    def __post_init__(self) -> None:
        import re
        from urllib.parse import urlsplit

        from calibrator.series import connect  # lazy: only when calibration is configured
        from calibrator.summary import LABEL_PATTERN, MODEL_PATTERN

        parts = urlsplit(self.redis_url) if isinstance(self.redis_url, str) else None
        if parts is None or parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
            raise KVzapConfigError(
                f"kvzap redis url must look like redis://HOST:PORT/DB (schemes: {', '.join(REDIS_SCHEMES)}), "
                f"got {self.redis_url!r}"
            )
        # Checked here, not where the scheduler first connects (after the pool is built): a bad port or database
        # would otherwise stop the server half-way through start-up, or (the database) be silently ignored.
        try:
            parts.port  # raises on a port that is not a number in 0..65535
        except ValueError as error:
            raise KVzapConfigError(f"kvzap redis url {self.redis_url!r}: {error}") from None
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            raise KVzapConfigError(f"kvzap redis url {self.redis_url!r}: the database must be a number, got {database!r}")
        try:  # redis-py's own parse of the query options (?db=, ?socket_timeout=...): a connection object, unopened
            pool = connect(self.redis_url).connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as error:
            raise KVzapConfigError(f"kvzap redis url {self.redis_url!r}: {error}") from None
        if not isinstance(self.redis_prefix, str) or not 1 <= len(self.redis_prefix) <= 64:
            raise KVzapConfigError(f"kvzap redis prefix must be 1-64 characters, got {self.redis_prefix!r}")
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise KVzapConfigError(f"kvzap sample rate must be a number in [0, 1], got {rate!r}")
        poll = self.tau_poll_s
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not (math.isfinite(poll) and poll > 0):
            raise KVzapConfigError(f"kvzap tau poll interval must be a number of seconds > 0, got {poll!r}")
        if not isinstance(self.task, str) or not re.fullmatch(LABEL_PATTERN, self.task):
            raise KVzapConfigError(f"kvzap task label must match {LABEL_PATTERN}, got {self.task!r}")
        if self.model_id is not None and not (isinstance(self.model_id, str) and re.fullmatch(MODEL_PATTERN, self.model_id)):
            raise KVzapConfigError(f"kvzap model id must match {MODEL_PATTERN}, got {self.model_id!r}")

    def to_env(self) -> dict[str, str]:
        env = {ENV_REDIS_URL: self.redis_url, ENV_REDIS_PREFIX: self.redis_prefix,
               ENV_SAMPLE_RATE: repr(float(self.sample_rate)), ENV_TASK: self.task,
               ENV_TAU_POLL_S: repr(float(self.tau_poll_s))}  # fmt: skip
        if self.model_id is not None:
            env[ENV_MODEL_ID] = self.model_id
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> CalibrationSettings | None:
        """The settings in the environment with ``overrides`` (field → value, ``None`` = not given) on top;
        ``None`` when no Redis URL is configured. Raises ``KVzapConfigError`` on a malformed value."""
        env = os.environ if environ is None else environ
        given = {key: value for key, value in overrides.items() if value is not None}
        url = given.pop("redis_url", None) or env.get(ENV_REDIS_URL, "").strip()
        if not url:
            return None
        raw = {
            "redis_prefix": env.get(ENV_REDIS_PREFIX) or None,
            "sample_rate": parse_number(env.get(ENV_SAMPLE_RATE), "sample rate"),
            "task": env.get(ENV_TASK) or None,
            "model_id": env.get(ENV_MODEL_ID) or None,
            "tau_poll_s": parse_number(env.get(ENV_TAU_POLL_S), "tau poll interval"),
        }
        fields = {key: value for key, value in raw.items() if value is not None} | given
        return cls(redis_url=url, **fields)


def clear_calibration_env() -> None:
    for key in CALIBRATION_ENV_VARS:
        os.environ.pop(key, None)


def parse_number(text: str | None, what: str) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise KVzapConfigError(f"kvzap {what} must be a number, got {text!r}") from None
