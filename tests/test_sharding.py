"""Sharded GOAL train step on 8 simulated CPU devices (tests/conftest.py sets the XLA flag):
data-parallel (mesh 8x1) and fsdp (mesh 2x4, parameters split over 'fsdp') equal the
single-device step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from goal_jax import sharding, train
from tests.reference import tiny

TOL = 1e-5
STEPS = 3


def test_mesh_and_specs():
    assert jax.device_count() == 8
    mesh = sharding.create_mesh(fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="data=3 x fsdp=2 = 6 != 8 devices"):
        sharding.create_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide the 8 devices"):
        sharding.create_mesh(fsdp=3)
    assert sharding.param_spec((64, 32), 4, "replicated") == P()
    assert sharding.param_spec((64, 32), 4, "fsdp", min_size=16) == P("fsdp", None)
    assert sharding.param_spec((6, 32), 4, "fsdp", min_size=16) == P(None, "fsdp")
    assert sharding.param_spec((6, 6), 4, "fsdp", min_size=16) == P()  # nothing divisible
    assert sharding.param_spec((64, 32), 4, "fsdp", min_size=10 ** 6) == P()  # small: replicated
    with pytest.raises(ValueError, match="'replicated' or 'fsdp'"):
        sharding.param_spec((64,), 4, "tensor")
    batch = sharding.put_batch({"x": np.arange(16, dtype=np.float32).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert len(batch["x"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16).reshape(8, 2))
    with pytest.raises(ValueError, match=r"batch\['x'\]: global batch size 6 is not divisible"):
        sharding.put_batch({"x": np.zeros((6, 2))}, mesh)
    sharding.initialize_distributed(False)  # no-op unless requested
    cfg = train.default_train_config()
    cfg.sharding.fsdp = 2
    assert dict(sharding.mesh_from_config(cfg.sharding).shape) == {"data": 4, "fsdp": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    folder = str(tmp_path_factory.mktemp("goal_models_sharding"))
    tiny.build(folder, tokenizer_dir, seed=1)
    models, params = tiny.load_jax(folder, tokenizer_dir)
    batch = tiny.make_batch(tokenizer_dir, max_boxes=3, seed=4, captions=tiny.CAPTIONS * 4,
                            phrases=tiny.PHRASES * 4, boxes=tiny.BOXES * 4)
    cfg = train.default_train_config()
    cfg.caption_dropout = 0.25  # exercise the dropout draws under sharding too
    opt, lr_schedule = train.make_optimizer(cfg)
    state, frozen = train.create_train_state(jax.tree_util.tree_map(jnp.copy, params), cfg, opt,
                                             jax.random.PRNGKey(7))
    state = state.replace(params=jax.tree_util.tree_map(np.array, state.params))  # host copy
    step = train.make_train_step(models, cfg, opt, lr_schedule)
    single, metrics = state, []
    for _ in range(STEPS):
        single, m = step(single, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        metrics.append({k: float(v) for k, v in m.items()})
    return dict(models=models, params=params, batch=batch, cfg=cfg, opt=opt,
                lr_schedule=lr_schedule, single=single, frozen=frozen, metrics=metrics,
                initial=state)


def _sharded_run(s, data, fsdp, mode, min_size):
    cfg = s["cfg"]
    cfg.sharding.params = mode
    cfg.sharding.fsdp_min_size = min_size
    mesh = sharding.create_mesh(data=data, fsdp=fsdp)
    params = jax.tree_util.tree_map(jnp.copy, s["params"])  # the step donates the state
    state, frozen = train.create_train_state(params, cfg, s["opt"], jax.random.PRNGKey(7))
    state, frozen = train.shard_state(state, frozen, mesh, mode, min_size)
    step = train.make_train_step(s["models"], cfg, s["opt"], s["lr_schedule"], mesh=mesh,
                                 example_state=state, example_frozen=frozen)
    metrics = []
    for _ in range(STEPS):
        state, m = step(state, frozen, sharding.put_batch(s["batch"], mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    return state, frozen, metrics


def _assert_equal(s, state, frozen, metrics, capsys, name):
    worst_param = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(s["single"].params),
                    jax.tree_util.tree_leaves(state.params)):
        worst_param = max(worst_param, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    worst_metric = 0.0
    for ms, mm in zip(s["metrics"], metrics):
        for k in ms:
            worst_metric = max(worst_metric, abs(ms[k] - mm[k]) / max(abs(ms[k]), 1e-12))
    with capsys.disabled():
        print(f"\n[{name}] max |param diff| {worst_param:.2e}, max metric rel diff "
              f"{worst_metric:.2e}")
    assert worst_param <= TOL and worst_metric <= TOL
    for a, b in zip(jax.tree_util.tree_leaves(s["frozen"]), jax.tree_util.tree_leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == STEPS


def test_data_parallel_step_equals_single_device(setup, capsys):
    state, frozen, metrics = _sharded_run(setup, 8, 1, "replicated", 2 ** 14)
    for leaf in (jax.tree_util.tree_leaves(state.params)[0], jax.tree_util.tree_leaves(frozen)[0]):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    _assert_equal(setup, state, frozen, metrics, capsys, "data-parallel 8x1")


def test_fsdp_step_equals_single_device(setup, capsys):
    state, frozen, metrics = _sharded_run(setup, 2, 4, "fsdp", 256)
    specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(state.params)]
    assert any("fsdp" in tuple(sp) for sp in specs)  # parameters really are split
    opt_specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(state.opt_state)]
    assert any("fsdp" in tuple(sp) for sp in opt_specs)
    frozen_specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(frozen)]
    assert any("fsdp" in tuple(sp) for sp in frozen_specs)
    _assert_equal(setup, state, frozen, metrics, capsys, "fsdp 2x4")


def test_single_device_steps_update_only_trainable(setup):
    """After STEPS jitted steps: the frozen parameters (the step's non-donated second argument)
    still alive and bit-identical, no frozen array in the train state, every trainable tensor
    moved, optimizer state only over the trainable parameters, metrics finite."""
    params, single = setup["params"], setup["single"]
    assert int(single.step) == STEPS
    frozen_unet = train.partition_params(params["unet"], train.PAPER_TRAINABLE)[1]
    before = {"unet": frozen_unet, "vae": params["vae"], "text_encoder": params["text_encoder"],
              "clip": params["clip"]}
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a),
                                                                   np.asarray(b))),
                                  before, setup["frozen"])
    assert all(jax.tree_util.tree_leaves(same))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(setup["frozen"]))
    assert [f.name for f in dataclasses.fields(single)] == ["step", "params", "opt_state", "rng"]
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                   setup["initial"].params, single.params)
    assert all(jax.tree_util.tree_leaves(moved))
    floats = [x.size for x in jax.tree_util.tree_leaves(single.opt_state)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(single.params))
    assert sum(floats) == 2 * n_train  # adam mu and nu of the trainable parameters only
    for m in setup["metrics"]:
        assert all(np.isfinite(v) for v in m.values())
        assert m["lr"] == pytest.approx(5e-5) and m["grad_norm"] > 0
