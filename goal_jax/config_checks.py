"""Checks of a training config (configs/goal.py), run before anything is loaded or compiled.

* :func:`check_override_keys` / :func:`apply_overrides`: ``--config.a.b=value`` overrides must
  name existing fields (with the closest known names when not) and keep the field's type.
* :func:`validate_config`: numbers in range, strings from their sets, model folders (or hub
  ids: an error when offline), the data source, the resolution against the VAE x U-Net
  downsampling and the MAAlign layers at that resolution. Every error is a ValueError whose
  message starts with ``config field <name>``.
* :func:`resolve_model_path`: a local folder for a folder or a Hugging Face hub id.
"""

from __future__ import annotations

import difflib
import os
import re

import ml_collections

def _fields(config, prefix="") -> list[str]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def check_override_keys(config: ml_collections.ConfigDict, keys) -> None:
    """Raises ValueError naming every key of ``keys`` ("train.steps", ...) that is not a field
    of ``config`` (with the closest known fields)."""
    known = _fields(config)
    known_set = set(known) | {k.rsplit(".", 1)[0] for k in known if "." in k}
    bad = [k for k in keys if k not in known_set]
    if bad:
        lines = []
        for k in bad:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"unknown config field {k!r}{hint}")
        raise ValueError("; ".join(lines))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets ``{"train.steps": 100, ...}`` on ``config`` (unknown fields raise ValueError;
    values must have the field's type, as on the command line)."""
    check_override_keys(config, overrides)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config field {key!r}: {e}") from e


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (huggingface_hub's own switches)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(value: str, field: str, download: bool = False) -> str | None:
    """A local folder for ``value`` (a folder or a Hugging Face hub id).

    Returns the folder; for a hub id that is not downloaded returns None when ``download`` is
    False, else fetches it with huggingface_hub.snapshot_download. Raises ValueError naming
    ``field`` when the folder does not exist, or when the machine is offline for a hub id.
    """
    if not value:
        raise ValueError(f"config field {field} is empty: give a local model folder or a hub id")
    if os.path.isdir(value):
        return value
    if not HUB_ID.match(value) or value.startswith(("./", "../")):
        raise ValueError(f"config field {field}: folder not found: {value}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(value, local_files_only=True)
    except Exception:  # not in the local cache
        pass
    if is_offline():
        raise ValueError(
            f"config field {field}: {value!r} is not a local folder and this machine is offline "
            f"(HF_HUB_OFFLINE). Download it on a machine with internet (`huggingface-cli download "
            f"{value} --local-dir <folder>`) and pass --config.{field}=<folder>")
    if not download:
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(value)
    except Exception as e:
        raise ValueError(
            f"config field {field}: cannot download {value!r} from the Hugging Face hub ({e}). "
            f"Download it elsewhere (`huggingface-cli download {value} --local-dir <folder>`) "
            f"and pass --config.{field}=<folder>") from e




def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks ``config`` (raises ValueError naming the field); ``num_devices``: devices present.

    Hub ids not downloaded yet skip the model checks (they run again once downloaded).
    """
    check_numbers(config, num_devices)
    check_data(config)
    check_models(config)


def check_numbers(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Ranges of the numbers and the sets of the strings of ``train``, ``checkpoint``, ``log``,
    ``sample`` and ``num_devices``."""
    t, d = config.train, config.data
    _check(t.steps >= 1, f"config field train.steps must be >= 1, got {t.steps}")
    _check(t.per_device_batch_size >= 1,
           f"config field train.per_device_batch_size must be >= 1, got {t.per_device_batch_size}")
    for key in ("alpha", "beta"):
        _check(t[key] >= 0, f"config field train.{key} must be >= 0, got {t[key]}")
    _check(t.optimizer.learning_rate > 0,
           f"config field train.optimizer.learning_rate must be > 0, got "
           f"{t.optimizer.learning_rate}")
    for key in ("caption_dropout", "grounding_dropout"):
        _check(0 <= t[key] < 1, f"config field train.{key} must be in [0, 1), got {t[key]}")
    _check(t.dtype in ("float32", "bfloat16", "float16"),
           f"config field train.dtype must be float32, bfloat16 or float16, got {t.dtype!r}")
    _check(t.dsa_region in ("mask", "crop"),
           f"config field train.dsa_region must be 'mask' or 'crop', got {t.dsa_region!r}")
    _check(t.maa_part in ("down", "mid", "up"),
           f"config field train.maa_part must be 'down', 'mid' or 'up', got {t.maa_part!r}")
    _check(t.alpha == 0 or t.dsa_local or t.dsa_global,
           "config fields train.dsa_local and train.dsa_global are both off while train.alpha > 0"
           "; set train.alpha=0 to disable DSAlign")
    _check(0 <= t.encoded_phrase_tokens <= 77,
           f"config field train.encoded_phrase_tokens must be in [0, 77] (0 = all tokens), got "
           f"{t.encoded_phrase_tokens}")
    _check(0 <= t.encoded_box_slots <= d.max_boxes,
           f"config field train.encoded_box_slots must be in [0, data.max_boxes={d.max_boxes}] "
           f"(0 = all slots), got {t.encoded_box_slots}")
    _check(config.checkpoint.every_steps >= 0, "config field checkpoint.every_steps must be >= 0")
    _check(config.checkpoint.max_to_keep >= 1, "config field checkpoint.max_to_keep must be >= 1")
    _check(config.log.every_steps >= 1, "config field log.every_steps must be >= 1")
    _check(config.sample.every_steps >= 0, "config field sample.every_steps must be >= 0")
    _check(config.num_devices >= 0, "config field num_devices must be >= 0")
    if num_devices is not None and config.num_devices:
        _check(config.num_devices <= num_devices,
               f"config field num_devices={config.num_devices} but only {num_devices} devices "
               "are present")


def check_data(config: ml_collections.ConfigDict) -> None:
    """The ``data`` section and the fixed ``sample.layouts``."""
    from goal_jax import layout as layout_lib

    d = config.data
    _check(d.resolution >= 8, f"config field data.resolution must be >= 8, got {d.resolution}")
    _check(1 <= d.max_boxes <= 30, f"config field data.max_boxes must be in [1, 30], got "
                                   f"{d.max_boxes}")
    _check(0 <= d.min_box_size < 1, "config field data.min_box_size must be in [0, 1)")
    _check(d.shapes_items >= 0, "config field data.shapes_items must be >= 0")
    if d.source and not d.shapes_items:
        _check(os.path.isdir(d.source), f"config field data.source: folder not found: {d.source}")
    if not d.source and not d.shapes_items and not config.demo_models:
        _check(bool(d.data_dir) and os.path.isdir(d.data_dir),
               "config fields data.source and data.data_dir: give data.source (a dataset folder "
               "in the on-disk format) or data.data_dir (a TFDS dir with a built goal2k)")
    for i, text in enumerate(config.sample.layouts):
        try:
            layout_lib.parse_json(text, name=f"sample.layouts[{i}]")
        except ValueError as e:
            raise ValueError(f"config field sample.layouts[{i}]: {e}") from e


def check_models(config: ml_collections.ConfigDict) -> None:
    """Model folders, the resolution against the downsampling and the MAAlign layers."""
    from goal_jax.models import unet as unet_lib

    t, d = config.train, config.data
    if not config.demo_models:
        resolve_model_path(t.model.clip, "train.model.clip")
    models = _model_configs(config)
    if models is None:  # hub id to be downloaded at start: checked again after download
        return
    unet, vae_factor = models
    factor = vae_factor * 2 ** (unet.num_levels - 1)
    _check(d.resolution % factor == 0,
           f"config field data.resolution={d.resolution} is not divisible by {factor} (the VAE "
           f"downsamples {vae_factor}x and the U-Net {2 ** (unet.num_levels - 1)}x more)")
    if t.beta and not t.maa_layers:
        try:
            unet_lib.cross_attention_layers(unet, t.maa_part, t.maa_resolution,
                                            sample_size=d.resolution // vae_factor)
        except ValueError as e:
            raise ValueError(f"config fields train.maa_part/train.maa_resolution: {e}") from e


def _model_configs(config):
    """(unet config, vae downsample factor) from the pipeline folder or the demo configs;
    None when the pipeline is a hub id not downloaded yet."""
    from goal_jax.models import unet as unet_lib
    from goal_jax.models import vae as vae_lib

    if config.demo_models:
        from goal_jax import demo_models

        res = config.data.resolution
        unet = unet_lib.UNet2DConditionConfig.from_dict(demo_models.unet_config_dict(res // 4))
        return unet, vae_lib.AutoencoderKLConfig.from_dict(
            demo_models.vae_config_dict(res)).downsample_factor
    path = resolve_model_path(config.train.model.pipeline, "train.model.pipeline")
    if path is None:
        return None
    from goal_jax import weights

    for sub in ("unet", "vae"):
        _check(os.path.isdir(os.path.join(path, sub)),
               f"config field train.model.pipeline: {path} has no {sub}/ subfolder (expected a "
               "diffusers GLIGEN pipeline folder)")
    unet = unet_lib.UNet2DConditionConfig.from_dict(
        weights.read_config(os.path.join(path, "unet")), source=os.path.join(path, "unet"))
    vae = vae_lib.AutoencoderKLConfig.from_dict(
        weights.read_config(os.path.join(path, "vae")), source=os.path.join(path, "vae"))
    return unet, vae.downsample_factor


