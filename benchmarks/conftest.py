"""The micro-cases' pytest set-up (``pytest benchmarks/ --benchmark-only``, benchmarks/README.md).

pytest.ini's ``--dist loadgroup`` (the test suite's grouping under ``-n``) makes pytest-benchmark switch itself
off even when no worker starts, and ``--benchmark-only`` then stops at once ("Can't have both --benchmark-only
and --benchmark-disable"). Without ``-n`` nothing is distributed: the mode is set back to none.
"""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not getattr(config.option, "numprocesses", None):
        config.option.dist = "no"
