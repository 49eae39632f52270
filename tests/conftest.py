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
