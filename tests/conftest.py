"""Shared test set-up: the repository root on sys.path (so tests import the project's modules as the
scripts do), and the fixtures every file may use. Helpers that build test data live in fixtures.py."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # as fixtures.ROOT
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Every model in the suite (in this process and in the commands it starts) runs on one thread: the thread
# count changes a CPU run's rounding, so runs compared bitwise must share it whatever the machine's load
# (the commands' default, 0, chooses from that load: imagegpt/device.py). Tests of that choice unset it.
os.environ.setdefault("IMAGEGPT_THREADS", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init checkpoint with its own codebook, data folder and log (fixtures.make_tiny_run)."""
    from fixtures import make_tiny_run
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))
