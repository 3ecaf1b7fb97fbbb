import os
import socket

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1, configured through the environment before
    Ray starts, so Ray workers reach it too."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      FSSPEC_S3_ENDPOINT_URL=url)
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = url
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the whole test session: starting Ray costs seconds on 2 cores."""
    import ray

    from recap.pipeline.runner import init_ray

    started = init_ray(None, 2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def fake_stages():
    """The network-free stages of tests/engine_stages.py, registered for one test."""
    from ray import cloudpickle

    from recap.pipeline import stage as stage_mod
    from tests import engine_stages

    cloudpickle.register_pickle_by_value(engine_stages)  # Ray workers cannot import tests/
    saved = dict(stage_mod._registered)
    for cls in engine_stages.ALL:
        stage_mod.register(cls)
    yield
    stage_mod._registered.clear()
    stage_mod._registered.update(saved)


@pytest.fixture
def folder_source(fake_stages):
    """The test-only second source of tests/folder_source.py, registered for one test."""
    from ray import cloudpickle

    from recap.pipeline import stage as stage_mod
    from tests import folder_source

    cloudpickle.register_pickle_by_value(folder_source)
    stage_mod.register(folder_source.FolderSource)
    yield folder_source.FolderSource
    stage_mod._registered.pop("folder", None)
