import collections

import pytest

from data.injection import DuplicationManifest, plan_duplicates


def test_counts_and_manifest(tmp_path):
    keys = [f"k{i}" for i in range(50)]
    indices, manifest = plan_duplicates(keys, num_duplicated=5, copies=[3, 7], seed=4)
    counts = collections.Counter(keys[i] for i in indices)
    assert len(manifest.counts) == 5
    assert sorted(manifest.counts.values()) == [3, 3, 3, 7, 7]
    for key in keys:
        assert counts[key] == manifest.counts.get(key, 1)
        assert manifest.is_duplicated(key) == (key in manifest.counts)
    assert manifest.num_total == len(indices) == 50 + 3 * 2 + 2 * 6
    manifest.save(tmp_path / "m.json")
    assert DuplicationManifest.load(tmp_path / "m.json") == manifest


def test_same_seed_same_duplicates_other_seed_differs():
    keys = [f"k{i}" for i in range(200)]
    a = plan_duplicates(keys, 10, 4, seed=1)
    assert a == plan_duplicates(keys, 10, 4, seed=1)
    assert a[1].counts != plan_duplicates(keys, 10, 4, seed=2)[1].counts


@pytest.mark.parametrize("kwargs, message", [
    ({"num_duplicated": 11, "copies": 2}, "num_duplicated=11"),
    ({"num_duplicated": 2, "copies": 1}, "copies must be >= 2"),
    ({"num_duplicated": 2, "copies": []}, "copies is an empty list"),
])
def test_impossible_plans_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_duplicates([f"k{i}" for i in range(10)], seed=0, **kwargs)
