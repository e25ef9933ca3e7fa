"""Shared pytest set-up: 8 fake CPU devices, the `gpu` marker, fresh seeded keys."""

import os

# Must happen before jax is imported anywhere: multi-device tests use 8 fake CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() is "
                          f"{jax.default_backend()!r})")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def key(request):
  """A PRNG key derived from the test's name: fresh per test, reproducible per run."""
  import zlib
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))
