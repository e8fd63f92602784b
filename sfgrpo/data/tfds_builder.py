"""The TFDS dataset of editing records, stored as ArrayRecord, written and read without TensorFlow.

On disk: ``DATA_DIR/sfgrpo_edit/1.0.0/sfgrpo_edit-<split>.array_record-*``. Read it back with
``tfds.data_source("sfgrpo_edit", data_dir=DATA_DIR, split=...)`` (or ``load_split``). A stored example:

- ``id``: text; ``instruction``: text; ``meta``: text (a JSON object);
- ``source``: image (H, W, 3) uint8; ``target``: image, a 1x1 placeholder when ``has_target`` is False;
- ``regions``: a sequence of ``{bbox, label, mask}``. ``bbox`` is TFDS's BBoxFeature, so it is stored as
  (ymin, xmin, ymax, xmax) in [0, 1] (SPEC §2: converted at this edge); ``mask`` is an (H, W, 1) 0/255
  image, a 1x1 placeholder when ``has_masks`` is False.

PNG and JPEG input files are stored byte for byte; everything else is encoded as PNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sfgrpo.data.records import EditRecord, Region, encode_png

NAME = "sfgrpo_edit"
VERSION = "1.0.0"
# Stand-in for an absent target or mask: TFDS has no optional features, and 1x1 costs ~70 bytes.
_PLACEHOLDER_RGB = encode_png(np.zeros((1, 1, 3), np.uint8))
_PLACEHOLDER_MASK = encode_png(np.zeros((1, 1), bool))


def features() -> tfds.features.FeaturesDict:
    """The stored feature spec (see the module docstring)."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "source": tfds.features.Image(shape=(None, None, 3)),
            "target": tfds.features.Image(shape=(None, None, 3)),
            "has_target": np.bool_,
            "instruction": tfds.features.Text(),
            "regions": tfds.features.Sequence(
                {
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.Text(),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                }
            ),
            "has_masks": np.bool_,
            "meta": tfds.features.Text(),
        }
    )


def record_to_example(record: EditRecord) -> dict[str, Any]:
    """An ``EditRecord`` as a TFDS example dict (images as encoded bytes, boxes as ``tfds.features.BBox``)."""
    has_target = record.target is not None
    has_masks = record.has_masks
    return {
        "id": record.id,
        "source": record.source_bytes or encode_png(record.source),
        "target": (record.target_bytes or encode_png(record.target)) if has_target else _PLACEHOLDER_RGB,
        "has_target": has_target,
        "instruction": record.instruction,
        "regions": [
            {
                "bbox": tfds.features.BBox(ymin=r.box[1], xmin=r.box[0], ymax=r.box[3], xmax=r.box[2]),
                "label": r.label,
                "mask": encode_png(r.mask) if has_masks else _PLACEHOLDER_MASK,
            }
            for r in record.regions
        ],
        "has_masks": has_masks,
        "meta": json.dumps(dict(record.meta), sort_keys=True),
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def example_to_record(example: Mapping[str, Any]) -> EditRecord:
    """A decoded example (from ``tfds.data_source``) as an ``EditRecord``, boxes back to (x1, y1, x2, y2)."""
    regions = example["regions"]
    has_masks = bool(example["has_masks"])
    out = []
    for bbox, label, mask in zip(regions["bbox"], regions["label"], regions["mask"], strict=True):
        ymin, xmin, ymax, xmax = (float(v) for v in np.asarray(bbox))
        out.append(
            Region(
                box=(xmin, ymin, xmax, ymax), label=_text(label), mask=mask[..., 0] > 0 if has_masks else None
            )
        )
    return EditRecord(
        id=_text(example["id"]),
        source=example["source"],
        instruction=_text(example["instruction"]),
        regions=tuple(out),
        target=example["target"] if bool(example["has_target"]) else None,
        meta=json.loads(_text(example["meta"]) or "{}"),
    )


class SfgrpoEdit(tfds.core.GeneratorBasedBuilder):
    """Editing records in ArrayRecord. Writing needs ``splits``; reading needs only ``data_dir``."""

    VERSION = tfds.core.Version(VERSION)
    # Nothing is downloaded. Left alone, TFDS would look for a checksums file next to this module through
    # importlib_resources, a package it does not install on Python >= 3.9.
    url_infos = None

    def __init__(
        self,
        *,
        splits: Mapping[str, Callable[[], Iterable[EditRecord]]] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._splits = dict(splits or {})
        # Kept by reference: the writer may add counts (skipped records) while the splits generate, and TFDS
        # saves the metadata only after the last split.
        self._metadata = (
            metadata
            if isinstance(metadata, tfds.core.MetadataDict)
            else tfds.core.MetadataDict(metadata or {})
        )
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-editing records: source, instruction, regions (boxes, labels, masks), target.",
            features=features(),
            metadata=self._metadata,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        if not self._splits:
            raise ValueError("SfgrpoEdit was created for reading: pass splits=... to write a dataset")
        return {name: self._generate_examples(make) for name, make in self._splits.items()}

    def _generate_examples(self, make: Callable[[], Iterable[EditRecord]] = tuple) -> Iterable:
        for record in make():
            # The id keys the example; TFDS shuffles by key hash and rejects duplicates.
            yield record.id, record_to_example(record)


def write_dataset(
    data_dir: str,
    splits: Mapping[str, Callable[[], Iterable[EditRecord]]],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Writes the splits (name -> zero-argument function yielding records) and returns the dataset folder.

    Refuses to write over an existing dataset, since TFDS would silently keep the old one. ``metadata`` may
    be a ``tfds.core.MetadataDict`` that the split generators update; it is saved after they finish.
    """
    path = os.path.join(data_dir, NAME, VERSION)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileExistsError(f"a dataset already exists at {path}; choose another output folder")
    builder = SfgrpoEdit(splits=splits, metadata=metadata, data_dir=data_dir)
    builder.download_and_prepare()
    return path


class DatasetNotFound(FileNotFoundError):
    """``data_dir`` holds no readable sfgrpo_edit dataset, or not the asked split."""


def load_split(data_dir: str, split: str = "train") -> Any:
    """The random-access ArrayRecord source of one split (``len()``, ``[i]`` -> decoded example dict).

    Raises DatasetNotFound, naming the folder and what it holds, when there is no dataset or no such split
    (and creates nothing there: TFDS would otherwise make its download folders before failing).
    """
    info = os.path.join(data_dir, NAME, VERSION, "dataset_info.json")
    if not os.path.isdir(data_dir):
        raise DatasetNotFound(f"{data_dir} is not a directory")
    if not os.path.isfile(info):
        found = sorted(os.listdir(data_dir))[:8]
        raise DatasetNotFound(
            f"{data_dir} holds no {NAME} dataset (no {NAME}/{VERSION}/dataset_info.json; found {found}); "
            "make one with python -m sfgrpo.data.build"
        )
    splits = tfds.builder(NAME, data_dir=data_dir).info.splits
    if split not in splits:
        raise DatasetNotFound(f"the dataset in {data_dir} has no {split!r} split; it has {sorted(splits)}")
    return tfds.data_source(NAME, data_dir=data_dir, split=split)


def load_metadata(data_dir: str) -> dict[str, Any]:
    """The metadata stored with the dataset (box format, counts, shapes config, skipped records...)."""
    return dict(tfds.builder(NAME, data_dir=data_dir).info.metadata or {})
