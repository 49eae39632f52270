"""goal_jax.checkpoints with the train state: what a checkpoint stores (what trains, never the
frozen params) and the restore of checkpoints written before the frozen params left
TrainState (their ``frozen`` entry is an empty node)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from goal_jax import checkpoints, train


@flax.struct.dataclass
class TrainStateWithFrozen:
    """goal_jax.train.TrainState as it was before this change (the loop saved frozen=None)."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def _state(seed: int) -> train.TrainState:
    rng = np.random.default_rng(seed)
    params = {"conv_out": {"bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
                           "kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)}}
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = jax.tree_util.tree_map(lambda x: x + seed if x.dtype == jnp.float32 else x,
                                       opt_state)
    return train.TrainState(step=jnp.int32(seed), params=params, opt_state=opt_state,
                            rng=jax.random.PRNGKey(seed))


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == 9  # step, 2 params, adam count + 2 mu + 2 nu, rng
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_stores_what_trains_only(tmp_path):
    saved = _state(5)
    with checkpoints.CheckpointManager(str(tmp_path / "ckpt"), async_save=False) as manager:
        manager.save(5, saved, {"epoch": 1}, {"reason": "final"})
        stored = manager.restore_arrays(5)
        assert sorted(stored) == ["opt_state", "params", "rng", "step"]
        restored = manager.restore(_state(0))
    assert restored.step == 5 and restored.data_state == {"epoch": 1}
    assert isinstance(restored.state, train.TrainState)
    _assert_same(saved, restored.state)


def test_checkpoint_of_the_layout_with_frozen_restores(tmp_path):
    new = _state(3)
    old = TrainStateWithFrozen(step=new.step, params=new.params, frozen=None,
                               opt_state=new.opt_state, rng=new.rng)
    with checkpoints.CheckpointManager(str(tmp_path / "ckpt"), async_save=False) as manager:
        manager.save(3, old, {"epoch": 2})
        assert sorted(manager.restore_arrays(3)) == ["frozen", "opt_state", "params", "rng",
                                                     "step"]
        restored = manager.restore(_state(0))
    assert restored.step == 3 and restored.data_state == {"epoch": 2}
    assert isinstance(restored.state, train.TrainState)
    _assert_same(new, restored.state)


def test_trained_unet_and_base_pipeline_name_a_missing_folder_or_step(tmp_path):
    """weights.load_trained_unet and weights.base_pipeline_of open checkpoints through one
    helper: the same errors for a missing folder and a missing step."""
    import pytest

    from goal_jax import weights

    folder = str(tmp_path / "ckpt")
    base = tmp_path / "base"
    base.mkdir()
    with checkpoints.CheckpointManager(folder, async_save=False) as manager:
        manager.save(2, _state(2), metadata={"pipeline": str(base)})
    missing = str(tmp_path / "nowhere")
    base_unet = {"conv_out": {"bias": np.zeros(4, np.float32),
                              "kernel": np.zeros((3, 3, 2, 4), np.float32)}}
    for call in (lambda c, s: weights.load_trained_unet(c, base_unet, s),
                 weights.base_pipeline_of):
        with pytest.raises(weights.CheckpointError, match=f"checkpoint folder not found: "
                                                          f"{missing}$"):
            call(missing, None)
        with pytest.raises(weights.CheckpointError, match=r"no checkpoint for step 5 in .*ckpt; "
                                                          r"steps present: \[2\]"):
            call(folder, 5)
    assert weights.base_pipeline_of(folder, 2) == str(base)
    params, info = weights.load_trained_unet(folder, base_unet, 2)
    assert (info["step"], info["replaced"], info["total"]) == (2, 2, 2)
    np.testing.assert_array_equal(params["conv_out"]["bias"], _state(2).params["conv_out"]["bias"])
