"""KVzap surrogate: one tiny module per layer mapping a token's attention input to its KV heads' log-scores.

Paper §2 / kvpress ``KVzapModel``: KVzap-Linear is ``Linear(D, H_kv)``, KVzap-MLP is
``Linear(D, D/8) -> GELU (exact, erf) -> Linear(D/8, H_kv)``. The input is the post-input_layernorm hidden
state of that layer (:mod:`kvzap_sglang.hidden_states`); a score depends on that one token only.

Checkpoints use kvpress's layout so they can be exchanged with it: ``config.json`` with
``model_type: "kvzap"``, ``input_dim`` (D), ``output_dim`` (H_kv), ``hidden_dim`` (null for linear),
``n_modules`` (L), and ``model.safetensors`` with ``layers.{i}.weight/bias`` (linear) or
``layers.{i}.0.*`` / ``layers.{i}.2.*`` (MLP; index 1 is the parameter-free GELU). Saved in fp32 (as the
released ``nvidia/KVzap-*`` files); bf16 files (what kvpress's ``train.py`` writes) load too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BUNDLED_CHECKPOINTS = Path(__file__).parent / "checkpoints"
KINDS = ("linear", "mlp")


class CheckpointError(ValueError):
    """A surrogate checkpoint is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class KVzapConfig:
    input_dim: int  # D, the model's hidden size
    output_dim: int  # H_kv, KV heads per layer
    n_modules: int  # L, decoder layers
    hidden_dim: int | None = None  # MLP width (D/8 in the paper); None = linear

    @property
    def kind(self) -> str:
        return "linear" if self.hidden_dim is None else "mlp"

    def to_json(self) -> dict:
        return {"model_type": "kvzap", "architectures": ["KVzapModel"], **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> KVzapConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("model_type") != "kvzap":
            raise CheckpointError(f"{source}: model_type is {data.get('model_type')!r}, expected 'kvzap'")
        for name in ("input_dim", "output_dim", "n_modules"):
            if name not in data:
                raise CheckpointError(f"{source}: missing field {name!r}")
        return cls(
            input_dim=_dimension(data, "input_dim", source),
            output_dim=_dimension(data, "output_dim", source),
            n_modules=_dimension(data, "n_modules", source),
            hidden_dim=None if data.get("hidden_dim") is None else _dimension(data, "hidden_dim", source),
        )


def _dimension(data: dict, name: str, source: str) -> int:
    # Strict: int() would turn 16.7 into 16 and True into 1, and a size < 1 only fails later inside torch.
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {name} must be an integer >= 1, got {value!r}")
    return value


def _layer_module(config: KVzapConfig) -> nn.Module:
    if config.hidden_dim is None:
        return nn.Linear(config.input_dim, config.output_dim)
    return nn.Sequential(
        nn.Linear(config.input_dim, config.hidden_dim),
        nn.GELU(),  # exact erf GELU, PyTorch's default, as in kvpress
        nn.Linear(config.hidden_dim, config.output_dim),
    )


class KVzapSurrogate(nn.Module):
    """Per-layer KVzap scorer. ``layers[l]`` is a plain module: ``[..., D] -> [..., H_kv]`` log-scores."""

    def __init__(self, config: KVzapConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(_layer_module(config) for _ in range(config.n_modules))

    @property
    def kind(self) -> str:
        return self.config.kind

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Training API: ``[N, L, D] -> [N, L, H_kv]``, layer ``l``'s module applied to column ``l``."""
        return torch.stack([layer(hidden_states[:, idx]) for idx, layer in enumerate(self.layers)], dim=1)

    def score(self, hidden_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Log-scores ``[T, H_kv]`` of ``hidden_states [T, D]`` (post-norm attention inputs of layer ``layer_idx``).

        Runs in the hidden states' dtype and device, as kvpress does (scores are bf16 for a bf16 model, method
        notes §3.1). Casting per call costs a copy of one layer's weights; a server that scores every forward
        should instead move the surrogate once (``surrogate.to(device, dtype)``) and call ``layers[l]``.
        """
        layer = self.layers[layer_idx]
        weight = next(layer.parameters())
        if weight.dtype != hidden_states.dtype or weight.device != hidden_states.device:
            layer = _cast_copy(layer, hidden_states)
        with torch.no_grad():
            return layer(hidden_states)

    def check_fits(self, num_layers: int, hidden_size: int, num_kv_heads: int, what: str = "the model") -> None:
        """Raise :class:`CheckpointError` naming both shapes when this surrogate was trained for another model."""
        expected = (num_layers, hidden_size, num_kv_heads)
        actual = (self.config.n_modules, self.config.input_dim, self.config.output_dim)
        if expected != actual:
            raise CheckpointError(
                f"surrogate (layers, hidden size, KV heads) = {actual} does not fit {what} {expected}: "
                "train one for this model with `kvzap-sglang train --model ... --kind linear|mlp --out DIR`"
            )

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        tensors = {name: value.detach().float().contiguous().cpu() for name, value in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> KVzapSurrogate:
        """Load a kvpress-layout folder; any malformed file, key, shape, dtype or non-finite weight raises
        :class:`CheckpointError` (a ``ValueError``) naming the file."""
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} does not exist: not a KVzap checkpoint folder")
        config = KVzapConfig.from_json(_read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
        tensors = _read_tensors(path / WEIGHTS_FILE)
        expected = _expected_tensors(cls, config, path / CONFIG_FILE)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: weights do not match a {config.kind} KVzap layout "
                f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
            )
        for name, value in tensors.items():
            where = f"{path / WEIGHTS_FILE}: {name}"
            if value.shape != expected[name].shape:
                raise CheckpointError(f"{where} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
            if not value.is_floating_point():
                raise CheckpointError(f"{where} has dtype {value.dtype}, expected a float tensor")
            # A NaN/inf weight makes every score NaN/inf, and the policy then silently keeps or drops everything.
            if not torch.isfinite(value).all():
                raise CheckpointError(f"{where} holds NaN or infinite values")
        surrogate = cls(config)
        surrogate.load_state_dict({name: value.float() for name, value in tensors.items()})
        return surrogate.eval()


def _expected_tensors(cls: type[KVzapSurrogate], config: KVzapConfig, source: Path) -> dict[str, torch.Tensor]:
    # Shapes only, on the meta device: absurd sizes in config.json must not be allocated before the check.
    try:
        with torch.device("meta"):
            return cls(config).state_dict()
    except RuntimeError as error:
        raise CheckpointError(f"{source}: dimensions {config} are too large ({error})") from None


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None


def _cast_copy(layer: nn.Module, like: torch.Tensor) -> nn.Module:
    import copy

    return copy.deepcopy(layer).to(device=like.device, dtype=like.dtype)


def bundled_checkpoint(model_name: str, kind: str) -> Path:
    """Folder of the surrogate shipped in the package for an embedded model (e.g. ``smollm2-135m``, ``mlp``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown surrogate kind {kind!r}; expected one of {KINDS}")
    path = BUNDLED_CHECKPOINTS / model_name / kind
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no bundled {kind} surrogate for {model_name!r}; pass a checkpoint folder or train one with "
            f"`kvzap-sglang train --model {model_name} --kind {kind} --out DIR`"
        )
    return path
