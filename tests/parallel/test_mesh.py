"""jaxeff.parallel.mesh: mesh configs, logical-axis rules and their errors."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxeff.parallel import mesh as pm


def test_parse_and_resolve():
  cfg = pm.MeshConfig.parse("tensor=2, sequence=2")
  assert cfg.data == -1 and cfg.tensor == 2 and cfg.sequence == 2
  assert cfg.resolve(8) == dict(data=2, pipeline=1, fsdp=1, expert=1, sequence=2, tensor=2)
  assert pm.MeshConfig.parse("fsdp=-1,data=1").resolve(8)["fsdp"] == 8
  mesh = pm.make_mesh("data=2,tensor=2,sequence=2")
  assert mesh.axis_names == pm.AXES and pm.mesh_sizes(mesh)["tensor"] == 2
  assert mesh.devices.size == len(jax.devices()) == 8
  one = pm.make_mesh({"data": 1}, jax.devices()[:1])
  assert all(n == 1 for n in pm.mesh_sizes(one).values())


@pytest.mark.parametrize("text, match", [
    ("tensor=3", r"fixed axis sizes tensor=3 \(product 3\) do not divide the number of "
                 r"devices \(8\)"),
    ("data=2,tensor=2", r"multiply to 4, but there are 8 devices"),
    ("model=2", r"unknown axis 'model'; known axes: \['data', 'pipeline'"),
    ("tensor=two", r"size of axis 'tensor' must be an integer"),
    ("tensor=2,tensor=2", r"axis 'tensor' given twice"),
    ("data=-1,fsdp=-1", r"at most one axis may be -1"),
    ("tensor=0", r"tensor must be a positive int or -1"),
    ("tensor", r"expected 'axis=size' entries"),
])
def test_bad_configs_raise_clear_errors(text, match):
  with pytest.raises(ValueError, match=match):
    pm.make_mesh(text)


def test_logical_rules_and_divisibility():
  mesh = pm.make_mesh("data=2,fsdp=2,tensor=2")
  assert pm.logical_spec(("batch", "seq", "act_embed"), mesh=mesh) == P(("data", "fsdp"))
  assert pm.logical_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor")
  assert pm.logical_spec(("vocab", "embed")) == P("tensor", "fsdp")
  # A mesh axis is used once per array: the second "mlp" stays replicated.
  assert pm.logical_spec(("mlp", "mlp"), mesh=mesh) == P("tensor")
  with pytest.raises(ValueError, match="no rule for logical axis 'width'"):
    pm.logical_spec(("width",))
  with pytest.raises(ValueError, match="names an unknown mesh axis"):
    pm.logical_spec(("embed",), {"embed": "model"})
  with pytest.raises(ValueError, match=r"q_proj: dimension 1 of shape \(8, 3, 4\) has size 3, "
                                       r"which mesh axis 'tensor' of size 2 does not divide"):
    pm.check_divisible("q_proj", (8, 3, 4), P("fsdp", "tensor"), mesh)
