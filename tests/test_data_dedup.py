"""Deduplication of the training set by image: exact and near duplicates, embedded world and real files."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import build_data
from data.dedup import hamming, near_groups, phash, pixel_digest
from data.samples import world, write_folder
from tests.conftest import compose_train


def jpeg_roundtrip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """The image as a re-encoded copy of it would look (a LAION near duplicate)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)


def test_hashes_tell_copies_from_near_copies_and_from_other_images():
    images = world(20, resolution=64).images
    near = jpeg_roundtrip(images[0], 60)
    assert pixel_digest(images[0]) == pixel_digest(images[0].clone())
    assert pixel_digest(images[0]) != pixel_digest(near)
    close = int(hamming(np.uint64(phash(images[0])), np.uint64(phash(near))))
    others = [int(hamming(np.uint64(phash(images[0])), np.uint64(phash(im)))) for im in images[1:]]
    assert close <= 4 < min(others)


def test_near_groups_match_all_pairs_comparison():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    flips = [np.uint64(1 << int(b)) for b in rng.integers(0, 64, size=(60, 3)).ravel()]
    near = base.copy()
    for i in range(60):  # each base hash gets a twin 0 to 3 bits away
        for f in flips[3 * i: 3 * i + int(rng.integers(0, 4))]:
            near[i] ^= f
    hashes = np.concatenate([base, near])
    for d in (0, 3, 20):
        groups = near_groups(hashes, d)
        # reference: union of every pair within d bits, by brute force, as first-member labels
        label = list(range(len(hashes)))
        for i, j in itertools.combinations(range(len(hashes)), 2):
            if int(hamming(hashes[i], hashes[j])) <= d:
                a, b = label[i], label[j]
                label = [min(a, b) if x in (a, b) else x for x in label]
        assert groups.tolist() == label


def embedded(*overrides):
    return compose_train(["run_dir=unused", "data.world.num_pairs=60", "data.duplication.num_duplicated=3",
                          "data.duplication.copies=5", *overrides]).data


@pytest.mark.parametrize("mode", ["exact", "image_only"])
def test_dedup_removes_injected_copies_and_counts_them(mode):
    plain = build_data(embedded(f"data.duplication.mode={mode}"))
    data = build_data(embedded(f"data.duplication.mode={mode}", "data.dedup.method=exact"))
    assert len(plain.dataset) == 60 + 3 * 4 and len(data.dataset) == 60
    assert sorted(e.pair for e in data.dataset.entries) == list(range(60))
    assert data.manifest.dedup == {"method": "exact", "removed": 12, "removed_duplicated": 12, "removed_other": 0,
                                   "removed_other_image": 0, "images_hashed": 60}
    assert data.manifest.num_total == 60
    assert data.manifest.counts == plain.manifest.counts  # still evaluated as the duplicated prompts


def test_near_dedup_on_real_files_catches_reencoded_copies(tmp_path):
    w = world(30, resolution=32)
    write_folder(w, tmp_path / "src", mixed=False)
    for i in range(3):  # three pairs also present as re-encoded copies under other keys
        Image.fromarray(jpeg_roundtrip(w.images[i], 70).permute(1, 2, 0).numpy()).save(tmp_path / "src" / f"z{i}.png")
        (tmp_path / "src" / f"z{i}.txt").write_text(w.captions[i])
    Image.fromarray(w.images[3].permute(1, 2, 0).numpy()).save(tmp_path / "src" / "z_exact.png")
    (tmp_path / "src" / "z_exact.txt").write_text(w.captions[3])

    def build(*dedup):
        cfg = compose_train(["run_dir=unused", "data=folder", f"data.path={tmp_path / 'src'}",
                             "data.resolution=32", *dedup])
        return build_data(cfg.data)

    assert len(build().dataset) == 34
    exact = build("data.dedup.method=exact")
    near = build("data.dedup.method=near", "data.dedup.max_distance=4")
    assert exact.manifest.dedup["removed"] == 1 and len(exact.dataset) == 33
    assert near.manifest.dedup["removed"] == 4 and near.manifest.dedup["removed_other_image"] == 4
    kept = {near.dataset.keys[e.pair] for e in near.dataset.entries}
    assert not kept & {"z0", "z1", "z2", "z_exact"}  # the later copies go, the first ones stay


def test_bad_dedup_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"data.dedup.method='hash'; expected one of \('none', 'exact', 'near'\)"):
        build_data(embedded("data.dedup.method=hash"))
    with pytest.raises(ValueError, match="data.dedup.max_distance=64; expected 0 to 63"):
        build_data(embedded("data.dedup.method=near", "data.dedup.max_distance=64"))
