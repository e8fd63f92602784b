"""Orbax checkpoints: the train state, the data-iterator position and JSON metadata, per step.

Each step directory holds four Orbax items:

- ``train_state``: a pytree of arrays (parameters, optax state, step, RNG key, counters);
- ``data_state``: the data iterator's state (a JSON value, or bytes stored base64);
- ``meta``: the caller's JSON metadata (config hash, stage name, ...);
- ``layout``: path -> (shape, dtype, PRNG impl) of every ``train_state`` leaf, written by this module and
  compared with the restore target *before* any array is read, so a workdir holding another model's
  checkpoint fails with a :class:`CheckpointMismatchError` that names the differing arrays.

The ``train_state`` pytree may contain, besides jax/numpy arrays:

- ``nnx.State`` subtrees: saved as their pure dict (``nnx.to_pure_dict``) and rebuilt into the
  ``nnx.State`` of the restore target;
- typed PRNG keys (``jax.random.key``): saved as ``jax.random.key_data`` and rewrapped on restore;
- Python ``int``/``float``/``bool`` leaves: saved as 0-d numpy arrays and returned as Python scalars.

Restores are placed straight into the shardings of the abstract target (``jax.ShapeDtypeStruct`` with
``sharding=``), so a checkpoint written on one mesh restores onto any other. Every process must call
``save``/``restore`` (Orbax coordinates the hosts and writes files from the primary one).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

TRAIN_STATE, DATA_STATE, META, LAYOUT = "train_state", "data_state", "meta", "layout"
_ITEMS = (TRAIN_STATE, DATA_STATE, META, LAYOUT)
_LAYOUT_VERSION = 1
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """Base class of this module's errors: the checkpoint cannot be used as asked."""


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint (or not the requested step) exists where one was expected."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint exists but cannot be read (missing items, truncated files, foreign layout).

    ``reason``: the underlying error's first line, without the checkpoint's path.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class CheckpointMismatchError(CheckpointError):
    """The saved arrays differ in structure, shape or dtype from the restore target."""


# ----------------------------------------------------------------------------- PRNG key helpers


def is_prng_key(x: Any) -> bool:
    """True for typed PRNG keys (``jax.random.key``), concrete or abstract."""
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def key_to_data(key: jax.Array) -> tuple[jax.Array, str]:
    """A typed key -> (its raw uint32 data, the impl name), the form a checkpoint can store."""
    return jax.random.key_data(key), str(jax.random.key_impl(key))


def data_to_key(data: jax.Array, impl: str = "threefry2x32") -> jax.Array:
    """Inverse of :func:`key_to_data`: rewraps raw key data as a typed key."""
    return jax.random.wrap_key_data(data, impl=impl)


# ----------------------------------------------------------------------------- tree conversion


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def _to_pure(tree: Any) -> Any:
    """Replaces every ``nnx.State`` subtree with its pure dict (plain nested dicts of arrays)."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def _from_pure(abstract: Any, pure: Any) -> Any:
    """Rebuilds the ``nnx.State`` subtrees of ``abstract`` from the restored pure tree ``pure``."""

    def rebuild(a: Any, p: Any) -> Any:
        if not _is_state(a):
            return p
        state = jax.tree.map(lambda x: x, a)  # a copy: replace_by_pure_dict mutates in place
        nnx.replace_by_pure_dict(state, p)
        return state

    return jax.tree.map(rebuild, abstract, pure, is_leaf=_is_state)


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path)


def _spec(leaf: Any) -> dict[str, Any]:
    """The layout entry of one leaf: logical shape, dtype name, PRNG impl (None for plain arrays)."""
    if isinstance(leaf, bool | int | float):
        leaf = np.asarray(leaf)
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"train_state leaves must be arrays or Python scalars, got {type(leaf).__name__}")
    impl = None
    if is_prng_key(leaf):
        # Abstract keys do not expose their impl publicly; the dtype name ("key<fry>") identifies it.
        impl = str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array) else None
    return {"shape": [int(d) for d in leaf.shape], "dtype": str(leaf.dtype), "prng_impl": impl}


def tree_layout(tree: Any) -> dict[str, dict[str, Any]]:
    """path -> {"shape", "dtype", "prng_impl"} for every leaf of a (pure or nnx.State) pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_to_pure(tree))
    return {_path(p): _spec(x) for p, x in flat}


def _to_savable(tree: Any) -> Any:
    """Pure tree with keys as raw data and Python scalars as 0-d numpy arrays."""

    def conv(x: Any) -> Any:
        if isinstance(x, bool | int | float):
            return np.asarray(x)
        if is_prng_key(x):
            return jax.random.key_data(x)
        return x

    return jax.tree.map(conv, _to_pure(tree))


def _concrete(sharding: Any, path: str) -> Any:
    """A sharding Orbax can place arrays with: an AbstractMesh (``nnx.eval_shape`` under a mesh gives
    those) is replaced by the current ``jax.set_mesh`` mesh of the same shape."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or not isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):
        return sharding
    mesh = jax.sharding.get_mesh()
    if mesh.empty or mesh.abstract_mesh != sharding.mesh:
        raise CheckpointError(
            f"the restore target {path} has a sharding on an abstract mesh {sharding.mesh}; restore under "
            "`jax.set_mesh(mesh)` with that mesh, or give concrete shardings (runtime.state_shardings)"
        )
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def _restore_plan(abstract: Any, saved_layout: Mapping[str, Any]) -> tuple[Any, Callable[[Any], Any]]:
    """The Orbax restore target for ``abstract`` and the function that turns the result back."""
    pure = _to_pure(abstract)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    targets, posts = [], []
    for path, leaf in flat:
        sharding = _concrete(getattr(leaf, "sharding", None), _path(path))
        if isinstance(leaf, bool | int | float):
            targets.append(jax.ShapeDtypeStruct((), np.asarray(leaf).dtype))
            posts.append(lambda v, t=type(leaf): t(np.asarray(v).item()))
        elif is_prng_key(leaf):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            # The key's sharding carries over: a NamedSharding spec leaves the trailing data axis replicated.
            targets.append(jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding))
            impl = saved_layout[_path(path)]["prng_impl"]
            posts.append(lambda v, impl=impl: jax.random.wrap_key_data(v, impl=impl))
        else:
            targets.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
            posts.append(lambda v: v)

    def finish(restored: Any) -> Any:
        values = treedef.flatten_up_to(restored)
        out = treedef.unflatten([post(v) for post, v in zip(posts, values, strict=True)])
        return _from_pure(abstract, out)

    return treedef.unflatten(targets), finish


def _brief(err: BaseException) -> str:
    """The first line of an Orbax/TensorStore error (the rest, often a JSON spec, stays in the chain)."""
    text = str(err).strip().splitlines()
    return (text[0][:300] if text else "") or type(err).__name__


def _fmt(spec: Mapping[str, Any]) -> str:
    return f"{tuple(spec['shape'])} {spec['dtype']}"


def check_layout(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raises :class:`CheckpointMismatchError` listing the paths whose shape/dtype/presence differ."""
    problems = []
    for path in sorted(set(saved) | set(expected)):
        if path not in saved:
            problems.append(f"  {path}: missing from the checkpoint, expected {_fmt(expected[path])}")
        elif path not in expected:
            problems.append(f"  {path}: saved {_fmt(saved[path])}, not in the model")
        elif (saved[path]["shape"], saved[path]["dtype"]) != (
            expected[path]["shape"],
            expected[path]["dtype"],
        ):
            problems.append(f"  {path}: saved {_fmt(saved[path])}, expected {_fmt(expected[path])}")
    if problems:
        more = len(problems) - _MAX_LISTED
        lines = problems[:_MAX_LISTED] + ([f"  ... and {more} more"] if more > 0 else [])
        raise CheckpointMismatchError(
            f"{where} was written for a different model: {len(problems)} of "
            f"{len(set(saved) | set(expected))} arrays differ (path: saved vs expected):\n"
            + "\n".join(lines)
            + "\nUse a fresh workdir, or delete the old checkpoints, to train this model."
        )


# ----------------------------------------------------------------------------- data state


def _encode_data_state(data_state: Any) -> dict[str, Any]:
    """JSON envelope: bytes (a grain iterator state) as base64, anything else as JSON."""
    if isinstance(data_state, bytes | bytearray):
        return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
    return {"kind": "json", "value": data_state}


def _decode_data_state(envelope: Mapping[str, Any]) -> Any:
    if envelope.get("kind") == "bytes":
        return base64.b64decode(envelope["value"])
    return envelope.get("value")


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores (train_state, data_state, meta) under ``directory/<step>/``.

    Args:
      directory: the checkpoint root (created if missing), e.g. ``workdir/"checkpoints"``.
      save_every: ``save`` writes only steps that are multiples of this (unless ``force=True``).
      keep: how many of the latest checkpoints to keep on disk.
      async_save: write in a background thread (arrays are copied off the device before ``save``
        returns, so the caller may donate or overwrite them); ``wait()`` blocks until written.
      create: create ``directory`` if missing; False to read an existing one without writing anything.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
        create: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory")
        # No PreemptionCheckpointingPolicy: SIGTERM is handled by sfgrpo.preemption, which saves through
        # ``save(force=True)`` and stops the run (Orbax's policy needs jax.distributed and only saves).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            enable_async_checkpointing=async_save,
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    # -- queries

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write."""
        return self._manager.should_save(step)

    # -- save / restore

    def save(
        self,
        step: int,
        train_state: Any,
        data_state: Any = None,
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Writes ``step`` if ``step % save_every == 0`` or ``force``; returns whether it wrote.

        A step already on disk is never overwritten (returns False), so a resumed run may safely re-save
        its restored step. ``data_state`` must be JSON-serialisable or bytes; ``meta`` a JSON dict.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        args = ocp.args.Composite(
            **{
                TRAIN_STATE: ocp.args.StandardSave(_to_savable(train_state)),
                DATA_STATE: ocp.args.JsonSave(_encode_data_state(data_state)),
                META: ocp.args.JsonSave(dict(meta or {})),
                LAYOUT: ocp.args.JsonSave({"version": _LAYOUT_VERSION, "tree": tree_layout(train_state)}),
            }
        )
        return bool(self._manager.save(step, args=args, force=True))

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of ``step`` alone (no arrays are read); CheckpointCorruptError if unreadable."""
        where = f"checkpoint {self.directory / str(step)}"
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        except Exception as err:  # any read failure means the step is unusable
            raise CheckpointCorruptError(f"{where} is unreadable ({_brief(err)})", _brief(err)) from err
        return dict(out[META] or {})

    def restore(self, step: int | None = None, *, abstract_train_state: Any) -> tuple[Any, Any, dict]:
        """Reads (train_state, data_state, meta) of ``step`` (default: the latest).

        Args:
          step: the step to read; None for the latest.
          abstract_train_state: the target pytree, same structure as saved: ``jax.ShapeDtypeStruct`` leaves
            (with ``sharding=`` to restore jax arrays onto that sharding; without, numpy arrays come back),
            or concrete arrays (their shardings are used), ``nnx.State`` subtrees, typed-key leaves and
            Python scalars as in the module docstring.

        Raises:
          CheckpointNotFoundError: no checkpoint, or not this step.
          CheckpointMismatchError: the saved arrays differ from the target (listed, saved vs expected).
          CheckpointCorruptError: the step directory is incomplete or unreadable.
        """
        self._manager.reload()  # pick up steps written by another process or run since construction
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(f"no checkpoint found in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        where = f"checkpoint {self.directory / str(step)}"
        try:
            layout = self._manager.restore(step, args=ocp.args.Composite(**{LAYOUT: ocp.args.JsonRestore()}))
            saved = layout[LAYOUT]["tree"]
        except Exception as err:  # any read failure means the step is unusable
            raise CheckpointCorruptError(
                f"{where} is unreadable or not an sfgrpo checkpoint ({_brief(err)}); "
                f"delete it to fall back to an earlier step (have {steps})",
                _brief(err),
            ) from err
        check_layout(saved, tree_layout(abstract_train_state), where)
        target, finish = _restore_plan(abstract_train_state, saved)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        TRAIN_STATE: ocp.args.StandardRestore(target),
                        DATA_STATE: ocp.args.JsonRestore(),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as err:
            raise CheckpointCorruptError(
                f"{where} could not be read ({_brief(err)}); delete it to fall back to an earlier step "
                f"(have {steps})",
                _brief(err),
            ) from err
        return finish(out[TRAIN_STATE]), _decode_data_state(out[DATA_STATE]), dict(out[META] or {})

    # -- lifecycle

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- single-pytree cache


def save_params(path: str | Path, params: Any, *, overwrite: bool = False) -> None:
    """Saves one pytree (e.g. the supervised warm-start parameters) to the directory ``path``.

    Synchronous and collective (every process calls it). Refuses to replace an existing ``path`` unless
    ``overwrite``; Orbax writes to a temporary directory first, so ``path`` exists only once complete.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(_to_savable(params)),
        layout=ocp.args.JsonSave({"version": _LAYOUT_VERSION, "tree": tree_layout(params)}),
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=args, force=overwrite)


def load_params(path: str | Path, abstract: Any) -> Any:
    """Restores a pytree written by :func:`save_params` into the shardings of ``abstract``.

    Raises the same errors as :meth:`Checkpointer.restore` (not found / mismatch / corrupt).
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no saved parameters at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            saved = ckptr.restore(path, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"][
                "tree"
            ]
        except Exception as err:
            raise CheckpointCorruptError(
                f"{path} is unreadable or not saved by save_params ({_brief(err)})"
            ) from err
        check_layout(saved, tree_layout(abstract), f"parameters at {path}")
        target, finish = _restore_plan(abstract, saved)
        try:
            out = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as err:
            raise CheckpointCorruptError(f"parameters at {path} could not be read ({_brief(err)})") from err
    return finish(out["params"])
