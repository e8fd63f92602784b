"""A prompt-embedding cache: the text encoder's features of every instruction of a dataset, computed once.

Instructions do not change during RL, so with ``model.prompt_cache`` set the trainer encodes every distinct
instruction of the train and test splits (and the empty one, for CFG) before training, stores the features
on disk, frees the text encoder, and feeds batches their features instead of token ids. For FLUX.2-klein-4B
one instruction is 512 tokens x 7680 bfloat16 features, 7.5 MiB: budget disk for the number of distinct
instructions (10k instructions: 75 GiB). The files are memory-mapped, so host memory holds only what the
batches read.

Layout of the cache directory:
  meta.json      {"fingerprint", "dtype", "shape": [U, T, D], "rows": {sha1(instruction): row}}
  features.npy   (U, T, D) features (bfloat16 stored as its uint16 bits)
  uncond.npy     (1, T, D) features of the empty instruction
A cache built for another model, layer choice or length (another fingerprint), or missing an instruction,
is rebuilt, with a warning saying why; a complete one is reused without loading the text encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

_log = logging.getLogger(__name__)

META, FEATURES, UNCOND = "meta.json", "features.npy", "uncond.npy"
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def instruction_key(instruction: str) -> str:
    return hashlib.sha1(instruction.encode("utf-8")).hexdigest()


def _stored(x: np.ndarray) -> np.ndarray:
    """bfloat16 has no .npy type: store its bits."""
    return x.view(np.uint16) if x.dtype == _DTYPES["bfloat16"] else x


class PromptCache:
    """An opened cache: ``lookup(instructions) -> (B, T, D)`` features; ``uncond`` (1, T, D)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"prompt cache {self.directory}: no {META} (it was never built)")
        self.meta = json.loads(meta_path.read_text())
        self.dtype = _DTYPES[self.meta["dtype"]]
        self.rows: dict[str, int] = self.meta["rows"]
        self._features = np.load(self.directory / FEATURES, mmap_mode="r")
        self.uncond = np.load(self.directory / UNCOND).view(self.dtype)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def missing(self, instructions: Iterable[str]) -> list[str]:
        return [t for t in instructions if instruction_key(t) not in self.rows]

    def lookup(self, instructions: Sequence[str]) -> np.ndarray:
        """(B,) instructions -> (B, T, D) features; an instruction not in the cache is an error."""
        absent = self.missing(instructions)
        if absent:
            raise KeyError(
                f"prompt cache {self.directory}: {len(absent)} instruction(s) not cached, e.g. "
                f"{absent[0]!r}; the dataset changed since the cache was built: delete it to rebuild"
            )
        rows = [self.rows[instruction_key(t)] for t in instructions]
        return np.stack([np.asarray(self._features[r]).view(self.dtype) for r in rows])


def reuse(directory: str | Path, instructions: Sequence[str], fingerprint: str) -> PromptCache | None:
    """The cache in ``directory`` if it is complete for ``instructions`` and was built for ``fingerprint``;
    otherwise None (with a warning saying why, when a cache is there)."""
    directory = Path(directory)
    if not (directory / META).is_file():
        return None
    cache = PromptCache(directory)
    if cache.fingerprint != fingerprint:
        msg = "prompt cache %s was built for %s, not %s: it will be rebuilt"
        _log.warning(msg, directory, cache.fingerprint, fingerprint)
        return None
    if absent := cache.missing(instructions):
        _log.warning("prompt cache %s lacks %d instruction(s): it will be rebuilt", directory, len(absent))
        return None
    _log.info("prompt cache %s: %d instructions, reused", directory, len(cache.rows))
    return cache


def open_or_build(
    directory: str | Path,
    instructions: Sequence[str],
    encode: Callable[[Sequence[str]], np.ndarray],
    *,
    fingerprint: str,
    dtype: str,
    batch_size: int,
) -> PromptCache:
    """The cache for ``instructions``, reused when every host has it, otherwise built; on N processes.

    ``encode`` is a collective (every host encodes its rows of one global batch), so every process runs
    the build; the files are written by process 0 alone when ``directory`` is on a filesystem the hosts
    share, and by every process when it is on each host's local disk (``runtime.writes_here``).
    """
    from sfgrpo import runtime  # noqa: PLC0415 - jax stays out of the cache's file handling

    cache = reuse(directory, instructions, fingerprint)
    if runtime.all_processes(cache is not None):
        return cache
    write = runtime.writes_here(directory)
    build(
        directory,
        instructions,
        encode,
        fingerprint=fingerprint,
        dtype=dtype,
        batch_size=batch_size,
        write=write,
    )
    runtime.barrier("prompt cache written")
    return PromptCache(directory)


def build(
    directory: str | Path,
    instructions: Iterable[str],
    encode: Callable[[Sequence[str]], np.ndarray],
    *,
    fingerprint: str,
    dtype: str,
    batch_size: int,
    write: bool = True,
) -> PromptCache | None:
    """(Re)builds the cache in ``directory`` (replacing what is there) and opens it.

    With ``write=False`` every instruction is still encoded (``encode`` may be a collective that every
    process must join) but nothing is written, and None is returned.

    Args:
      instructions: every instruction the run will see (duplicates are encoded once).
      encode: (batch_size,) instructions -> (batch_size, T, D) features (the jitted text encoder).
      fingerprint: names the encoder (model folder, layers, length, dtype); ``reuse`` compares it.
      dtype: 'float32' or 'bfloat16', how the features are stored.
      batch_size: instructions per ``encode`` call (the last call is padded to it, to compile once).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"prompt cache dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    directory = Path(directory)
    unique = list(dict.fromkeys(instructions))

    def encode_padded(texts: Sequence[str]) -> np.ndarray:
        padded = list(texts) + [""] * (batch_size - len(texts))
        return np.asarray(encode(padded))[: len(texts)].astype(_DTYPES[dtype])

    if not write:
        encode_padded([""])
        for start in range(0, len(unique), batch_size):
            encode_padded(unique[start : start + batch_size])
        return None
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _log.info("prompt cache: writing %s", directory)
    uncond = encode_padded([""])
    shape = (len(unique), *uncond.shape[1:])
    stored = np.lib.format.open_memmap(
        directory / FEATURES, mode="w+", dtype=_stored(uncond).dtype, shape=shape
    )
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        stored[start : start + len(chunk)] = _stored(encode_padded(chunk))
        _log.info("prompt cache: encoded %d / %d instructions", start + len(chunk), len(unique))
    stored.flush()
    del stored
    np.save(directory / UNCOND, _stored(uncond))
    rows = {instruction_key(t): i for i, t in enumerate(unique)}
    meta = {"fingerprint": fingerprint, "dtype": dtype, "shape": list(shape), "rows": rows}
    (directory / META).write_text(json.dumps(meta))  # written last: its presence marks a complete cache
    return PromptCache(directory)


def split_instructions(source: Sequence) -> list[str]:
    """Every instruction of a random-access source of records (EditRecords or TFDS example dicts)."""
    out = []
    for i in range(len(source)):
        raw = source[i]
        text = raw.instruction if hasattr(raw, "instruction") else raw["instruction"]
        out.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return out
