"""Fixtures of the training tests: a tiny synthetic dataset, written once per session."""

from __future__ import annotations

import pytest

TRAIN_TEST_CLASSES = ("stripes", "disc")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """2 classes x (2 good + 2 anomalous) test images at 64x64, seed 0."""
    from cops_deploy.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    return synthesize(
        root,
        seed=0,
        n_train_good=1,
        n_test_good=2,
        n_test_bad=2,
        size=64,
        classes=TRAIN_TEST_CLASSES,
    )
