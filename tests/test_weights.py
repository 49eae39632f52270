"""Checkpoint I/O (goal_jax.weights) on tiny transformers CLIP checkpoints: names, layouts,
round trips, and every error path with the item it names."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from goal_jax import weights
from goal_jax.models import clip

TEXT_CONFIG = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=8, bos_token_id=48,
                   eos_token_id=49, pad_token_id=49)
CLIP_CONFIG = dict(
    text_config=TEXT_CONFIG,
    vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, image_size=16, patch_size=8),
    projection_dim=8,
)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A transformers CLIPTextModel folder (config.json + model.safetensors)."""
    folder = str(tmp_path_factory.mktemp("text"))
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(1)
    transformers.CLIPModel(transformers.CLIPConfig(**CLIP_CONFIG)).save_pretrained(folder)
    return folder


def _copy_config(src, dst):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)


def _flat(params):
    return {k: np.asarray(v) for k, v in weights.to_state_dict(params).items()}


# ----------------------------------------------------------------------------------------------
# Names, layouts and round trips.
# ----------------------------------------------------------------------------------------------


def test_torch_names_and_layouts():
    assert weights.torch_name(("text_model", "encoder", "layers_11", "self_attn", "q_proj",
                               "kernel")) == "text_model.encoder.layers.11.self_attn.q_proj.weight"
    assert weights.torch_name(("time_embedding", "linear_1", "bias")) == \
        "time_embedding.linear_1.bias"
    assert weights.torch_name(("vision_model", "pre_layrnorm", "scale")) == \
        "vision_model.pre_layrnorm.weight"
    assert weights.torch_name(("vision_model", "embeddings", "class_embedding")) == \
        "vision_model.embeddings.class_embedding"
    conv = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # torch [o, i, h, w]
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch [out, in]
    state = {"c.weight": conv, "d.weight": dense}
    shapes = {"c": {"kernel": np.zeros((4, 5, 3, 2))}, "d": {"kernel": np.zeros((3, 2))}}
    params = weights.convert_state_dict(state, shapes)
    np.testing.assert_array_equal(params["c"]["kernel"], conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["d"]["kernel"], dense.T)
    back = weights.to_state_dict(params)
    np.testing.assert_array_equal(back["c.weight"], conv)
    np.testing.assert_array_equal(back["d.weight"], dense)


def test_clip_round_trip_is_exact_and_transformers_loads_export(clip_dir, tmp_path):
    module, params = weights.load_clip(clip_dir)
    original = load_file(os.path.join(clip_dir, "model.safetensors"))
    exported = _flat(params)
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    out = str(tmp_path / "export")
    weights.write_safetensors(out, exported, module.config.to_dict(), "model")
    reloaded, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_array_equal(
        reloaded.text_projection.weight.detach().numpy(), original["text_projection.weight"])


def test_text_model_accepts_both_key_layouts(text_dir, tmp_path):
    """transformers >= 5 saves CLIPTextModel keys without ``text_model.``; SD-1.x
    text_encoder/ files (transformers 4) have it. Both load to the same params."""
    state = load_file(os.path.join(text_dir, "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in state)
    legacy = str(tmp_path / "legacy")
    _copy_config(text_dir, legacy)
    old = {"text_model." + k: v for k, v in state.items()}
    old["text_model.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]  # old buffer
    save_file(old, os.path.join(legacy, "model.safetensors"))
    _, new_params = weights.load_clip_text(text_dir)
    _, old_params = weights.load_clip_text(legacy)
    a, b = _flat(new_params), _flat(old_params)
    assert sorted(a) == sorted(b) and len(a) == len(state)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    both = dict(state, **{"text_model.final_layer_norm.bias": state["final_layer_norm.bias"]})
    with pytest.raises(ValueError, match="'text_model.final_layer_norm.bias' twice"):
        clip.rename_text_keys(both)


def test_torch_bin_loads_when_torch_is_present(text_dir, tmp_path):
    folder = str(tmp_path / "bin")
    _copy_config(text_dir, folder)
    state = load_file(os.path.join(text_dir, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()},
               os.path.join(folder, "pytorch_model.bin"))
    _, from_bin = weights.load_clip_text(folder)
    _, from_st = weights.load_clip_text(text_dir)
    a, b = _flat(from_bin), _flat(from_st)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bfloat16_checkpoint_loads_as_float32(text_dir, tmp_path):
    folder = str(tmp_path / "bf16")
    model = transformers.CLIPTextModel.from_pretrained(text_dir).to(torch.bfloat16)
    model.save_pretrained(folder)
    _, params = weights.load_clip_text(folder)
    _, ref = weights.load_clip_text(text_dir)
    a, b = _flat(params), _flat(ref)
    for k in a:
        assert a[k].dtype == np.float32
        # bf16 keeps 8 mantissa bits: relative error <= 2**-8.
        np.testing.assert_allclose(a[k], b[k], rtol=2 ** -8, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# Error paths: each names the path or the key.
# ----------------------------------------------------------------------------------------------


def test_missing_folder_and_missing_config(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(weights.CheckpointError, match=f"checkpoint folder not found: {missing}"):
        weights.load_clip(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(weights.CheckpointError,
                       match=f"missing config.json in checkpoint folder {empty}"):
        weights.load_clip_text(str(empty))


def test_unparsable_and_invalid_config(text_dir, tmp_path):
    folder = tmp_path / "bad_json"
    folder.mkdir()
    (folder / "config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(weights.CheckpointError, match=f"cannot parse {folder / 'config.json'}"):
        weights.load_clip_text(str(folder))
    config = json.loads(open(os.path.join(text_dir, "config.json")).read())
    config["num_hidden_layers"] = "two"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{folder}: config key 'num_hidden_layers' must be an "
                                         "integer, got 'two'"):
        weights.load_clip_text(str(folder))


def test_no_weights_file(text_dir, tmp_path):
    folder = str(tmp_path / "no_weights")
    _copy_config(text_dir, folder)
    with pytest.raises(weights.CheckpointError, match=f"no weights in {folder}: expected one of "
                                                      "model.safetensors"):
        weights.load_clip_text(folder)


def test_corrupted_safetensors(text_dir, tmp_path):
    folder = str(tmp_path / "corrupt")
    _copy_config(text_dir, folder)
    path = os.path.join(folder, "model.safetensors")
    with open(os.path.join(text_dir, "model.safetensors"), "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated file
    with pytest.raises(weights.CheckpointError, match=f"cannot read safetensors file {path}"):
        weights.load_clip_text(folder)
    with open(path, "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(weights.CheckpointError, match=f"cannot read safetensors file {path}"):
        weights.load_clip_text(folder)


def test_missing_unexpected_and_mismatched_keys_in_one_error(clip_dir, tmp_path):
    folder = str(tmp_path / "mismatch")
    _copy_config(clip_dir, folder)
    state = load_file(os.path.join(clip_dir, "model.safetensors"))
    del state["text_model.encoder.layers.0.mlp.fc1.bias"]
    state["text_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    state["visual_projection.weight"] = np.zeros((9, 16), np.float32)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with pytest.raises(weights.CheckpointError) as err:
        weights.load_clip(folder)
    message = str(err.value)
    assert message.startswith(f"{folder} does not match the model:")
    assert "missing keys (1): text_model.encoder.layers.0.mlp.fc1.bias" in message
    assert "unexpected keys (1): text_model.extra_head.weight" in message
    assert ("shape mismatches (1): visual_projection.weight: checkpoint (9, 16) -> (16, 9), "
            "model expects (16, 8)") in message


def test_torch_bin_without_torch_says_how_to_convert(text_dir, tmp_path, monkeypatch):
    folder = str(tmp_path / "bin_only")
    _copy_config(text_dir, folder)
    state = load_file(os.path.join(text_dir, "model.safetensors"))
    path = os.path.join(folder, "pytorch_model.bin")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(weights.CheckpointError) as err:
        weights.load_clip_text(folder)
    assert f"{path} is a PyTorch pickle and torch is not installed" in str(err.value)
    assert "save_pretrained(folder, safe_serialization=True)" in str(err.value)


def test_sharded_checkpoint_errors(text_dir, tmp_path):
    folder = str(tmp_path / "sharded")
    transformers.CLIPTextModel.from_pretrained(text_dir).save_pretrained(
        folder, max_shard_size="4KB")
    index = os.path.join(folder, "model.safetensors.index.json")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) > 1
    _, params = weights.load_clip_text(folder)  # sharded load works
    assert weights.count_params(params) == 50 * 16 + 8 * 16 + (16 * 16 + 16) * 4 + \
        (16 * 24 + 24) + (24 * 16 + 16) + 16 * 2 * 3
    with open(index) as f:
        meta = json.load(f)
    meta["weight_map"]["ghost.weight"] = shards[0]
    with open(index, "w") as f:
        json.dump(meta, f)
    with pytest.raises(weights.CheckpointError, match=r"lists keys that no shard holds: "
                                                      r"\['ghost.weight'\]"):
        weights.load_clip_text(folder)
    os.remove(os.path.join(folder, shards[-1]))
    with pytest.raises(weights.CheckpointError,
                       match=f"shard {os.path.join(folder, shards[-1])} listed in {index} "
                             "is missing"):
        weights.load_clip_text(folder)


def test_loader_dtype_is_compute_only(text_dir):
    module, params = weights.load_clip_text(text_dir, dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert {np.asarray(x).dtype for x in _flat(params).values()} == {np.dtype(np.float32)}
