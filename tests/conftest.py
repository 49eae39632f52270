"""Shared test set-up.

Eight simulated CPU devices for the sharding tests: XLA reads the flag when jax first
initialises its backend, so it is set here, before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

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
