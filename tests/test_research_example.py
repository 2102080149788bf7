"""docs/research.md's example (the model in the user's own jit + grad + shard_map) runs as written,
and `constrain` behaves as that page says under manual axes and with a rules table."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

from gemma_jax import partitioning

DOC = pathlib.Path(__file__).parents[1] / "docs" / "research.md"


def test_research_example_runs_as_documented():
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert jax.device_count() == 8  # conftest's virtual CPU devices: the batch really is split
    exec(compile(code, str(DOC), "exec"), {"__name__": "research_example"})


def test_constrain_steps_aside_inside_shard_map():
    """Per-shard batch 8 over data=8 would be sharded under Auto axes; inside shard_map it must not be."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    body = jax.shard_map(
        lambda x: partitioning.constrain(x, partitioning.RESIDUAL) * 2,
        mesh=mesh,
        in_specs=jax.P("data"),
        out_specs=jax.P("data"),
    )
    x = jnp.ones((64, 4, 8))
    assert float(jax.jit(body)(x).sum()) == 2 * x.size


@pytest.mark.parametrize("through", ["argument", "context"])
def test_constrain_takes_a_rules_table(through):
    """A mesh with its own axis names: the default table names none of them (no constraint); a table
    mapping `batch` onto them pins the residual there, passed as an argument or set by `axis_rules`."""
    mesh = jax.make_mesh((8,), ("replica",), axis_types=(AxisType.Auto,))
    rules = {**partitioning.LOGICAL_RULES, "batch": ("replica",)}
    x = jnp.ones((8, 4, 16))

    def lowered(fn) -> str:
        with jax.set_mesh(mesh):
            return jax.jit(fn).lower(x).as_text()

    assert "sharding_constraint" not in lowered(lambda x: partitioning.constrain(x, partitioning.RESIDUAL))
    if through == "argument":
        text = lowered(lambda x: partitioning.constrain(x, partitioning.RESIDUAL, rules))
    else:
        with partitioning.axis_rules(rules):
            text = lowered(lambda x: partitioning.constrain(x, partitioning.RESIDUAL))
    assert re.search(r'sharding_constraint.*\{"replica"\}', text), text
