"""Pytest configuration: fixtures for the real local stack live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.stack", "tests.fixtures.local_ray",
                  "tests.fixtures.train_data"]
