"""Pytest configuration: fixtures for the real local stack live in tests/fixtures/; the
longest modules run first."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.stack", "tests.fixtures.local_ray",
                  "tests.fixtures.train_data"]

# The modules that submit Ray jobs and Tune searches, longest first (`pytest --durations=0`,
# summed per module: 430 s down to 60 s on a 2-core machine). `make test` runs the suite on
# two pytest-xdist workers, a whole module each (`--dist loadfile --no-loadscope-reorder`),
# handed out in collection order: started first, the long modules run side by side and the
# short ones fill the gaps at the end, instead of two long ones running last on one worker.
LONGEST_FIRST = ("test_train_job", "test_train_faults", "test_tune_tvsum", "test_local_stack",
                 "test_tune_seeds", "test_predict_video", "test_serve", "test_tune_job",
                 "test_shard_job", "test_pretrain_corpus")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Reorder whole modules by LONGEST_FIRST (the rest after, as collected); a module's own
    tests keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))
