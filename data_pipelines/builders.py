"""TFDS builders (ArrayRecord, no TensorFlow) that convert every source into the shared schema.

Each builder reads raw items cheaply (``_items``), converts them in a thread pool (``_convert``: read
and check the image, build the conversation) and keeps a ``SplitStats`` per split so that
``read == written + sum(skipped)``. ``strict=True`` raises on the first bad record, naming its id.

Datasets land in ``data_dir/<name>[/<config>]/<version>/`` and are read back with
``open_source(data_dir, name, split)`` (raw ArrayRecord bytes + ``schema.parse_example``), which
needs neither registration nor TensorFlow. Builders are not registered with TFDS
(``skip_registration``) so their names never clash with TFDS's own catalog.

A builder whose text holds boxes declares their codec (``box_codec=``): it is written beside the
dataset as ``<version>/box_codec.json`` and read back with ``read_box_codec(data_dir, name)``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import schema
from data_pipelines.boxes import BoxCodec
from data_pipelines.schema import BadRecord, Record

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BOX_CODEC_FILE = "box_codec.json"  # in the dataset's version dir: the codec of the boxes its text holds


@dataclasses.dataclass
class SplitStats:
    """Accounting of one converted split: ``read == written + sum(skipped.values())``; ``text_only`` of
    the written records have no image."""

    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    text_only: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = {"read": self.read, "written": self.written, "skipped": dict(sorted(self.skipped.items()))}
        return {**out, "text_only": self.text_only} if self.text_only else out


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int, window: int = 256):
    """``map(fn, items)`` in a thread pool, results in input order, at most ``window`` in flight."""
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def check_image(data: bytes | None, record_id: str) -> bytes:
    """Return ``data`` if it is a decodable image, else raise ``BadRecord``."""
    from data_pipelines.images import decode

    if data is None:
        raise BadRecord("missing_image", record_id)
    decode(data, record_id)
    return data


def read_image_file(path: str, record_id: str) -> bytes:
    """Bytes of an image file that exists and decodes, else ``BadRecord``."""
    if not os.path.isfile(path):
        raise BadRecord("missing_image", record_id, f"{path} not found")
    with open(path, "rb") as f:
        return check_image(f.read(), record_id)


class _EpathFiles:
    """The slice of ``tf.io.gfile`` / ``tf.errors`` that TFDS's write shuffle uses, on etils' epath."""

    class io:  # noqa: N801 - named as the module it stands for
        class gfile:  # noqa: N801
            GFile = staticmethod(lambda path, mode: epath.Path(path).open(mode))
            exists = staticmethod(lambda path: epath.Path(path).exists())
            remove = staticmethod(lambda path: epath.Path(path).unlink())

    class errors:  # noqa: N801
        class ResourceExhaustedError(Exception):  # epath raises OSError instead: never caught here
            message = ""


def spill_without_tensorflow() -> None:
    """TFDS's write shuffle keeps 1 GB of serialized records in memory and writes the rest to bucket
    files through ``tf.io.gfile``, so without TensorFlow (not a dependency) every build of more than
    1 GB stopped there. Without TensorFlow the buckets are written through epath: the same bytes, the
    same record order."""
    if importlib.util.find_spec("tensorflow") is None:  # looked up, not imported: TF's import is slow
        from tensorflow_datasets.core import shuffle

        shuffle.tf = _EpathFiles


class ConverterBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: subclasses set ``name`` and implement ``_split_names``, ``_items``, ``_convert``; one whose
    text holds boxes passes their ``box_codec`` (written as ``box_codec.json``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Shared pargo_jax record schema."}
    url_infos = None  # nothing to download; also avoids TFDS probing for a checksums file

    def __init__(
        self,
        *,
        data_dir: str,
        config: str | None = None,
        num_workers: int = 4,
        strict: bool = False,
        progress: bool = True,
        box_codec: BoxCodec | None = None,
        **kwargs,
    ):
        self.num_workers, self.strict, self.progress = num_workers, strict, progress
        self.box_codec = box_codec
        self.stats: dict[str, SplitStats] = {}
        cfg = tfds.core.BuilderConfig(name=config) if config else None
        super().__init__(data_dir=data_dir, config=cfg, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=schema.features(), description=self.__doc__)

    # --- to implement ----------------------------------------------------------------------------
    def _split_names(self) -> list[str]:
        raise NotImplementedError

    def _items(self, split: str) -> Iterator[Any]:
        """Raw items of a split (cheap). May yield a ``BadRecord`` to count a source-level failure."""
        raise NotImplementedError

    def _convert(self, item: Any) -> Record:
        """Raw item -> validated ``Record``; raises ``BadRecord``. Runs in worker threads."""
        raise NotImplementedError

    def _count(self, split: str) -> int | None:
        return None

    # --- generic machinery -----------------------------------------------------------------------
    def _safe_convert(self, item: Any) -> Record | BadRecord:
        if isinstance(item, BadRecord):
            return item
        try:
            return schema.validate(self._convert(item))
        except BadRecord as e:
            return e

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        super()._download_and_prepare(dl_manager, download_config)
        if self.box_codec is not None:  # into TFDS's temporary dir: it lands with the dataset, or not at all
            text = json.dumps(self.box_codec.as_dict()) + "\n"
            (epath.Path(self.data_dir) / BOX_CODEC_FILE).write_text(text)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._split_names()}

    def _generate_examples(self, split: str):
        from tqdm import tqdm

        stats = self.stats.setdefault(split, SplitStats())
        results = ordered_map(self._safe_convert, self._items(split), self.num_workers)
        bar = tqdm(results, total=self._count(split), desc=f"{self.name} {split}", disable=not self.progress)
        seen: set[str] = set()  # the first record of an id is kept: boxes and evaluations join by id
        for index, res in enumerate(bar):
            stats.read += 1
            if not isinstance(res, BadRecord) and res.id in seen:
                res = BadRecord("duplicate_id", res.id, "an earlier record has this id")
            if isinstance(res, BadRecord):
                stats.skipped[res.reason] += 1
                if self.strict:
                    raise res
                continue
            seen.add(res.id)
            stats.written += 1
            stats.text_only += res.text_only
            yield index, schema.to_example(res)

    def build(self, overwrite: bool = True) -> dict[str, dict[str, Any]]:
        """Convert every split (replacing an existing copy) and return the per-split accounting."""
        if overwrite and os.path.isdir(self.data_dir):
            shutil.rmtree(self.data_dir)
        from tensorflow_datasets.core.utils import tqdm_utils

        spill_without_tensorflow()
        tfds_bars = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)  # TFDS's own bars repeat ours (and show with progress=False)
        try:
            self.download_and_prepare()
        finally:
            tfds.display_progress_bar(tfds_bars)
        return self.summary()

    # TFDS prints "Downloading and preparing ..." / "... downloaded and prepared": nothing is downloaded
    # here, and the build CLI prints its own summary with the output path.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def summary(self) -> dict[str, dict[str, Any]]:
        return {split: s.as_dict() for split, s in self.stats.items()}


def format_summary(name: str, summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Human-readable table: records read / written / skipped by reason, per split."""
    lines = [f"{name}: {'split':<10} {'read':>9} {'written':>9} {'skipped':>9}  reasons"]
    for split, s in summary.items():
        skipped = sum(s["skipped"].values())
        reasons = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "-"
        if s.get("text_only"):
            reasons += f" (written: {s['text_only']} text-only)"
        lines.append(
            f"{' ' * len(name)}  {split:<10} {s['read']:>9} {s['written']:>9} {skipped:>9}  {reasons}"
        )
    return "\n".join(lines)


def dataset_dir(data_dir: str, name: str) -> str:
    """``data_dir/name/<latest version>`` of a built dataset; clear error if there is none."""
    root = os.path.join(data_dir, *name.split("/"))
    versions = sorted(
        (
            d
            for d in glob.glob(os.path.join(root, "*"))
            if os.path.exists(os.path.join(d, "dataset_info.json"))
        ),
        key=lambda d: tuple(int(x) for x in re.findall(r"\d+", os.path.basename(d))),
    )
    if not versions:
        raise FileNotFoundError(
            f"No built dataset {name!r} under {data_dir}; build it with "
            f"`python -m data_pipelines.build --dataset ... --data_dir {data_dir}`."
        )
    return versions[-1]


def read_box_codec(data_dir: str, name: str) -> BoxCodec | None:
    """The codec of the boxes in the text of the built dataset ``name`` (its ``box_codec.json``); None
    when it declares none (caption-only data, builds older than the file)."""
    path = epath.Path(dataset_dir(data_dir, name)) / BOX_CODEC_FILE
    if not path.exists():
        return None
    return BoxCodec.from_dict(json.loads(path.read_text()), where=str(path))


class RecordSource:
    """Random access to one split of a built dataset: ``source[i]`` is the stored example dict.

    Reads raw ArrayRecord bytes through TFDS and parses them with ``schema.parse_example``.
    Picklable, so grain worker processes can open it.
    """

    def __init__(self, data_dir: str, name: str, split: str):
        builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
        if split not in builder.info.splits:
            splits = sorted(builder.info.splits)
            raise ValueError(f"Dataset {name!r} has no split {split!r}; it has {splits}.")
        self.name, self.split = name, split
        self._raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return schema.parse_example(self._raw[index])

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read (grain's ``SupportsBatchedReadRandomAccessDataSource``): grain's per-read
        bookkeeping then runs once per batch. Records are read one by one: ArrayRecord's own batched
        read starts a thread pool per call, which costs more than it saves here."""
        return [schema.parse_example(self._raw[i]) for i in indices]

    def __repr__(self) -> str:
        return f"RecordSource({self.name}/{self.split}, {len(self)} records)"


def open_source(data_dir: str, name: str, split: str) -> RecordSource:
    """Random-access data source (ArrayRecord) of one split of a built dataset."""
    return RecordSource(data_dir, name, split)


# ----------------------------------------------------------------------------------------------------
# Generic: records already in the schema (tests, benchmark, synthetic data)
# ----------------------------------------------------------------------------------------------------
class RecordsBuilder(ConverterBuilder, skip_registration=True):
    """Writes given ``Record`` objects (validated) or raw example dicts (written as-is, for tests)."""

    name = "records"

    def __init__(self, *, splits: Mapping[str, Iterable[Record | dict]], name: str = "records", **kwargs):
        name, _, config = name.partition("/")  # "name/config" -> data_dir/name/config/<version>
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"Dataset name {name!r} must be snake_case (letters, digits, _); rename it.")
        self.name = name  # instance attribute: one builder class serves any dataset name
        self._splits = dict(splits)
        super().__init__(config=config or kwargs.pop("config", None), **kwargs)

    def _split_names(self):
        return list(self._splits)

    def _items(self, split):
        return iter(self._splits[split])

    def _safe_convert(self, item):
        if isinstance(item, dict):  # raw example: written unchecked so tests can store bad records
            return item
        return super()._safe_convert(item)

    def _convert(self, item):
        return item

    def _generate_examples(self, split):
        stats = self.stats.setdefault(split, SplitStats())
        for index, item in enumerate(self._items(split)):
            stats.read += 1
            res = self._safe_convert(item)
            if isinstance(res, BadRecord):
                stats.skipped[res.reason] += 1
                if self.strict:
                    raise res
                continue
            stats.written += 1
            yield index, (res if isinstance(res, dict) else schema.to_example(res))


def write_records(
    data_dir: str, name: str, splits: Mapping[str, Iterable[Record | dict]], **kwargs
) -> dict[str, dict[str, Any]]:
    """Write records into ``data_dir/name`` as an ArrayRecord TFDS dataset; returns the accounting."""
    return RecordsBuilder(splits=splits, name=name, data_dir=data_dir, **kwargs).build()
