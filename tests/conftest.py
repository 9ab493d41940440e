import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """`make_dataset(params)`: a generated dataset (the bundled data's layout and list files) for
    `synth.SynthParams`, made once per session per parameter set. Tests must not write into it."""
    from mats_scale.data import synth

    made = {}

    def make(params):
        if params not in made:
            root = tmp_path_factory.mktemp("dataset")
            synth.generate(str(root), params, workers=1, verbose=False)
            made[params] = root
        return made[params]

    return make


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: trains end to end or launches processes; the unit lane skips it"
    )


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the long scale checks marked @pytest.mark.slow",
    )


# Whole modules that launch processes or train end to end; with the tests marked `dist`, `slow` or
# `integration` they stay out of the unit lane (`pytest -m "not integration"`, under 90 s).
INTEGRATION_MODULES = {"test_dist", "test_study", "test_install", "test_launch", "test_task_seam"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in INTEGRATION_MODULES or {"dist", "slow"} & set(item.keywords):
            item.add_marker(pytest.mark.integration)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="opt-in scale check: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
