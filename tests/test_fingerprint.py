"""Label-free pair identity: content keys from the pixels, on the embedded world and on real files."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from PIL import Image

from data.dataset import build_data
from data.fingerprint import KeySpec
from data.samples import world, write_folder, write_imagefolder, write_shards
from tests.conftest import compose_train


def embedded(mode: str):
    return compose_train(["run_dir=unused", "data.world.num_pairs=60", "data.duplication.num_duplicated=3",
                          "data.duplication.copies=5", f"data.duplication.mode={mode}"]).data


def partition(labels: list[int]) -> set[frozenset[int]]:
    """The groups of sample positions that share a label."""
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def keys_of(data) -> tuple[list[int], list[int]]:
    """Each plan entry's oracle pair and content key."""
    samples = [data.dataset.sample(e, (0,)) for e in data.dataset.entries]
    return [s["pair"] for s in samples], [s["content"] for s in samples]


@pytest.mark.parametrize("mode", ["exact", "image_only"])
def test_content_keys_group_the_samples_as_the_oracle_does_where_copies_share_the_image(mode):
    data = build_data(embedded(mode), keys=KeySpec("content"))
    oracle, content = keys_of(data)
    assert partition(content) == partition(oracle)  # so a filter keyed either way makes the same decisions
    assert data.num_keys == 60


def test_caption_only_copies_pool_with_the_image_they_show_not_the_caption():
    data = build_data(embedded("caption_only"), keys=KeySpec("content"))
    oracle, content = keys_of(data)
    assert partition(content) != partition(oracle)
    for entry, pair, key in zip(data.dataset.entries, oracle, content):
        donor = content[entry.record]  # base pair p is plan entry p, record p: its image's key
        assert key == donor and (entry.record == pair or key != content[pair])


def test_content_keys_pool_byte_identical_files_stored_under_different_keys(tmp_path):
    """A real source's natural duplicates: the same image bytes under two file names (no manifest),
    and a JPEG re-encode that only the perceptual hash pools."""
    w = world(12, resolution=32, seed=2)
    root = write_folder(w, tmp_path / "src", mixed=False)
    shutil.copy(root / f"{w.keys[0]}.png", root / "copy_of_first.png")
    (root / "copy_of_first.txt").write_text("another caption")
    buf = io.BytesIO()
    Image.open(root / f"{w.keys[1]}.png").convert("RGB").save(buf, format="JPEG", quality=90)
    (root / "reencoded_second.jpg").write_bytes(buf.getvalue())
    (root / "reencoded_second.txt").write_text("yet another caption")
    cfg = compose_train(["run_dir=unused", "data=folder", f"data.path={root}", "data.resolution=32"]).data
    by_key = {}
    for kind in ("content", "near", "oracle"):
        data = build_data(cfg, keys=KeySpec(kind))
        by_key[kind] = {data.pairs.keys[e.pair]: data.dataset.sample(e, (0,)).get("content", e.pair)
                        for e in data.dataset.entries}
    for kind in ("content", "near"):
        assert by_key[kind]["copy_of_first"] == by_key[kind][w.keys[0]]
        assert len({by_key[kind][k] for k in w.keys}) == len(w.keys)  # distinct images, distinct keys
    assert by_key["near"]["reencoded_second"] == by_key["near"][w.keys[1]]
    assert by_key["content"]["reencoded_second"] != by_key["content"][w.keys[1]]
    assert by_key["oracle"]["copy_of_first"] != by_key["oracle"][w.keys[0]]  # two keys: the plan sees two pairs


def test_streamed_shards_fingerprint_on_load_into_a_fixed_table(tmp_path):
    w = world(8, 24, seed=9)
    write_shards(w, tmp_path / "a", 4)
    write_shards(w, tmp_path / "b", 4, start_shard=2)  # the same images again, under the same keys elsewhere
    for tar in (tmp_path / "b").glob("*.tar"):
        tar.rename(tmp_path / "a" / tar.name)
    cfg = compose_train(["data=webdataset", f"data.urls={tmp_path / 'a'}", "data.resolution=16",
                         "data.access=stream", "run_dir=unused"]).data
    data = build_data(cfg, keys=KeySpec("content", table_size=4096))
    assert data.num_keys == 4096
    batch = next(data.batches(16, seed=0, rank=0, world_size=1))
    slots = {}
    for key, slot in zip(batch["key"], batch["content"].tolist()):
        assert slots.setdefault(key, slot) == slot and 0 <= slot < 4096
    assert len(set(slots.values())) == len(slots)


def test_imagefolder_keys_keep_the_folder_so_equal_file_names_stay_two_pairs(tmp_path):
    root = tmp_path / "set"
    for sub in ("a", "b"):
        write_imagefolder(world(3, 32, seed=0), root / sub, mixed=False)  # the same file names in both
    lines = [json.dumps({**json.loads(line), "file_name": f"{sub}/{json.loads(line)['file_name']}"})
             for sub in ("a", "b") for line in (root / sub / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for sub in ("a", "b"):
        (root / sub / "metadata.jsonl").unlink()
    cfg = compose_train(["run_dir=unused", "data=imagefolder", f"data.path={root}", "data.resolution=32"]).data
    data = build_data(cfg)
    assert len(data.pairs) == 6 and not data.manifest.counts  # the file name alone made them 3 duplicated pairs
    assert sorted(data.pairs.keys)[0].startswith("a/")


def test_a_bad_key_kind_is_one_line():
    with pytest.raises(ValueError, match=r"filter.key='pair'; expected content"):
        KeySpec.from_filter(compose_train(["run_dir=x", "filter=calibrated", "filter.key=pair"]).filter)
