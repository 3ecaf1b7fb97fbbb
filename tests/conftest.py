import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session: starting Ray costs seconds on 2 cores."""
    import ray

    from pipeline.runner import init_ray

    started = init_ray(None, 2)
    yield ray
    if started:
        ray.shutdown()
