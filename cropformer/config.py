"""Typed configuration: plain JSON files read into dataclasses, once, at the edge.

Every hyper-parameter of SPEC.md sections 1-5 has a field here with the original's value as its
default (Swin-T CropFormer, 3x schedule). A JSON file names only what differs from these defaults;
unknown or misspelled keys are errors naming the key and the file, and values are type-checked.
``--set a.b=value`` overrides go through the same checks. Modules never see this object: builders
read it and pass keyword arguments (STYLE.md practice 3).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # a link to the repo's configs/, shipped in the wheel


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.3
    patch_size: int = 4
    patch_norm: bool = True


@dataclass
class HorNetConfig:
    base_dim: int = 192
    depths: tuple[int, ...] = (2, 3, 18, 2)
    drop_path_rate: float = 0.6
    layer_scale_init_value: float = 1e-6


@dataclass
class ResNetConfig:
    depth: int = 50
    norm: str = "FrozenBN"
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    stride_in_1x1: bool = False


@dataclass
class BackboneConfig:
    name: Literal["swin", "hornet", "resnet"] = "swin"
    swin: SwinConfig = field(default_factory=SwinConfig)
    hornet: HorNetConfig = field(default_factory=HorNetConfig)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    use_checkpoint: bool = False  # activation checkpointing, for high resolution training


@dataclass
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8  # the original reads MASK_FORMER.NHEADS here
    num_points: int = 4
    num_layers: int = 6
    ffn_dim: int = 1024  # hard-coded in the original
    dropout: float = 0.0
    norm: str = "GN"
    common_stride: int = 4
    deform_features: tuple[str, ...] = ("res3", "res4", "res5")
    fp32: bool = True  # the original runs the pixel decoder in fp32 even under AMP


@dataclass
class DecoderConfig:
    """Image decoder (and the batch decoder, which shares its weights)."""

    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 10  # the original's DEC_LAYERS: predictions; transformer layers = dec_layers - 1
    pre_norm: bool = False
    dropout: float = 0.0


@dataclass
class AssociationConfig:
    num_layers: int = 1
    nheads: int = 8
    dim_feedforward: int = 2048
    pre_norm: bool = False


@dataclass
class ModelConfig:
    meta_architecture: Literal["cropformer", "mask2former"] = "cropformer"
    num_classes: int = 1  # class-agnostic: entity vs no-object
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    # Kernel backends ("auto" picks the fastest available; see cropformer/ops).
    msda_backend: str = "auto"
    attn_backend: str = "auto"


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    image_level_scale: float = 0.5  # CropFormer: image-level terms x0.5 (Mask2Former baseline: 1.0)


@dataclass
class InputConfig:
    min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    random_flip: Literal["horizontal", "none"] = "horizontal"
    crop_ratio: float = 0.7  # per side (about 0.49 of the area)
    crop_sample_num_train: int = 1
    crop_sample_num_test: int = 4


@dataclass
class DataConfig:
    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    filter_empty: bool = True  # drop training images without annotations, as the original
    num_workers: int = 4
    on_bad_image: Literal["skip", "fatal"] = "skip"


@dataclass
class SolverConfig:
    optimizer: Literal["adamw"] = "adamw"
    base_lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_multiplier: float = 0.1
    clip_gradients: bool = True
    clip_value: float = 0.01  # full-model L2 norm
    schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 0.9
    steps: tuple[int, ...] = (30525, 33138)  # used only by schedule="step" (ignored by the original)
    gamma: float = 0.1
    warmup_iters: int = 0
    max_iter: int = 34375
    ims_per_batch: int = 16
    amp: bool = True
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    checkpoint_period: int = 5000


@dataclass
class TestConfig:
    mode: Literal["full_crops", "full_batch", "full_image", "crops", "single"] = "full_crops"
    score_mode: Literal["mean_prob", "original"] = "mean_prob"
    mask_threshold: float = 0.5
    min_area: int = 0
    score_threshold: float = 0.0
    eval_period: int = 0  # iterations between evaluations during training (0 = only at the end)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    output_dir: str = "output"
    seed: int = 0
    log_period: int = 20


# --------------------------------------------------------------------------------------------------
# JSON <-> dataclasses with type checking


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _from_dict(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.lower() == key.lower() or n.startswith(key[:4])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {sorted(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain JSON-serialisable dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Value ranges the types alone do not say: (section, field) -> (low, high); a float range excludes low.
_RANGES = {("input", "crop_sample_num_test"): (0, 4), ("input", "crop_sample_num_train"): (0, 4),
           ("input", "crop_ratio"): (0.0, 1.0)}


def from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _from_dict(Config, data, source)
    for (section, name), (lo, hi) in _RANGES.items():
        value = getattr(getattr(cfg, section), name)
        if not (lo <= value <= hi) or (isinstance(lo, float) and value == lo):
            span = f"{lo}..{hi}" if isinstance(lo, int) else f"in ({lo}, {hi}]"
            raise ConfigError(f"{source}: {section}.{name} must be {span}, got {value}")
    return cfg


def resolve_path(name_or_path: str) -> Path:
    """A config path, or a config name looked up in `configs/` (with or without `.json`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"config {name_or_path!r} not found (not a file, and not in {CONFIG_DIR}: {known})")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_json(path: Path, seen: tuple = ()) -> dict:
    """Read a config file; `"_base_": "other.json"` inherits from another config in the same folder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a JSON config (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    data.pop("_comment", None)  # free text for people; the only key besides _base_ outside the schema
    base = data.pop("_base_", None)
    if base is not None:
        base_path = (path.parent / base).resolve()
        if base_path in seen:
            raise ConfigError(f"{path}: _base_ cycle through {base_path}")
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ {base!r} not found")
        data = _merge(_read_json(base_path, seen + (base_path,)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is JSON when it parses as JSON, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config file (path or name in `configs/`) and apply `--set a.b=value` overrides."""
    path = resolve_path(name_or_path)
    return _apply_overrides(_read_json(path), overrides, str(path))


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], source: str = "config") -> Config:
    """A copy of `cfg` with `--set a.b=value` overrides applied (e.g. to the config a checkpoint stores)."""
    return _apply_overrides(to_dict(cfg), overrides, source)


def _apply_overrides(data: dict, overrides, where: str) -> Config:
    path = where
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
        where = f"{path} (with --set overrides)"
    # Validate overrides against the schema with their own name in the message.
    for item in overrides:
        keys, value = parse_override(item)
        _validate_key(keys, value, item)
    return from_dict(data, where)


def _validate_key(keys: list[str], value: Any, item: str) -> None:
    cls = Config
    for i, k in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i])} is not a section")
        hints = typing.get_type_hints(cls)
        if k not in hints:
            raise ConfigError(f"--set {item!r}: unknown key {'.'.join(keys[: i + 1])!r}")
        cls = hints[k]
    _check_value(value, cls, f"--set {item}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
