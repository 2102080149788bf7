"""gemma_jax checkpoints: convert HF safetensors to Orbax and back, restore params (sharded) or a ready model.

A checkpoint directory holds
  params/          Orbax PyTree in our nested layout (as `params_of`); uncompressed, in chunks of at
                   most 64 MiB so a sharded restore reads only the chunks each device holds
  config.json      the architecture in HF format (`GemmaConfig.to_hf()`)
  tokenizer files  copied from the source when present (`hf_checkpoint.TOKENIZER_FILES`)
  gemma_jax.json   metadata (source, revision, dtype, version), written last
Conversions write into `DST.incomplete` beside DST and rename it at the end, so DST is absent,
as it was, or complete; `load` refuses a directory without gemma_jax.json. An existing DST is
replaced (overwrite=True) only when it is a complete output of the same kind (a checkpoint, or an
HF export marked by gemma_jax_export.json) and neither is, holds nor lies inside the source.

Conversion streams: HF tensors are read one at a time, each stacked parameter [G, ...] is filled
group by group in one buffer and handed to Orbax's partial save, so memory stays near the largest
single parameter, never the model.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import v1 as ocp
from tqdm.auto import tqdm

from gemma_jax import fp8, hf_checkpoint, params
from gemma_jax.checkpoint_errors import (
    CheckpointError,
    DestinationExistsError,
    DestinationNotWritableError,
    MissingTensorError,
    NotACheckpointError,
    OverwriteRefusedError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from gemma_jax.config import GemmaConfig
from gemma_jax.quant import QuantError
from gemma_jax.sharding import param_shardings
from gemma_jax.transformer import Transformer, abstract_model, from_params

PARAMS_DIR = "params"
METADATA_FILE = "gemma_jax.json"
# Written last into an HF export, so `--overwrite` can tell a directory `export_hf` wrote from any other.
EXPORT_FILE = "gemma_jax_export.json"
# Storage dtypes `convert_hf` writes; "fp8" / "int8": projections as e4m3 / int8 + per-channel scales, and with
# int8 the embedding per vocab row (gemma_jax.fp8), the rest bf16.
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "fp8": jnp.bfloat16, "int8": jnp.bfloat16}
_CHUNK_BYTES = 64 << 20
PathLike = str | os.PathLike


def is_checkpoint(path: PathLike) -> bool:
    """True for a complete gemma_jax checkpoint directory."""
    p = pathlib.Path(path).expanduser()
    return (p / METADATA_FILE).is_file() and (p / "config.json").is_file() and (p / PARAMS_DIR).is_dir()


def is_hf_export(path: PathLike) -> bool:
    """True for a complete HF directory written by `export_hf` (the only kind its --overwrite replaces)."""
    p = pathlib.Path(path).expanduser()
    return all((p / name).is_file() for name in (EXPORT_FILE, "config.json", hf_checkpoint.INDEX_FILE))


def convert_hf(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """HF checkpoint (directory or hub id) -> gemma_jax checkpoint at `dst`, streamed and atomic.

    Every check (destination, config, tensor names and shapes, file integrity) runs before
    anything is written.
    """
    param_dtype = _storage_dtype(dtype)
    local = pathlib.Path(src).expanduser()
    dst = check_destination(dst, overwrite, sources=[local] if local.exists() else [])  # before a hub download
    source = hf_checkpoint.fetch(os.fspath(src), revision)
    _refuse_source_overlap(dst, [source.directory])  # a hub id's snapshot in the HF cache
    config = hf_checkpoint.read_config(source.directory)
    tensors = hf_checkpoint.scan(source.directory)
    _check_tensors(tensors, config)
    start = time.perf_counter()
    with _staging(dst) as tmp:
        storage = dtype if dtype in fp8.STORAGES else None
        nbytes = _write_params(tmp / PARAMS_DIR, tensors, config, param_dtype, progress, storage=storage)
        _write_json(tmp / "config.json", config.to_hf())
        _copy_tokenizer(source.directory, tmp)
        meta = _metadata(source.source, dtype, revision=source.revision, commit=source.commit)
        _write_json(tmp / METADATA_FILE, meta | {"tensors": len(tensors), "source_bytes": nbytes})
    _summary(progress, "converted", len(tensors), nbytes, start, dst)
    return dst


def export_hf(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """gemma_jax checkpoint -> HF directory (config.json, safetensors shards + index, tokenizer files).

    Reads one parameter at a time and holds at most one shard, so memory stays near
    max_shard_size plus the largest parameter. `dtype` None keeps the stored dtype.
    """
    src = _checkpoint_dir(src)
    stored = _read_json(src / METADATA_FILE)["dtype"]
    if stored in fp8.STORAGES:
        raise CheckpointError(
            f"{src} is an {stored.upper()} checkpoint; export the bf16 or float32 checkpoint it came from"
        )
    dst = check_destination(dst, overwrite, sources=[src], kind=HF_EXPORT)
    config = GemmaConfig.from_hf(src / "config.json")
    stored = _stored_tree(src)
    out_dtype = np.dtype(_storage_dtype(dtype) if dtype else stored["embedder"]["embedding"].dtype)
    leaves = _leaves(config)
    sizes = {
        p.hf_name: math.prod(params.hf_shape(p.hf_name, config)) * out_dtype.itemsize
        for ps in leaves.values()
        for p in ps
    }
    shards = hf_checkpoint.plan_shards(sizes, hf_checkpoint.parse_size(max_shard_size))
    files = hf_checkpoint.shard_names(len(shards))
    total = sum(sizes.values())
    start = time.perf_counter()
    with _staging(dst) as tmp, _orbax_context(partial_load=True), _bar(total, "orbax -> hf", progress) as bar:
        shard, pending = 0, {}
        for path, placements in leaves.items():
            leaf = ocp.load(src / PARAMS_DIR, _nest(path, _get(stored, path)))
            leaf = _get(leaf, path)  # numpy, stored dtype
            for p in placements:
                w = leaf if p.stack_index is None else leaf[p.stack_index]
                pending[p.hf_name] = _relayout(p.rule.to_hf, w, config).astype(out_dtype, copy=False)
                bar.update(sizes[p.hf_name])
                if len(pending) == len(shards[shard]):
                    hf_checkpoint.save_shard(pending, tmp / files[shard])
                    shard, pending = shard + 1, {}
            del leaf
        hf_checkpoint.save_index(tmp, {n: files[i] for i, names in enumerate(shards) for n in names}, total)
        _write_json(tmp / "config.json", config.to_hf() | {"dtype": out_dtype.name})
        _copy_tokenizer(src, tmp)
        _write_json(tmp / EXPORT_FILE, _metadata(str(src), out_dtype.name) | {"format": "hf_export"})
    _summary(progress, "exported", len(sizes), total, start, dst)
    return dst


def load(
    path: PathLike,
    *,
    dtype: str | jnp.dtype | None = None,
    shardings: Any = None,
) -> tuple[GemmaConfig, dict]:
    """(config, params) from a checkpoint; params in our nested layout, as jax arrays.

    `dtype` casts every float parameter while restoring (None keeps the stored dtype); in an FP8 or
    int8 checkpoint the 8-bit kernels (and int8 embedding) and their float32 scales keep theirs.
    `shardings` is a pytree of `jax.sharding.Sharding` matching params (e.g. from
    `gemma_jax.sharding.param_shardings`) or one Sharding for all; Orbax then reads into each
    device only its shard, with no full host copy. Without it params land on the default device.
    """
    path = _checkpoint_dir(path)
    config = GemmaConfig.from_hf(path / "config.json")
    stored = _stored_tree(path)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, stored)
    cast = None if dtype is None else jnp.dtype(dtype)
    float_dtype = fp8.float_dtype(stored)  # that of every leaf but 8-bit tables and their scales

    def target(meta, sharding):
        leaf_dtype = cast if cast is not None and meta.dtype == float_dtype else meta.dtype
        return jax.ShapeDtypeStruct(meta.shape, leaf_dtype, sharding=sharding)

    try:
        abstract = jax.tree.map(target, stored, shardings)
    except ValueError as e:
        raise CheckpointError(f"shardings do not match the parameter tree of {path}: {e}") from None
    with _orbax_context():
        return config, ocp.load(path / PARAMS_DIR, abstract)


def load_model(
    path: PathLike,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    param_dtype: jnp.dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quant: str | None = None,
    storage: str | None = None,
) -> Transformer:
    """A ready Transformer computing in `dtype`; params in `param_dtype` (default: as stored).

    With `mesh`, parameters are restored straight into the shardings `gemma_jax.sharding`
    derives from their logical axes. `quant` ("weight_only" or "w8a8", see `gemma_jax.fp8`) runs
    the projections in 8 bits: an FP8 or int8 checkpoint loads as stored (weight-only unless told), a
    float one is quantized after loading to `storage` ("fp8" or "int8"; giving either implies weight-only).
    """
    path = _checkpoint_dir(path)
    stored = _read_json(path / METADATA_FILE)["dtype"]
    if stored in fp8.STORAGES:
        if storage not in (None, stored):
            raise CheckpointError(
                f"{path} stores {stored} projections, not {storage}: load it as {stored} (--dtype {stored}), "
                f"or convert its source again with dtype {storage!r}"
            )
        storage = stored
    if storage is not None or quant is not None:
        storage = storage or "fp8"
        # once: W8A8 without a native 8-bit matmul warns here; the models below take the mode as resolved
        quant = fp8.resolve_mode(quant or fp8.WEIGHT_ONLY, storage=storage)
    param_dtype = jnp.dtype(param_dtype or DTYPES[stored])
    quantized = dict(dtype=dtype, mode=quant, emulate=True)
    shardings = None
    if mesh is not None:
        config = GemmaConfig.from_hf(path / "config.json")
        if stored in fp8.STORAGES:
            abstract = fp8.abstract_model(config, param_dtype=param_dtype, storage=stored, **quantized)
        else:
            abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
        shardings = param_shardings(abstract, mesh)
    config, tree = load(path, dtype=param_dtype, shardings=shardings)
    if stored in fp8.STORAGES:
        return fp8.from_params(config, tree, **quantized)
    model = from_params(config, tree, dtype=dtype, param_dtype=param_dtype)
    return model if quant is None else fp8.quantize_model(model, quant, emulate=True, storage=storage)


def save(
    dst: PathLike,
    config: GemmaConfig,
    tree: dict,
    *,
    dtype: str = "bfloat16",
    tokenizer_dir: PathLike | None = None,
    source: str = "gemma_jax",
    overwrite: bool = False,
) -> pathlib.Path:
    """Params in our nested layout (e.g. a fine-tuned model's `params_of`) -> a checkpoint at `dst`, atomic.

    Tokenizer files are copied from `tokenizer_dir` (e.g. the checkpoint the model was loaded from).
    dtype "fp8" or "int8" quantizes float params as `convert_hf` does and stores 8-bit params as they are.
    """
    param_dtype = _storage_dtype(dtype)
    dst = check_destination(dst, overwrite, sources=[tokenizer_dir] if tokenizer_dir is not None else [])
    stored = fp8.storage_of(tree)
    if stored is not None and dtype != stored:
        raise CheckpointError(f"these are {stored.upper()} params: save them with dtype={stored!r}, not {dtype!r}")
    if stored is None:
        tree = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), tree)
        tree = _quantize(config, tree, dtype) if dtype in fp8.STORAGES else tree
    with _staging(dst) as tmp:
        with _orbax_context():
            ocp.save(tmp / PARAMS_DIR, tree)
        _write_json(tmp / "config.json", config.to_hf())
        if tokenizer_dir is not None:
            _copy_tokenizer(pathlib.Path(tokenizer_dir), tmp)
        _write_json(tmp / METADATA_FILE, _metadata(source, dtype))
    return dst


def resolve(
    path_or_hub_id: str,
    *,
    cache_dir: PathLike | None = None,
    dtype: str = "bfloat16",
    revision: str | None = None,
) -> pathlib.Path:
    """A local gemma_jax checkpoint for anything a user may pass: a checkpoint as is; an HF directory
    or hub id converted once into the cache (`cache_dir`, $GEMMA_JAX_CACHE or ~/.cache/gemma_jax) and reused.

    Local sources are keyed by path, file sizes and times, so a re-saved directory is converted again.
    """
    if is_checkpoint(path_or_hub_id):
        return pathlib.Path(path_or_hub_id).expanduser()
    cache = pathlib.Path(cache_dir or os.environ.get("GEMMA_JAX_CACHE") or "~/.cache/gemma_jax").expanduser()
    dst = cache / _cache_key(path_or_hub_id, revision, dtype)
    if not is_checkpoint(dst):
        convert_hf(path_or_hub_id, dst, dtype=dtype, revision=revision, overwrite=True)
    return dst


def _cache_key(source: str, revision: str | None, dtype: str) -> str:
    path = pathlib.Path(source).expanduser()
    if not path.is_dir():
        return f"hub--{source.replace('/', '--')}--{revision or 'main'}--{dtype}"
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()]
    digest = hashlib.sha256(repr((str(path.resolve()), stats)).encode()).hexdigest()[:12]
    return f"local--{path.name}--{digest}--{dtype}"


# ---- conversion steps


def _storage_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; choose one of {list(DTYPES)}")
    return jnp.dtype(DTYPES[name])


class DestinationKind(NamedTuple):
    """What a converter writes: its name in messages, and how to recognise a complete one."""

    name: str
    is_complete: Callable[[PathLike], bool]


CHECKPOINT = DestinationKind("gemma_jax checkpoint", is_checkpoint)
HF_EXPORT = DestinationKind("HF export written by gemma_jax", is_hf_export)


def check_destination(
    dst: PathLike, overwrite: bool, *, sources: Iterable[PathLike] = (), kind: DestinationKind = CHECKPOINT
) -> pathlib.Path:
    """`dst` as an absolute path once writing there cannot destroy anything but an output of the same kind.

    Refused by name, before anything is touched: an existing `dst` without `overwrite`; with it, a
    `dst` that is not a complete `kind` (a user's directory, a file); a `dst` (or its staging paths)
    that is, holds or lies inside one of `sources`; a `dst` that cannot be created (a parent is a
    file or is not writable).
    """
    dst = pathlib.Path(dst).expanduser().absolute()
    _refuse_source_overlap(dst, sources)
    if os.path.lexists(dst):
        if not overwrite:
            raise DestinationExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
        if not kind.is_complete(dst):
            raise OverwriteRefusedError(
                f"refusing to overwrite {dst}: it is not a complete {kind.name}, and --overwrite replaces "
                "only that; choose another destination, or remove it yourself if it is yours to delete"
            )
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DestinationNotWritableError(f"cannot create {dst}: {parent} is a file; choose a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationNotWritableError(
            f"cannot create {dst}: {parent} is not writable (permissions or a read-only file system); "
            "choose a writable destination"
        )
    return dst


def _refuse_source_overlap(dst: pathlib.Path, sources: Iterable[PathLike]) -> None:
    """Replacing `dst` (or clearing its staging paths) must not delete a source, nor a directory holding one."""
    for path in _staging_paths(dst):
        if not os.path.lexists(path):
            continue
        for src in sources:
            src = pathlib.Path(src).expanduser().resolve()
            if relation := _relation(path.resolve(), src):
                raise OverwriteRefusedError(
                    f"refusing to write {dst}: {path} {relation} the source {src}; choose a destination outside it"
                )


def _relation(path: pathlib.Path, src: pathlib.Path) -> str | None:
    if path == src:
        return "is"
    if path in src.parents:
        return "holds"
    return "lies inside" if src in path.parents else None


def _check_tensors(tensors: Mapping[str, hf_checkpoint.TensorInfo], config: GemmaConfig) -> None:
    """Missing, unexpected and misshapen tensors, each as its own named error, before any write."""
    try:
        params.check_names(set(tensors), config)
    except params.ParamMappingError as e:
        missing = set(params.hf_names(config)) - set(tensors)
        raise (MissingTensorError if missing else UnexpectedTensorError)(str(e)) from None
    for name in params.hf_names(config):
        try:
            params.check_shape(name, tensors[name].shape, config)
        except params.ParamMappingError as e:
            raise ShapeMismatchError(f"{e} (in {tensors[name].file.name})") from None


def _leaves(config: GemmaConfig) -> dict[params.Path, list[params.Placement]]:
    """Our parameters in HF order, each with the HF tensors that fill it (one, or one per group)."""
    leaves: dict[params.Path, list[params.Placement]] = {}
    for name in params.hf_names(config):
        p = params.placement(name, config)
        leaves.setdefault(p.path, []).append(p)
    return leaves


def _write_params(
    path: pathlib.Path,
    tensors,
    config: GemmaConfig,
    dtype: jnp.dtype,
    progress: bool,
    storage: str | None = None,
) -> int:
    """Stream HF tensors into an Orbax PyTree, one of our parameters per partial save; returns bytes read.

    `storage` ("fp8", "int8") stores each projection kernel as 8-bit + per-channel scales, and with int8 the
    embedding per vocab row (`fp8.quantize_params`).
    """
    leaves = _leaves(config)
    total = sum(tensors[p.hf_name].nbytes for ps in leaves.values() for p in ps)
    with _orbax_context(), _bar(total, "hf -> orbax", progress) as bar:
        for leaf_path, placements in leaves.items():
            value = _nest(leaf_path, _assemble(placements, tensors, config, dtype, bar))
            ocp.partial.save(path, value if storage is None else _quantize(config, value, storage))
            del value
        ocp.partial.finalize(path)
    return total


def _quantize(config: GemmaConfig, tree: dict, storage: str) -> dict:
    try:
        return fp8.quantize_params(config, tree, storage=storage)
    except QuantError as e:  # inf/NaN in a weight: named, and the staging directory is removed
        raise CheckpointError(str(e)) from None


def _assemble(placements: list[params.Placement], tensors, config: GemmaConfig, dtype: jnp.dtype, bar) -> np.ndarray:
    """One of our parameters from its HF tensors: mapped, cast, and stacked [G, ...] in a single buffer."""
    out = None
    for p in placements:
        info = tensors[p.hf_name]
        w = _relayout(p.rule.to_ours, hf_checkpoint.read(p.hf_name, info), config).astype(dtype, copy=False)
        bar.update(info.nbytes)
        if p.stack_index is None:
            return w
        if out is None:
            out = np.empty((len(placements), *w.shape), dtype)
        out[p.stack_index] = w
    return out


def _relayout(rule_fn, w: np.ndarray, config: GemmaConfig) -> np.ndarray:
    """`rule_fn(w)` (a transpose / reshape: it only moves bits) as a contiguous array, computed on an
    unsigned-int view because numpy copies those ~4x faster than ml_dtypes' bfloat16."""
    bits = rule_fn(w.view(f"u{w.itemsize}"), config)
    return np.ascontiguousarray(bits).view(w.dtype)


def _metadata(source: str, dtype: str, *, revision: str | None = None, commit: str | None = None) -> dict:
    """gemma_jax.json: where the params came from and how they are stored."""
    import gemma_jax  # at call time: the package may import this module

    return {
        "format": "gemma_jax",
        "format_version": 1,
        "source": source,
        "revision": revision,
        "commit": commit,
        "dtype": dtype,
        "gemma_jax_version": gemma_jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- files and directories


@contextlib.contextmanager
def _staging(dst: pathlib.Path) -> Iterator[pathlib.Path]:
    """An empty directory beside `dst` that replaces it on success and is removed on any failure."""
    _, tmp, old = _staging_paths(dst)
    try:
        _remove(tmp)  # left by an interrupted run
        tmp.mkdir(parents=True)
        yield tmp
        if dst.exists():
            _remove(old)
            dst.rename(old)
            tmp.rename(dst)
            _remove(old)
        else:
            tmp.rename(dst)
    except OSError as e:  # a full disk, a permission changed midway: named, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {dst}: {e}; check free space and permissions, then rerun") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never mask the error; a next run clears what is left
        raise


def _staging_paths(dst: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """`dst` and the two paths a write removes beside it: the staging directory and the replaced one."""
    return dst, dst.with_name(dst.name + ".incomplete"), dst.with_name(dst.name + ".replaced")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _checkpoint_dir(path: PathLike) -> pathlib.Path:
    p = pathlib.Path(path).expanduser().absolute()  # Orbax wants absolute paths
    if is_checkpoint(p):
        return p
    if not p.exists():
        raise NotACheckpointError(f"no checkpoint at {p}: convert one with `python convert/hf_to_orbax.py SRC {p}`")
    raise NotACheckpointError(
        f"{p} is not a complete gemma_jax checkpoint (no {METADATA_FILE}, config.json or {PARAMS_DIR}/): "
        "an interrupted conversion or another format; convert it again"
    )


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in hf_checkpoint.TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- Orbax and trees


def _orbax_context(*, partial_load: bool = False) -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False  # weights barely compress; restore speed matters more
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False  # each buffer is written before it is touched again
    ctx.pytree.loading.partial_load = partial_load
    return ctx


def _stored_tree(path: pathlib.Path) -> dict:
    """The saved tree's array metadata (shape, dtype), with layer indices back as int keys."""
    return _int_keys(ocp.metadata(path / PARAMS_DIR).metadata)


def _int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; our layer lists are keyed 0, 1, ..."""
    if not isinstance(tree, Mapping):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def _nest(path: params.Path, value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _get(tree: Mapping, path: params.Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ---- progress


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def _summary(progress: bool, verb: str, tensors: int, nbytes: int, start: float, dst: pathlib.Path) -> None:
    if progress:
        seconds = time.perf_counter() - start
        print(
            f"{verb} {tensors} tensors, {tqdm.format_sizeof(nbytes, 'B', 1024)} in {seconds:.1f} s -> {dst}",
            file=sys.stderr,
        )
