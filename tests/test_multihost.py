"""Multi-host on one machine: two processes with 4 fake CPU devices each join through `jax.distributed`
(gloo CPU collectives) and run one forward sharded over all 8 devices; each checks it against its own
single-device forward. The worker is this file run as a script."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import pytest

PROCESSES = 2
LOCAL_DEVICES = 4
MESH = "fsdp=2,tensor=4"  # 8 devices: every parameter is split across both processes
TOL = 1e-5
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not hasattr(jax.config, "jax_cpu_collectives_implementation"),
    reason=f"jax {jax.__version__} has no CPU collectives, so processes on one machine cannot share a computation",
)
def test_two_processes_run_one_sharded_forward():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # one failed process leaves the other waiting on a collective
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"process {i} of {PROCESSES}: {PROCESSES * LOCAL_DEVICES} devices, {LOCAL_DEVICES} local" in out
        assert f"primary={i == 0}" in out


def worker(port: int, process_id: int) -> None:
    from gemma_jax import sharding as shd

    assert shd.maybe_initialize_distributed(f"localhost:{port}", PROCESSES, process_id)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import gemma_jax as gj

    config = gj.gemma2_tiny(num_heads=8, num_kv_heads=8, num_layers=3)  # a scanned group and a tail layer
    rng = np.random.default_rng(0)  # the same parameters and tokens on every process
    params = jax.tree.map(
        lambda x: rng.normal(0.0, 0.2, x.shape).astype(np.float32), gj.params_of(gj.abstract_model(config))
    )
    tokens = rng.integers(0, config.vocab_size, (4, 12)).astype(np.int32)

    mesh = shd.make_mesh(MESH)
    model = shd.shard_model(nnx.merge(nnx.graphdef(gj.abstract_model(config)), params), mesh)
    embedding = gj.params_of(model)["embedder"]["embedding"]
    assert not embedding.is_fully_addressable and len(embedding.addressable_shards) == LOCAL_DEVICES
    logits, _ = shd.jit_forward(model, mesh)(gj.params_of(model), tokens)
    got = multihost_utils.process_allgather(logits, tiled=True)  # [B, T, V] on every host

    want, _ = gj.from_params(config, params)(jnp.asarray(tokens))  # this process's first device alone
    diff = float(np.abs(got - np.asarray(want)).max())
    print(
        f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
        f"{jax.local_device_count()} local, primary={shd.is_primary_host()}, "
        f"max |logits| {np.abs(got).max():.2f}, max |diff| {diff:.2e}",
        flush=True,
    )
    assert np.abs(got).max() > 1.0 and diff < TOL
    jax.distributed.shutdown()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]))
