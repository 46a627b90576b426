"""Training data as the loop and evaluation see it, whatever the source.

The loop only asks for batches (:meth:`TrainingData.batches`); evaluation only asks for the
base pairs (each unique pair once, to pick prompts and find their training images) and the
duplication manifest. Sources differ only in how they provide these.

Two ways to feed the loop, both exactly resumable:

- **indexed** (the embedded world, and every real source on local disk): the source is indexed
  once, so micro-step ``s`` on rank ``r`` always gets the same samples, crops and captions
  (:class:`data.sampler.DrawSampler`), as the embedded world always did;
- **stream** (webdataset shards at URLs, or ``data.access=stream``): shards are shuffled per
  epoch and split over ranks and DataLoader workers, samples pass a seeded shuffle buffer
  (:mod:`data.stream`); a resumed run skips, without decoding, the samples its workers had
  already produced, which repeats the uninterrupted run exactly for the same number of ranks
  and workers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from data.captions import CaptionPolicy, CaptionSpec, alternative_source
from data.dedup import DedupSpec, deduplicate
from data.fingerprint import ORACLE, ContentKeys, KeySpec
from data.images import ImageSpec, decode
from data.injection import DuplicationManifest, Entry, choose_pairs, choose_weighted, counts_from_list, expand_plan
from data.sampler import DrawSampler
from data.sources import SourceIndex, expand_urls, is_local, load_images, local_path, scan_source
from data.world import WORLD_MARKER, EmbeddedWorld, WorldConfig, generate_world

if TYPE_CHECKING:
    from data.stream import ShardStream


@dataclass
class BasePairs:
    """Every unique image-caption pair once, in memory: ``images`` is uint8 ``[N, 3, H, W]``."""

    keys: list[str]
    captions: list[str]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def images_at(self, indices: list[int]) -> torch.Tensor:
        """uint8 images ``[len(indices), 3, H, W]`` of the given base pairs."""
        return self.images[indices]


@dataclass
class SourcePairs:
    """Every unique pair of a real source once; images are read and decoded only when asked for,
    so evaluation can walk millions of pairs in chunks."""

    keys: list[str]
    captions: list[str]
    records: list[int]
    index: SourceIndex
    spec: ImageSpec

    def __len__(self) -> int:
        return len(self.keys)

    def images_at(self, indices: list[int]) -> torch.Tensor:
        """uint8 images ``[len(indices), 3, R, R]`` of the given base pairs (centre crop, no flip)."""
        return load_images(self.index, [self.records[i] for i in indices], centred(self.spec))


def centred(spec: ImageSpec) -> ImageSpec:
    """``spec`` with centre crop and no flip: each record's one canonical image (evaluation, dedup)."""
    return ImageSpec(spec.resolution, True, False, spec.min_size, spec.max_pixels)


class PairDataset(Dataset):
    """Training samples of a duplication plan; item ``(i, draw)`` is plan entry ``i`` with the
    randomness of its crop, flip and caption seeded by ``draw``. ``captions`` are per source record;
    ``content`` (when the filter keys by content) gives each sample its record's fingerprint key."""

    def __init__(self, entries: list[Entry], keys: list[str], captions: list[list[str]],
                 manifest: DuplicationManifest, policy: CaptionPolicy, images: torch.Tensor | None = None,
                 index: SourceIndex | None = None, spec: ImageSpec | None = None,
                 content: ContentKeys | None = None):
        self.entries, self.keys, self.captions, self.manifest = entries, keys, captions, manifest
        self.policy, self.images, self.index, self.spec = policy, images, index, spec
        self.content = content

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, entry: Entry, draw: tuple[int, ...], data: bytes | None = None) -> dict:
        """One sample; ``data`` are its image bytes when the caller has already read them (streams)."""
        rng = np.random.default_rng(draw)
        if self.images is not None:
            pixels = self.images[entry.record]
        else:
            data = data if data is not None else self.index.reader.read([self.index.records[entry.record].loc])[0]
            pixels = decode(data, self.spec, rng)
        key = self.keys[entry.pair]
        captions = self.captions[entry.record if entry.text < 0 else entry.text]
        item = {
            "pixel_values": pixels.float() / 127.5 - 1.0,
            "caption": self.policy.draw(captions, entry.variant, self.manifest.seed, rng),
            "key": key,
            "pair": entry.pair,
            "duplicated": self.manifest.is_duplicated(key),
        }
        if self.content is not None:
            item["content"] = self.content.slot(entry.record, lambda: decode(data, centred(self.spec)))
        return item

    def __getitem__(self, item: tuple[int, tuple[int, ...]]) -> dict:
        i, draw = item
        return self.sample(self.entries[i], draw)


def collate(items: list[dict]) -> dict:
    """One batch: ``pixel_values`` in [-1, 1], ``caption``/``key`` lists, ``pair`` (each sample's base-pair
    index in the injection plan, the same for every copy and caption variant of a pair: ground truth, for
    logs and the oracle key) long tensor, ``duplicated`` bool tensor, and ``content`` (the record's
    fingerprint key, :mod:`data.fingerprint`) long tensor when the dataset computes it."""
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "pair": torch.tensor([it["pair"] for it in items], dtype=torch.long),
        "duplicated": torch.tensor([it["duplicated"] for it in items], dtype=torch.bool),
    }
    if "content" in items[0]:
        batch["content"] = torch.tensor([it["content"] for it in items], dtype=torch.long)
    return batch


@dataclass
class TrainingData:
    """The training samples, the base pairs they draw on, the manifest, and skip counts by reason.

    ``weights`` (per sample) turn uniform draws into on-the-fly weighted duplication; ``stream``
    replaces step-addressed draws with a sharded stream (see the module docstring).
    """

    dataset: PairDataset
    pairs: BasePairs | SourcePairs
    manifest: DuplicationManifest
    world: EmbeddedWorld | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    stream: ShardStream | None = None
    world_renders: bool = False  # a real source holding embedded-world renders (its marker file says so)
    key_spec: KeySpec = field(default_factory=KeySpec)

    @property
    def num_keys(self) -> int:
        """How many keys the filter's memory needs: content slots, or base pairs for the oracle."""
        return self.dataset.content.size if self.dataset.content is not None else len(self.pairs)

    def filter_keys(self, batch: dict) -> torch.Tensor:
        """The keys the filter pools judgements under (``filter.key``): fingerprints, or the oracle's pairs."""
        return batch["content"] if self.dataset.content is not None else batch["pair"]

    @property
    def embedded_world(self) -> bool:
        """Whether the embedded copy and alignment metrics apply: the world itself or files of it."""
        return self.world is not None or self.world_renders

    def batches(self, batch_size: int, seed: int, rank: int, world_size: int, start_micro_step: int = 0,
                num_workers: int = 0) -> Iterator[dict]:
        """Endless per-rank batches; a resumed run sees exactly what an uninterrupted one would."""
        if self.stream is not None:
            return self.stream.batches(batch_size, seed, rank, world_size, start_micro_step, num_workers)
        sampler = DrawSampler(len(self.dataset), batch_size, seed, rank, world_size,
                              start_micro_step=start_micro_step, weights=self.weights)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers))


def duplication_counts(cfg: DictConfig, keys: list[str]) -> dict[int, int]:
    """``{base index: total count}`` from ``data.duplication``: explicit ``counts`` (a mapping or a
    JSON file of ``{key: count}``), else ``num_duplicated`` pairs drawn with ``copies`` each."""
    dup = cfg.duplication
    explicit = dup.get("counts")
    if explicit:
        if isinstance(explicit, str):
            if not Path(explicit).exists():
                raise FileNotFoundError(f"data.duplication.counts={explicit} does not exist; give a JSON file "
                                        "of {key: total count} or a mapping")
            explicit = json.loads(Path(explicit).read_text())
        else:
            explicit = OmegaConf.to_container(explicit)
        return counts_from_list(keys, {str(k): int(v) for k, v in explicit.items()})
    copies = dup.copies if isinstance(dup.copies, int) else list(dup.copies)
    return choose_pairs(keys, dup.num_duplicated, copies, dup.seed)


def plan(cfg: DictConfig, keys: list[str], records: list[int]
         ) -> tuple[list[Entry], DuplicationManifest, torch.Tensor | None]:
    """The duplication plan over base pairs: copies (``data.duplication``) or weights (``data.weighted``)."""
    weighted = cfg.get("weighted")
    if weighted:
        if set(weighted) != {"fraction", "weight"}:
            raise ValueError(f"data.weighted needs exactly fraction and weight, got {sorted(weighted)}; e.g. "
                             "'data.weighted={fraction:0.05,weight:5}' data.duplication.num_duplicated=0")
        if cfg.duplication.num_duplicated or cfg.duplication.get("counts"):
            raise ValueError("data.weighted and data.duplication.num_duplicated/counts both duplicate; use one "
                             "(data.duplication.num_duplicated=0 with data.weighted)")
        weights, manifest = choose_weighted(keys, float(weighted.fraction), float(weighted.weight),
                                            cfg.duplication.seed)
        return [Entry(p, records[p]) for p in range(len(keys))], manifest, torch.from_numpy(weights)
    entries, manifest = expand_plan(keys, records, duplication_counts(cfg, keys), cfg.duplication.seed,
                                    cfg.duplication.get("mode", "exact"))
    return entries, manifest, None


def dedup(cfg: DictConfig, entries: list[Entry], keys: list[str], manifest: DuplicationManifest,
          weights: torch.Tensor | None, load) -> tuple[list[Entry], torch.Tensor | None]:
    """The plan without duplicate images when ``data.dedup.method`` asks for it (``load``: uint8 images
    of source records); the manifest records what was removed."""
    spec = DedupSpec.from_config(cfg.get("dedup"))
    if spec.method == "none":
        return entries, weights
    keep = deduplicate(entries, keys, load, spec, manifest)
    logging.getLogger(__name__).info("data.dedup=%s removed %d of %d samples: %s", spec.method,
                                     len(entries) - len(keep), len(entries), manifest.dedup)
    return [entries[i] for i in keep], None if weights is None else weights[keep]


def build_embedded(cfg: DictConfig, tokenizer=None, keys: KeySpec = ORACLE) -> TrainingData:
    world = generate_world(WorldConfig(**cfg.world))
    entries, manifest, weights = plan(cfg, world.keys, list(range(len(world.keys))))
    entries, weights = dedup(cfg, entries, world.keys, manifest, weights, lambda records: world.images[records])
    captions = world.caption_sets()
    policy = CaptionPolicy(CaptionSpec.from_config(cfg.get("captions")), captions, tokenizer)
    content = ContentKeys.of_images(keys, world.images) if keys.fingerprint else None
    dataset = PairDataset(entries, world.keys, captions, manifest, policy, images=world.images, content=content)
    return TrainingData(dataset=dataset, pairs=BasePairs(world.keys, world.captions, world.images),
                        manifest=manifest, world=world, weights=weights, key_spec=keys)


def source_folder(cfg: DictConfig) -> Path | None:
    """The local folder of a real source (of its first shard), where files about it lie."""
    if cfg.source == "webdataset":
        first = expand_urls(cfg.urls)[0]
        return Path(local_path(first)).parent if is_local(first) else None
    return Path(cfg.get("path") or cfg.get("data_dir") or ".")


def manifest_beside(cfg: DictConfig) -> Path | None:
    """The ``manifest.json`` that ``memsieve-data build`` wrote beside a materialized source, if any."""
    if cfg.get("manifest"):
        path = Path(cfg.manifest)
        if not path.exists():
            raise FileNotFoundError(f"data.manifest={cfg.manifest} does not exist")
        return path
    folder = source_folder(cfg)
    return folder / "manifest.json" if folder is not None and (folder / "manifest.json").exists() else None


def renders_embedded_world(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is the embedded world or files written from it (:data:`data.world.WORLD_MARKER`
    beside them), so the embedded copy and alignment metrics apply. Cheap: no scan."""
    if cfg.source == "embedded":
        return True
    folder = source_folder(cfg)
    return folder is not None and (folder / WORLD_MARKER).is_file()


def base_pairs(index: SourceIndex, num_pairs: int | None) -> tuple[list[str], list[int]]:
    """Keys of the first ``num_pairs`` unique pairs in source order (all when ``None``) and each one's
    record: its original (a materialized caption-only repeat shows another pair's image)."""
    first: dict[str, int] = {}
    for r in sorted(range(len(index.records)), key=lambda r: not index.records[r].original):
        key = index.records[r].key
        if key not in first and (num_pairs is None or len(first) < num_pairs):
            first[key] = r
    return list(first), list(first.values())


def build_real(cfg: DictConfig, tokenizer=None, key_spec: KeySpec = ORACLE) -> TrainingData:
    """Index a real source, take its base pairs, and plan duplicates over them.

    A source that already holds repeated keys was materialized (``memsieve-data build``): its
    repeats are the duplicates, counted from the data itself; mode and seed come from the
    manifest beside it.
    """
    spec, mode = ImageSpec.from_config(cfg), access(cfg)
    index = scan_source(cfg, spec)
    log = logging.getLogger(__name__)
    if index.skipped:
        log.warning("%s: skipped %s", index.name, dict(sorted(index.skipped.items())))
    keys, records = base_pairs(index, cfg.num_pairs)
    first = set(keys)
    occurrences = Counter(rec.key for rec in index.records if rec.key in first)
    if max(occurrences.values()) > 1:
        if cfg.duplication.num_duplicated or cfg.duplication.get("counts") or cfg.get("weighted"):
            raise ValueError("the source already holds duplicates (materialized by memsieve-data build); "
                             "set data.duplication.num_duplicated=0 and data.weighted=null")
        position = {k: i for i, k in enumerate(keys)}
        entries = [Entry(position[rec.key], r) for r, rec in enumerate(index.records) if rec.key in first]
        saved = manifest_beside(cfg)
        if saved is None:
            log.warning("%s: keys repeat and no manifest.json is beside it; each repeat counts as a duplicate",
                        index.name)
        info = json.loads(saved.read_text()) if saved else {}
        manifest = DuplicationManifest(seed=info.get("seed", cfg.duplication.seed), mode=info.get("mode", "exact"),
                                       num_base=len(keys), num_total=len(entries),
                                       counts={k: n for k, n in occurrences.items() if n > 1},
                                       caption_source=info.get("caption_source", ""))
        weights = None
    else:
        entries, manifest, weights = plan(cfg, keys, records)
    if DedupSpec.from_config(cfg.get("dedup")).method != "none" and cfg.source == "webdataset" and \
            not all(map(is_local, expand_urls(cfg.urls))):
        raise ValueError("data.dedup reads every image by random access, which shards at URLs do not allow; "
                         "copy them to local disk (data.urls=FOLDER) or set data.dedup.method=none")
    entries, weights = dedup(cfg, entries, keys, manifest, weights,
                             lambda recs: load_images(index, recs, centred(spec)))
    cspec = CaptionSpec.from_config(cfg.get("captions"))
    policy = CaptionPolicy(cspec, [index.records[r].captions for r in records], tokenizer)
    if manifest.mode == "image_only" and not manifest.caption_source:
        manifest.caption_source = alternative_source(cspec)
    content = ContentKeys.hashed(key_spec, len(index.records)) if key_spec.fingerprint else None
    dataset = PairDataset(entries, keys, [rec.captions for rec in index.records], manifest, policy, index=index,
                          spec=spec, content=content)
    main_captions = [index.records[r].captions[0] for r in records]
    data = TrainingData(dataset=dataset, pairs=SourcePairs(keys, main_captions, records, index, spec),
                        manifest=manifest, skipped=dict(sorted(index.skipped.items())), weights=weights,
                        world_renders=renders_embedded_world(cfg), key_spec=key_spec)
    if mode == "stream":
        from data.stream import ShardStream

        data.stream = ShardStream(expand_urls(cfg.urls), dataset, weights, int(cfg.get("shuffle_buffer", 1000)))
    return data


def access(cfg: DictConfig) -> str:
    """``indexed`` or ``stream`` (``data.access``; ``auto``: stream only for shards at URLs)."""
    mode = cfg.get("access", "auto")
    if mode not in ("auto", "indexed", "stream"):
        raise ValueError(f"data.access={mode!r}; expected auto, indexed or stream")
    remote = cfg.source == "webdataset" and not all(map(is_local, expand_urls(cfg.urls)))
    if mode == "auto":
        return "stream" if remote else "indexed"
    if mode == "stream" and cfg.source != "webdataset":
        raise ValueError(f"data.access=stream reads webdataset shards; data.source={cfg.source!r} is indexed only")
    if mode == "indexed" and remote:
        raise ValueError("data.access=indexed reads samples by byte offset and needs local shards; shards at URLs "
                         "stream (data.access=stream or auto)")
    return mode


def build_data(cfg: DictConfig, tokenizer=None, keys: KeySpec = ORACLE) -> TrainingData:
    """Build the configured source and inject duplicates into it; ``tokenizer`` (the model's) serves the
    random-token caption baselines; ``keys`` (the filter's ``filter.key``) says which key samples carry."""
    if cfg.source == "embedded":
        return build_embedded(cfg, tokenizer, keys)
    return build_real(cfg, tokenizer, keys)
