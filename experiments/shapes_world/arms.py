"""The experiment's arms and sizes, and the scripts/train.py command line of one arm x seed.

Every arm fine-tunes the same base world with ``configs/goal.py:demo`` plus explicit overrides
of every field the experiment relies on (the demo preset's own values are never relied on), the
same steps, batch, data, learning rate and seeds; arms differ only in the loss switches below.

Arms (``ARM_SPECS``; α, β relative to the paper's α = 1e-2, β = 1e-3 times the size's
``main_scale``, the weights the ablations use):

  ldm_only        α = β = 0 (the paper's "LDM-only fine-tune").
  goal            L_LDM + α L_DSA + β L_MAA, MAAlign on the decoder's 8x8 maps (up, 8: the
                  world's analogue of the paper's decoder 16x16 choice; the world U-Net has
                  cross-attention at 8x8 only).
  no_maalign      DSAlign only (β = 0).            no_dsalign    MAAlign only (α = 0).
  dsalign_local   D_local only (Table 6).          dsalign_global  D_global only (Table 6).
  maalign_mid8    MAAlign on the mid block 8x8 maps (Table 7).
  maalign_down8   MAAlign on the encoder 8x8 maps (Table 7).
  ldm_only_unet   LDM-only, every U-Net parameter trainable (``TRAINABLE_SETS["unet"]``).
  goal_unet       GOAL, every U-Net parameter trainable: does a larger trainable set than
                  the paper's fusers + attn1 + attn2 let the losses change what is drawn?
  goal_x<f>       GOAL with α, β = f x the paper's (the sweep; ``sweep_scales``).
  goal_bal<r>     GOAL with α = r x |∇L_LDM| / |∇L_DSA| and β = r x |∇L_LDM| / |∇L_MAA|,
                  the gradient-norm ratios measured at the base world (scales.py, decoder
                  part): each alignment term pulls with r times the LDM term's strength
                  (``balance_sweep``). With ``main_balance`` = r the ablations use these
                  weights instead of the paper's.

Sizes: ``smoke`` (two arms x one seed x a few steps: CI) and ``full`` (the reported run).
"""

from __future__ import annotations

import dataclasses
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_ALPHA, PAPER_BETA = 1e-2, 1e-3
# Trainable sets (regexes on "/"-joined U-Net parameter paths, train.trainable_patterns):
# "paper" is the demo preset's own (GLIGEN fusers + attn1 + attn2, goal_jax.train's
# PAPER_TRAINABLE; not overridden, so the records of runs made before this field existed still
# match); "unet" is every parameter of the U-Net, its position net included.
TRAINABLE_SETS = {"paper": None, "unet": (".",)}
CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "complex")


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """One arm: ``alpha_scale`` / ``beta_scale`` multiply the paper's α / β (0 = term off);
    ``preset``: the configs/goal.py ablation named in the config string (traceability; every
    field is also overridden explicitly)."""

    name: str
    about: str
    alpha_scale: float = 1.0
    beta_scale: float = 1.0
    dsa_local: bool = True
    dsa_global: bool = True
    maa_part: str = "up"
    preset: str = ""
    balance: float | None = None
    trainable: str = "paper"


def arm_weights(spec: ArmSpec, balance: dict | None) -> tuple[float, float]:
    """(α, β) of an arm: the paper's times the arm's scales, or, for a ``balance`` arm,
    ``spec.balance`` x the measured balance weights ``balance`` = {"alpha", "beta"} (a term
    whose scale is 0 stays off); 3 significant digits."""
    if spec.balance is None:
        return PAPER_ALPHA * spec.alpha_scale, PAPER_BETA * spec.beta_scale
    if not balance or not balance.get("alpha") or not balance.get("beta"):
        raise ValueError(f"arm {spec.name} weighs the losses by the measured loss scales, "
                         f"which are missing ({balance})")
    a = spec.balance * balance["alpha"] if spec.alpha_scale else 0.0
    b = spec.balance * balance["beta"] if spec.beta_scale else 0.0
    return float(f"{a:.3g}"), float(f"{b:.3g}")


def arm_specs(main_scale: float, sweep_scales=(), main_balance: float | None = None,
              balance_sweep=()) -> dict[str, ArmSpec]:
    """All arms for a size: the ablations use ``main_scale`` x the paper's weights (or, when
    ``main_balance`` is set, the balance weights times it); one ``goal_x<f>`` arm per sweep
    scale f (other than ``main_scale``, which is ``goal``) and one ``goal_bal<r>`` per
    ``balance_sweep`` value r."""
    m = float(main_scale)
    specs = [
        ArmSpec("ldm_only", "LDM-only fine-tune (α = β = 0)", 0.0, 0.0, preset="ldm_only"),
        ArmSpec("goal", "GOAL: LDM + DSAlign (local + global) + MAAlign (decoder 8x8)", m, m),
        ArmSpec("no_maalign", "LDM + DSAlign only", m, 0.0, preset="no_maalign"),
        ArmSpec("no_dsalign", "LDM + MAAlign only", 0.0, m, preset="no_dsalign"),
        ArmSpec("dsalign_local", "GOAL with D_local only", m, m, dsa_global=False,
                preset="dsalign_local"),
        ArmSpec("dsalign_global", "GOAL with D_global only", m, m, dsa_local=False,
                preset="dsalign_global"),
        ArmSpec("maalign_mid8", "GOAL, MAAlign on the mid block 8x8 maps", m, m,
                maa_part="mid", preset="maalign_mid8"),
        ArmSpec("maalign_down8", "GOAL, MAAlign on the encoder 8x8 maps", m, m,
                maa_part="down"),
        ArmSpec("ldm_only_unet", "LDM-only fine-tune, every U-Net parameter trainable", 0.0,
                0.0, preset="ldm_only", trainable="unet"),
        ArmSpec("goal_unet", "GOAL, every U-Net parameter trainable", m, m, trainable="unet"),
    ]
    if main_balance is not None:
        specs = [dataclasses.replace(s, balance=float(main_balance),
                                     alpha_scale=float(bool(s.alpha_scale)),
                                     beta_scale=float(bool(s.beta_scale))) for s in specs]
    for f in sweep_scales:
        if float(f) != m or main_balance is not None:
            specs.append(ArmSpec(f"goal_x{f:g}", f"GOAL with α, β = {f:g} x the paper's",
                                 float(f), float(f)))
    for r in balance_sweep:
        if main_balance is None or float(r) != float(main_balance):
            specs.append(ArmSpec(f"goal_bal{r:g}", f"GOAL with each alignment term's gradient "
                                 f"at {r:g} x the LDM term's (measured)", balance=float(r)))
    return {s.name: s for s in specs}


@dataclasses.dataclass(frozen=True)
class Size:
    """How big the experiment is. Training: ``steps`` of batch ``batch_size`` at
    ``learning_rate`` (AdamW, constant); data: ``finetune_items`` world items; evaluation:
    ``eval_per_category`` layouts per category, sampled with DDIM ``sample_steps`` steps, CFG
    ``guidance_scale``, grounding for the first ``sample_beta`` of the steps;
    ``scale_batches`` batches for the loss-scale measurement of the MAAlign ``scale_parts``."""

    name: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    batch_size: int
    learning_rate: float
    finetune_items: int
    eval_per_category: int
    sample_steps: int
    guidance_scale: float
    sample_beta: float
    scale_batches: int
    main_scale: float = 1.0
    sweep_scales: tuple[float, ...] = ()
    main_balance: float | None = None
    balance_sweep: tuple[float, ...] = ()
    scale_parts: tuple[str, ...] = ("up", "mid", "down")
    log_every: int = 10
    checkpoint_every: int = 0

    def specs(self) -> dict[str, ArmSpec]:
        every = arm_specs(self.main_scale, self.sweep_scales, self.main_balance,
                          self.balance_sweep)
        unknown = [a for a in self.arms if a not in every]
        if unknown:
            raise ValueError(f"size {self.name!r}: unknown arms {unknown}; known {list(every)}")
        return {a: every[a] for a in self.arms}


ALL_ARMS = ("ldm_only", "goal", "no_maalign", "no_dsalign", "dsalign_local", "dsalign_global",
            "maalign_mid8", "maalign_down8", "ldm_only_unet", "goal_unet")
SWEEP = (10.0, 100.0)
BALANCE_SWEEP = (0.1, 1.0)

SIZES = {
    "smoke": Size("smoke", arms=("ldm_only", "goal"), seeds=(0,), steps=3, batch_size=2,
                  learning_rate=1e-4, finetune_items=24, eval_per_category=1, sample_steps=2,
                  guidance_scale=5.0, sample_beta=1.0, scale_batches=1, scale_parts=("up",),
                  log_every=1),
    "full": Size("full", arms=ALL_ARMS + tuple(f"goal_x{f:g}" for f in SWEEP)
                 + tuple(f"goal_bal{r:g}" for r in BALANCE_SWEEP),
                 seeds=(0, 1, 2), steps=200, batch_size=8, learning_rate=1e-4,
                 finetune_items=2000, eval_per_category=32, sample_steps=15,
                 guidance_scale=5.0, sample_beta=1.0, scale_batches=8, sweep_scales=SWEEP,
                 balance_sweep=BALANCE_SWEEP,
                 log_every=10, checkpoint_every=100),
}

# The fine-tuning set's category mix (GOAL2K-like: weighted to binding and multi-object).
FINETUNE_MIX = {"color": 0.25, "shape": 0.15, "texture": 0.20, "spatial": 0.20,
                "counting": 0.05, "complex": 0.15}


def run_overrides(spec: ArmSpec, size: Size, seed: int, world: dict, data_source: str,
                  data_dir: str, cache_dir: str, num_devices: int = 1,
                  balance: dict | None = None) -> dict:
    """{config field: value} of one arm x seed: every field the experiment relies on
    (``balance``: the measured balance weights, for :func:`arm_weights`).

    ``world``: {"pipeline", "clip", "resolution", "max_boxes", "maa_resolution"} of the base
    world (run.world_info; maa_resolution is 8 for the shipped world, 4 for the 32 px smoke
    world of the tests)."""
    alpha, beta = arm_weights(spec, balance)
    return {
        "demo_models": False,
        "num_devices": num_devices,
        "compilation_cache": cache_dir,
        "train.model.pipeline": world["pipeline"],
        "train.model.clip": world["clip"],
        "train.seed": seed,
        "train.steps": size.steps,
        "train.per_device_batch_size": size.batch_size,
        "train.alpha": alpha,
        "train.beta": beta,
        "train.dsa_local": spec.dsa_local,
        "train.dsa_global": spec.dsa_global,
        "train.dsa_region": "mask",
        "train.maa_part": spec.maa_part,
        "train.maa_resolution": world["maa_resolution"],
        "train.caption_dropout": 0.0,
        "train.grounding_dropout": 0.0,
        "train.gligen_scale": 1.0,
        "train.dtype": "float32",
        "train.remat": False,
        "train.train_position_net": False,
        "train.encoded_box_slots": 0,
        "train.encoded_phrase_tokens": 0,
        "train.optimizer.learning_rate": size.learning_rate,
        "train.optimizer.warmup_steps": 0,
        "train.optimizer.weight_decay": 0.0,
        "train.optimizer.grad_clip_norm": 0.0,
        "train.optimizer.grad_accum_steps": 1,
        "data.source": data_source,
        "data.data_dir": data_dir,
        "data.shapes_items": 0,
        "data.resolution": world["resolution"],
        "data.max_boxes": world["max_boxes"],
        "data.flip": True,
        "data.random_crop": False,
        "data.min_box_size": 0.001,
        "data.shuffle": True,
        "data.seed": seed,
        "checkpoint.every_steps": size.checkpoint_every,
        "checkpoint.max_to_keep": 1,
        "checkpoint.async_save": False,
        "log.every_steps": size.log_every,
        "log.progress": False,
        "sample.every_steps": 0,
    } | ({} if TRAINABLE_SETS[spec.trainable] is None
         else {"train.trainable_patterns": TRAINABLE_SETS[spec.trainable]})


def trainable_patterns(overrides: dict) -> tuple[str, ...]:
    """The regexes of a run's trainable U-Net parameters from its config ``overrides``
    (:func:`run_overrides`, or a results.json record of them): the paper's set unless the arm
    overrides ``train.trainable_patterns`` (the position net stays frozen, as in the demo
    preset)."""
    from goal_jax import train as train_lib

    return tuple(overrides.get("train.trainable_patterns") or train_lib.PAPER_TRAINABLE)


def load_goal_config(arg: str):
    """``configs/goal.py``'s ``get_config(arg)`` (the configs folder is not a package)."""
    import importlib.util

    path = os.path.join(REPO, "configs", "goal.py")
    module_spec = importlib.util.spec_from_file_location("_goal_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def apply_overrides(config, overrides: dict) -> None:
    """goal_jax.loop.apply_overrides (values typed as on the command line)."""
    from goal_jax import loop

    loop.apply_overrides(config, overrides)


def config_string(spec: ArmSpec, repo: str) -> str:
    return os.path.join(repo, "configs", "goal.py") + ":demo" + (
        f",{spec.preset}" if spec.preset else "")


def train_command(spec: ArmSpec, overrides: dict, workdir: str, repo: str) -> list[str]:
    """``python scripts/train.py --config configs/goal.py:demo[,<ablation>] --workdir ...
    --config.<field>=<value> ...``; the trainable set is checked after the run (the
    preset's default, the paper's fusers + attn1 + attn2)."""
    cmd = [sys.executable, os.path.join(repo, "scripts", "train.py"),
           "--config", config_string(spec, repo), "--workdir", workdir]
    for key, value in overrides.items():
        cmd.append(f"--config.{key}={_flag_value(value)}")
    return cmd


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    return str(value)
