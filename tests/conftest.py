"""Shared test set-up.

Eight simulated CPU devices for the sharding tests: XLA reads the flag when jax first
initialises its backend, so it is set here, before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `make test-fast` runs the unit tests (`-m "not slow"`); `make test` runs everything. Slow: the
# integration tests (whole programs: training runs, scripts, notebooks, a headless browser,
# subprocesses, the world and experiment smoke runs, the TPU compile) and the unit tests that
# compile a whole model, a train step or the sampler (parity with diffusers / the PyTorch
# reference, remat, sharding, Pallas in interpret mode), measured with `pytest --durations`.
# Measured 2026-12-06 on the 2-core machine shared with other jobs (load ~9): 288 unit tests,
# 295 s wall, 98 CPU-seconds in all (/usr/bin/time, user + sys, the xdist workers included).
# Markers are registered in pyproject.toml.
SLOW_FILES = frozenset({
    "test_train_program.py", "test_notebooks.py", "test_sample_script.py", "test_convert.py",
    "test_benchmarks_smoke.py", "test_no_torch.py", "test_data_prep_review.py",
    "test_data_prep_annotate.py", "test_evaluation.py", "test_probe_faults.py",
    "test_sharding.py", "test_multiprocess.py", "test_x0_quality.py",
})
SLOW_TESTS = frozenset({
    "test_clip.py::test_clip_parity_fp32",
    "test_clip.py::test_remat_same_outputs_and_gradients",
    "test_configs.py::test_train_script_rejects_bad_config_before_loading",
    "test_data_pipeline.py::test_exact_resume_at_epoch_starts_and_far_positions",
    "test_data_pipeline.py::test_same_seed_same_batches_and_exact_resume",
    "test_data_prep_local.py::test_local_source_generates_and_resumes",
    "test_experiment.py::test_results_have_every_arm_seed_category",
    "test_experiment.py::test_arm_configs_differ_only_in_the_losses",
    "test_experiment.py::test_loss_scales_measured",
    "test_experiment.py::test_results_md_regenerated_from_results_json_alone",
    "test_experiment.py::test_rerun_resumes_without_training",
    "test_experiment.py::test_changed_config_in_existing_run_is_refused",
    "test_ops.py::test_attention_bfloat16_keeps_float32_softmax",
    "test_ops.py::test_attention_matches_jax_reference",
    "test_ops.py::test_conv_matches_lax",
    "test_ops.py::test_flax_conv_with_ops_keeps_parameters_and_values",
    "test_ops.py::test_pallas_flash_attention_matches_einsum_in_interpret_mode",
    "test_pipeline_load.py::test_load_pipeline_every_part",
    "test_sampling.py::test_parity_with_diffusers_and_compile_once",
    "test_sampling.py::test_seeds",
    "test_sampling.py::test_sharded_equals_single_device",
    "test_train_step.py::test_alpha_beta_zero_is_ldm",
    "test_train_step.py::test_encoded_slots_and_tokens_same_loss_and_grads",
    "test_train_step.py::test_parity_with_dropout_draws",
    "test_train_step.py::test_parity_with_pytorch_reference",
    "test_train_step.py::test_sd14_parameter_counts",
    "test_tpu_aot.py::test_tiny_train_step_and_sampler_compile_for_v5e_2x2",
    "test_unet.py::test_attention_map_selection",
    "test_unet.py::test_attention_maps_and_remat_gradients_match_diffusers",
    "test_unet.py::test_checkpoint_errors",
    "test_unet.py::test_export_round_trip_to_diffusers",
    "test_unet.py::test_gligen_parity_grounding_scale_zero_and_no_grounding",
    "test_unet.py::test_non_gated_linear_projection_parity_and_grounding_error",
    "test_unet.py::test_padded_slots_use_null_features",
    "test_unet.py::test_sd14_gligen_config_param_count_and_16x16_layers",
    "test_unet.py::test_three_level_gligen_parity_odd_size",
    "test_vae.py::test_bfloat16_close_to_float32",
    "test_vae.py::test_missing_key_and_shape_mismatch",
    "test_vae.py::test_parity_with_diffusers",
    "test_vae.py::test_posterior_matches_diffusers_distribution",
    "test_vae.py::test_remat_same_output_and_gradient",
    "test_world.py::test_stage_resume_is_exact",
    "test_world.py::test_world_recipe_smoke",
    "test_world_assets.py::test_shipped_world_samples_above_the_random_floor",
    "test_world_assets.py::test_shipped_world_loads_in_diffusers_and_transformers",
})


def pytest_collection_modifyitems(config, items):
    """Marks the tests of SLOW_FILES and SLOW_TESTS ``slow``; the others are ``unit``."""
    del config
    for item in items:
        name = f"{os.path.basename(str(item.fspath))}::{item.originalname}"
        slow = os.path.basename(str(item.fspath)) in SLOW_FILES or name in SLOW_TESTS
        item.add_marker(pytest.mark.slow if slow else pytest.mark.unit)


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_script",
                                                  os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TEST_WORDS = (
    "a an the of and to left right above below next on in with red green blue yellow "
    "purple orange white black circle square triangle star striped dotted solid "
    "photo cat dog car tree two three four"
).split()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny CLIP BPE tokenizer folder (vocab.json + merges.txt) in which every word of
    TEST_WORDS is one token and any other word falls back to characters."""
    from goal_jax import text

    folder = str(tmp_path_factory.mktemp("tokenizer"))
    text.write_word_vocab(folder, TEST_WORDS)
    return folder
