"""Real image-caption sources, indexed once: webdataset shards, ``datasets`` datasets, plain folders.

Each source is scanned once when a run starts: every sample's key, caption(s) and location
are recorded and its image validated, so unusable samples are skipped and counted by reason
before training, and training reads any sample by its location afterwards (random access:
byte offsets in local tars, rows of a ``datasets`` table, files of a folder). Random access is
what gives real data the embedded world's step-addressed batches and exact resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from braceexpand import braceexpand
from tqdm.auto import tqdm

from data.images import IMAGE_EXTENSIONS, ImageSpec, check_image, decode

CAPTION_EXTENSIONS = ("txt", "caption")


@dataclass
class Record:
    """One usable sample: its key (the base pair it belongs to), captions (the first is the main
    one; more from a ``captions`` field) and where its image bytes are."""

    key: str
    captions: list[str]
    loc: tuple
    original: bool = True  # False for the repeats memsieve-data build wrote (their metadata's "copy" > 0)


def quiet() -> bool:
    return bool(os.environ.get("CI"))


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def captions_of(text: bytes | str | None, meta: dict | None) -> list[str]:
    """Main caption from the ``.txt`` (else the metadata's ``caption``), then any ``captions`` list."""
    meta = meta or {}
    main = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    main = (main if main is not None else meta.get("caption") or meta.get("text") or "").strip()
    extra = [str(c).strip() for c in (meta.get("captions") or []) if str(c).strip()]
    return ([main] if main else []) + [c for c in extra if c != main]


def parse_json(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


class Reader:
    """Reads image bytes by location; a source-specific subclass per kind of source."""

    def read(self, locs: list[tuple]) -> list[bytes]:
        raise NotImplementedError


@dataclass
class SourceIndex:
    """Every usable record of a source, how to read them, and how many samples were skipped why."""

    name: str
    records: list[Record]
    reader: Reader
    skipped: Counter = field(default_factory=Counter)


class Scan:
    """Validates candidate samples into records, counting each skip by reason."""

    def __init__(self, name: str, spec: ImageSpec):
        self.name, self.spec = name, spec
        self.records: list[Record] = []
        self.skipped: Counter = Counter()

    def add(self, key: str, image: bytes | None, captions: list[str], loc: tuple, original: bool = True) -> None:
        reason = "missing_image" if image is None else check_image(image, self.spec)
        if reason is None and not captions:
            reason = "missing_caption"
        if reason is not None:
            self.skipped[reason] += 1
        else:
            self.records.append(Record(key, captions, loc, original))

    def finish(self, reader: Reader) -> SourceIndex:
        if not self.records:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "no samples found"
            raise ValueError(f"data source {self.name} has no usable image-caption pairs ({detail})")
        return SourceIndex(self.name, self.records, reader, self.skipped)


# ---------------------------------------------------------------- webdataset shards


def expand_urls(urls) -> list[str]:
    """Shard URLs from a string or list: brace patterns expanded, a local directory means its ``*.tar``."""
    items = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    out: list[str] = []
    for item in items:
        for url in braceexpand(item):
            path = Path(url)
            if "://" not in url and path.is_dir():
                out.extend(str(p) for p in sorted(path.glob("*.tar")))
            else:
                out.append(url)
    if not out:
        raise ValueError(f"data.urls={urls!r} names no shards; give tar paths, a brace pattern or a folder of .tar")
    return out


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


class TruncatedShard(Exception):
    """Raised by :func:`tar_groups` after the last readable group of a damaged shard."""


TAR_ERRORS = (tarfile.TarError, EOFError, OSError)
BLOCK = 512


def tar_groups(url: str) -> Iterator[tuple[str, dict[str, tuple[bytes, tarfile.TarInfo]]]]:
    """Consecutive members of one shard grouped by key, as webdataset groups them.

    A truncated shard (an interrupted download) yields what precedes the damage, then raises
    :class:`TruncatedShard`: a read error, or a local file that ends before its end-of-archive blocks.
    """
    local = is_local(url)
    path = local_path(url)
    if local and not Path(path).exists():
        raise FileNotFoundError(f"shard {path} does not exist; check data.urls")
    key, group, end, damage = None, {}, 0, None
    try:
        if local:
            stream = tarfile.open(path, mode="r:*")
        else:
            import webdataset as wds

            stream = tarfile.open(fileobj=wds.gopen(url), mode="r|*")
        with stream:
            for member in stream:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key and group:
                    yield key, group
                    group = {}
                key = k
                handle = stream.extractfile(member)
                group[ext] = (handle.read() if handle else b"", member)
                end = max(end, member.offset_data + member.size)
    except TAR_ERRORS as err:
        damage, group = " ".join(str(err).split()) or type(err).__name__, {}  # the partial group is lost
    if damage is None and local and os.path.getsize(path) < -(-end // BLOCK) * BLOCK + 2 * BLOCK:
        damage = "it ends before its end-of-archive blocks"
    if group and damage is None:  # the last group of a truncated shard may lack members never written
        yield key, group
    if damage is not None:
        raise TruncatedShard(f"shard {path} is truncated or damaged ({damage})")


def readable_samples(url: str) -> Iterator[dict]:
    """webdataset's samples of one shard, up to the damage of a truncated one (the index already
    counted and named it)."""
    import webdataset as wds

    try:
        yield from wds.tarfile_samples(iter([{"url": url}]))
    except TAR_ERRORS + (ValueError,):
        return


class TarReader(Reader):
    """Local shards by byte offset (``os.pread``: safe in forked DataLoader workers); remote shards
    by streaming each needed shard once per call."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {"urls": self.urls, "_fds": {}}

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(local_path(self.urls[shard]), os.O_RDONLY)
        return self._fds[shard]

    def read(self, locs: list[tuple]) -> list[bytes]:
        out: dict[int, bytes] = {}
        remote: dict[int, dict[str, list[int]]] = {}
        for i, (shard, offset, size, name) in enumerate(locs):
            if is_local(self.urls[shard]):
                out[i] = os.pread(self._fd(shard), size, offset)
            else:
                remote.setdefault(shard, {}).setdefault(name, []).append(i)
        for shard, wanted in remote.items():
            try:
                for _, group in tar_groups(self.urls[shard]):
                    for data, member in group.values():
                        for i in wanted.get(member.name, ()):
                            out[i] = data
            except TruncatedShard:
                pass  # indexed records lie before the damage
        return [out[i] for i in range(len(locs))]


def shard_signature(shards: list[str], spec: ImageSpec) -> str | None:
    """What an index of local shards depends on: their paths, sizes and modification times, and
    the validation settings (``None`` for shards at URLs, which are not cached)."""
    if not all(map(is_local, shards)):
        return None
    stats = [(local_path(u), os.stat(local_path(u)).st_size, os.stat(local_path(u)).st_mtime_ns) for u in shards
             if Path(local_path(u)).exists()]
    blob = json.dumps([stats, spec.min_size, spec.max_pixels, spec.resolution])
    return hashlib.sha1(blob.encode()).hexdigest()


def scan_shards(urls, spec: ImageSpec, cache: str | None = None) -> SourceIndex:
    """Index shards, or load the index an earlier run saved under ``cache`` (``data.index_cache``)
    for the very same shard files; every rank of a multi-GPU run then skips the pass."""
    shards = expand_urls(urls)
    label = f"data.urls={urls!r}" if isinstance(urls, str) else f"data.urls=[{shards[0]!r}, ...] ({len(shards)} shards)"
    signature = shard_signature(shards, spec) if cache else None
    saved = Path(cache).expanduser() / f"{signature}.json" if signature else None
    if saved is not None and saved.exists():
        state = json.loads(saved.read_text())
        records = [Record(k, c, tuple(loc), o) for k, c, loc, o in state["records"]]
        return SourceIndex(label, records, TarReader(shards), Counter(state["skipped"]))
    index = scan_tar_files(shards, label, spec)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"records": [[r.key, r.captions, list(r.loc), r.original] for r in index.records],
                                   "skipped": dict(index.skipped)}))
        os.replace(tmp, saved)  # atomic: ranks racing to write leave one whole file
    return index


def scan_tar_files(shards: list[str], label: str, spec: ImageSpec) -> SourceIndex:
    scan = Scan(label, spec)
    for shard, url in enumerate(tqdm(shards, desc="index shards", disable=quiet())):
        before = len(scan.records)
        try:
            for key, group in tar_groups(url):
                image_ext = next((e for e in group if e in IMAGE_EXTENSIONS), None)
                if image_ext is None and not any(e in CAPTION_EXTENSIONS or e == "json" for e in group):
                    continue  # not a sample (e.g. a stats file)
                meta = parse_json(group["json"][0]) if "json" in group else {}
                text = next((group[e][0] for e in CAPTION_EXTENSIONS if e in group), None)
                image, member = group[image_ext] if image_ext else (None, None)
                loc = (shard, member.offset_data, member.size, member.name) if member else ()
                scan.add(str(meta.get("key") or key), image, captions_of(text, meta), loc, not meta.get("copy"))
        except TruncatedShard as err:
            scan.skipped["truncated_shard"] += 1
            logging.getLogger(__name__).warning("%s; skipped the rest of it, kept its %d samples before the damage",
                                                err, len(scan.records) - before)
    return scan.finish(TarReader(shards))


# ---------------------------------------------------------------- plain folder


class FileReader(Reader):
    def __init__(self, root: str):
        self.root = root

    def read(self, locs: list[tuple]) -> list[bytes]:
        return [Path(self.root, loc[0]).read_bytes() for loc in locs]


def scan_folder(path: str, spec: ImageSpec) -> SourceIndex:
    """Every image under ``path`` with the ``.txt`` of the same name as its caption (a ``.json`` of the
    same name may add a ``captions`` list)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={path} is not a folder of images with .txt captions")
    scan = Scan(f"data.path={path}", spec)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    for file in tqdm(files, desc="index folder", disable=quiet()):
        stem = file.with_suffix("")
        text = stem.with_suffix(".txt").read_bytes() if stem.with_suffix(".txt").exists() else None
        meta = parse_json(stem.with_suffix(".json").read_bytes()) if stem.with_suffix(".json").exists() else {}
        rel = file.relative_to(root).as_posix()
        scan.add(str(meta.get("key") or Path(rel).with_suffix("").as_posix()), file.read_bytes(),
                 captions_of(text, meta), (rel,))
    return scan.finish(FileReader(str(root)))


# ---------------------------------------------------------------- datasets (imagefolder, parquet, hub)


class TableReader(Reader):
    def __init__(self, table, column: str):
        self.table, self.column = table, column

    def read(self, locs: list[tuple]) -> list[bytes]:
        rows = self.table.select([loc[0] for loc in locs])[self.column]
        return [image_bytes(v) for v in rows]


def image_bytes(value) -> bytes | None:
    """The bytes of an undecoded ``datasets.Image`` value ({bytes, path})."""
    if value is None:
        return None
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path")
    return Path(path).read_bytes() if path and Path(path).exists() else None


# Where datasets' imagefolder builder finds captions: at the top of the folder or in a split folder.
METADATA = [f"{top}metadata.{ext}" for top in ("", "*/") for ext in ("jsonl", "csv", "parquet")]


def table_key(path: str, root: str | None) -> str:
    """A table row's key from its image path: relative to the data folder when under it, without the
    suffix, so ``a/1.jpg`` and ``b/1.jpg`` stay two pairs (the file name alone made them one)."""
    file = Path(path).with_suffix("")
    if root is not None:
        try:
            return file.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return file.as_posix()


def scan_table(cfg, spec: ImageSpec) -> SourceIndex:
    """A ``datasets`` table: ``imagefolder`` (a folder with ``metadata.jsonl``), parquet files or a hub id."""
    import datasets

    if quiet():
        datasets.disable_progress_bars()
    kwargs = {"split": cfg.get("split", "train")}
    if cfg.source == "imagefolder":
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"data.path={cfg.path} is not an imagefolder (images plus metadata.jsonl)")
        # Checked here: datasets would say only "doesn't contain any data files", after walking the tree.
        if not any(next(Path(cfg.path).glob(pattern), None) for pattern in METADATA):
            caption = cfg.get("caption_column", "text")
            raise FileNotFoundError(f"data.path={cfg.path} has no metadata.jsonl (nor .csv/.parquet, nor in a split "
                                    f"folder); imagefolder needs one with file_name and {caption} per image "
                                    f"(data=folder reads captions from .txt files)")
        name, kwargs["data_dir"] = "imagefolder", str(cfg.path)
        label = f"data.path={cfg.path}"
    else:
        name = cfg.name
        if cfg.get("data_files"):
            kwargs["data_files"] = list(cfg.data_files) if not isinstance(cfg.data_files, str) else cfg.data_files
        if cfg.get("data_dir"):
            kwargs["data_dir"] = str(cfg.data_dir)
        label = f"data.name={name}"
    table = datasets.load_dataset(name, **kwargs)
    image_col, caption_col = cfg.get("image_column", "image"), cfg.get("caption_column", "text")
    for col in (image_col, caption_col):
        if col not in table.column_names:
            raise ValueError(f"{label} has no column {col!r}; its columns are {table.column_names} "
                             "(set data.image_column / data.caption_column)")
    table = table.cast_column(image_col, datasets.Image(decode=False))
    scan = Scan(label, spec)
    extra = "captions" if "captions" in table.column_names else None
    keys = table["key"] if "key" in table.column_names else None
    for i, row in enumerate(tqdm(table, desc="index table", disable=quiet())):
        value = row[image_col]
        meta = {"captions": row[extra]} if extra else {}
        if keys is not None:
            key = str(keys[i])
        elif value and value.get("path"):
            key = table_key(value["path"], cfg.get("path") or cfg.get("data_dir"))
        else:
            key = f"{i:08d}"
        scan.add(key, image_bytes(value), captions_of(row[caption_col] or "", meta), (i,))
    return scan.finish(TableReader(table, image_col))


def scan_source(cfg, spec: ImageSpec) -> SourceIndex:
    """Index the configured real source (``data.source``)."""
    if cfg.source == "webdataset":
        return scan_shards(cfg.urls, spec, cfg.get("index_cache"))
    if cfg.source == "folder":
        return scan_folder(cfg.path, spec)
    if cfg.source in ("imagefolder", "hf"):
        return scan_table(cfg, spec)
    raise ValueError(f"data.source={cfg.source!r} is unknown; expected embedded, webdataset, imagefolder, folder "
                     "or hf")


def load_images(index: SourceIndex, records: list[int], spec: ImageSpec) -> torch.Tensor:
    """uint8 ``[n, 3, R, R]`` of the given records, centre-cropped, read lazily from the source."""
    data = index.reader.read([index.records[i].loc for i in records])
    return torch.stack([decode(d, spec) for d in data]) if data else torch.empty(0, 3, spec.resolution,
                                                                                  spec.resolution, dtype=torch.uint8)
