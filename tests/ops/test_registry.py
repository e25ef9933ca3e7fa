"""The implementation registry: selection, fallback, interpret suffix and error messages."""

import jax
import jax.numpy as jnp
import pytest

from jaxeff.ops import _registry
from jaxeff.ops._registry import Implementation, dispatch

calls = []


def _impl(name, **kw):
  def fn(x, *, scale, interpret=None):
    calls.append((name, interpret))
    return x * scale
  return Implementation(name, fn, **kw)


def _unsupported_odd(x, *, scale):
  return "needs an even size" if x.shape[0] % 2 else None


REGISTRY = [
    _impl("fast_gpu", platforms=("gpu",), interpretable=True),
    _impl("picky", supports=_unsupported_odd),
    _impl("xla"),
]


@pytest.fixture(autouse=True)
def _clear():
  calls.clear()


def test_none_picks_first_supported_on_this_platform():
  x = jnp.ones((4,))
  dispatch("op", REGISTRY, None, x, scale=2.0)
  expected = "fast_gpu" if jax.default_backend() == "gpu" else "picky"
  assert calls[0][0] == expected


def test_none_falls_back_to_reference():
  if jax.default_backend() == "gpu":
    pytest.skip("fast_gpu serves everything on a GPU")
  dispatch("op", REGISTRY, None, jnp.ones((3,)), scale=2.0)
  assert calls == [("xla", None)]


def test_named_implementation_that_cannot_serve_raises_reason():
  with pytest.raises(NotImplementedError, match="picky: needs an even size"):
    dispatch("op", REGISTRY, "picky", jnp.ones((3,)), scale=1.0)


def test_platform_reason_mentions_interpret():
  if jax.default_backend() == "gpu":
    pytest.skip("the gpu implementation serves on a GPU")
  with pytest.raises(NotImplementedError, match=r"runs on gpu, not on 'cpu'.*fast_gpu:interpret"):
    dispatch("op", REGISTRY, "fast_gpu", jnp.ones((4,)), scale=1.0)


def test_sequence_tried_in_order():
  out = dispatch("op", REGISTRY, ["picky", "xla"], jnp.ones((3,)), scale=3.0)
  assert calls == [("xla", None)]
  assert float(out[0]) == 3.0


def test_interpret_suffix_passes_interpret_true():
  dispatch("op", REGISTRY, "fast_gpu:interpret", jnp.ones((4,)), scale=1.0)
  assert calls == [("fast_gpu", True)]


def test_interpret_suffix_rejected_for_non_kernels():
  with pytest.raises(NotImplementedError, match="'xla' has no interpret mode"):
    dispatch("op", REGISTRY, "xla:interpret", jnp.ones((4,)), scale=1.0)


def test_unknown_name():
  with pytest.raises(ValueError, match=r"unknown implementation 'cuda'; known: \['fast_gpu', 'picky', 'xla'\]"):
    dispatch("op", REGISTRY, "cuda", jnp.ones((4,)), scale=1.0)


@pytest.mark.parametrize("bad", [3, [], [1, 2]])
def test_bad_implementation_type(bad):
  with pytest.raises(TypeError, match="implementation must be None, a name or a non-empty sequence"):
    dispatch("op", REGISTRY, bad, jnp.ones((4,)), scale=1.0)


def test_device_kind_requirement_reason(monkeypatch):
  reg = [Implementation("hopper", lambda x: x, device_kinds=_registry.HOPPER_KINDS)]
  monkeypatch.setattr(_registry, "_device_kind", lambda: "Tesla V100")
  with pytest.raises(NotImplementedError, match="needs one of .*H100.*found device 'Tesla V100'"):
    dispatch("op", reg, "hopper", jnp.ones((1,)))
