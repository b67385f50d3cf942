"""Shared test set-up: the repository root on sys.path (so tests import the project's modules as the
scripts do), and the fixtures every file may use. Helpers that build test data live in fixtures.py."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # as fixtures.ROOT
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init checkpoint with its own codebook, data folder and log (fixtures.make_tiny_run)."""
    from fixtures import make_tiny_run
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))
