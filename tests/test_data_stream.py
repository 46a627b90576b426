"""Streams over shards: two ranks and two DataLoader workers read disjoint shards, the stream is
reproducible by seed and resumes exactly; indexed ranks draw disjoint samples every step."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from data.dataset import build_data
from data.sampler import DrawSampler
from data.samples import world, write_shards
from data.stream import WorkerStream
from tests.conftest import compose_train

SHARD = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    w = world(8 * SHARD, 24, seed=9)
    root = tmp_path_factory.mktemp("stream")
    write_shards(w, root, SHARD)
    return w, root


def stream_data(root, *overrides):
    cfg = compose_train(["data=webdataset", f"data.urls={root}", "data.resolution=16", "data.access=stream",
                         *overrides, "run_dir=unused"])
    return build_data(cfg.data)


def test_two_ranks_two_workers_read_disjoint_shards(shards):
    w, root = shards
    data = stream_data(root, "data.shuffle_buffer=1")
    by_worker = {}
    for rank in (0, 1):
        batches = data.batches(SHARD, seed=5, rank=rank, world_size=2, num_workers=2)
        # Epoch 0 gives each of the 4 global workers 2 shards; batches alternate between a rank's workers.
        for b in range(4):
            by_worker.setdefault((rank, b % 2), set()).update(next(batches)["key"])
    assert all(len(keys) == 2 * SHARD for keys in by_worker.values())
    seen = [k for keys in by_worker.values() for k in keys]
    assert sorted(seen) == sorted(w.keys)  # disjoint, and together every sample once
    shard_of = {k: i // SHARD for i, k in enumerate(w.keys)}
    shard_sets = [{shard_of[k] for k in keys} for keys in by_worker.values()]
    assert all(len(s) == 2 for s in shard_sets) and len(set().union(*shard_sets)) == 8
    # The plan that dealt them: each epoch a fresh shard order, split the same way.
    stream = WorkerStream(data.stream, SHARD, 5, 0, 2, 2, 0)
    assert stream.shards(0, 0) != stream.shards(0, 1) or stream.shards(1, 0) != stream.shards(1, 1)


def test_stream_reproducible_and_resumes_exactly(shards):
    _, root = shards
    data = stream_data(root, "data.shuffle_buffer=6", "data.center_crop=false", "data.random_flip=true",
                       "data.duplication.num_duplicated=2", "data.duplication.copies=3")
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    full = take(data.batches(3, seed=2, rank=1, world_size=2, num_workers=2), 7)
    again = take(data.batches(3, seed=2, rank=1, world_size=2, num_workers=2), 7)
    for a, b in zip(full, again):
        assert a["key"] == b["key"] and torch.equal(a["pixel_values"], b["pixel_values"])
        assert [data.pairs.keys[p] for p in a["pair"]] == a["key"]  # base-pair indices for the filter's memory
    for start in (3, 4):  # the next batch due from either worker
        resumed = take(data.batches(3, seed=2, rank=1, world_size=2, start_micro_step=start, num_workers=2), 3)
        for a, b in zip(full[start:], resumed):
            assert a["key"] == b["key"] and a["caption"] == b["caption"]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    other = take(data.batches(3, seed=3, rank=1, world_size=2, num_workers=2), 7)
    assert [b["key"] for b in other] != [b["key"] for b in full]


def test_weighted_stream_repeats_chosen_pairs(shards):
    """Weight 2.5: a chosen pair enters each epoch 2 or 3 times (mean 2.5), a plain one once; over
    6 epochs the chosen pairs' mean count must be 2.5 +- 0.5 times the plain pairs'."""
    _, root = shards
    data = stream_data(root, "data.shuffle_buffer=8", "+data.weighted.fraction=0.25", "+data.weighted.weight=2.5")
    batches = data.batches(8, seed=0, rank=0, world_size=1)
    counts = collections.Counter(k for _ in range(6 * 8 * 5 // 8) for k in next(batches)["key"])
    chosen = [k for k in data.pairs.keys if data.manifest.is_duplicated(k)]
    plain = [k for k in data.pairs.keys if k not in chosen]
    ratio = (sum(counts[k] for k in chosen) / len(chosen)) / (sum(counts[k] for k in plain) / len(plain))
    assert len(chosen) == 8 and 2.0 < ratio < 3.0


def test_indexed_ranks_draw_disjoint_samples():
    samplers = [DrawSampler(50, 8, seed=4, rank=r, world=2) for r in (0, 1)]
    for step in range(6):  # 16 of 50 per step: never the same sample on both ranks
        a, b = (set(s.batch(step)) for s in samplers)
        assert not a & b


def test_shards_at_urls_stream(shards, tmp_path):
    """Shards served over HTTP: indexed by streaming them once, then read as a stream (data.access=auto)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    w, root = shards
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00007}}.tar"
        cfg = compose_train(["data=webdataset", f"data.urls='{url}'", "data.resolution=16", "run_dir=unused"])
        data = build_data(cfg.data)
        assert data.stream is not None and data.pairs.keys == w.keys
        batches = data.batches(8, seed=0, rank=0, world_size=1)
        keys = [k for _ in range(4) for k in next(batches)["key"]]
        assert set(keys) <= set(w.keys)
        images = data.pairs.images_at([0, 9, 0])  # lazily re-read from the URLs
        assert images.shape == (3, 3, 16, 16) and torch.equal(images[0], images[2])
    finally:
        server.shutdown()


def test_index_cache_reused_until_shards_change(shards, tmp_path):
    _, root = shards
    cache = tmp_path / "cache"
    overrides = ["data=webdataset", f"data.urls={root}", "data.resolution=16", f"data.index_cache={cache}",
                 "run_dir=unused"]
    first = build_data(compose_train(overrides).data)
    assert len(list(cache.glob("*.json"))) == 1
    again = build_data(compose_train(overrides).data)
    assert again.pairs.keys == first.pairs.keys and again.pairs.captions == first.pairs.captions
    assert torch.equal(again.pairs.images_at([0, 5]), first.pairs.images_at([0, 5]))
    shard = sorted(root.glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a rewritten shard
    build_data(compose_train(overrides).data)
    assert len(list(cache.glob("*.json"))) == 2
