"""Partitioner properties: disjoint, complete, label-skewed as asked."""

from hypothesis import given, settings
from hypothesis import strategies as st

from edgelam.data import partition
from edgelam.store import rng_for


def _check_disjoint_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "every index exactly once"


@given(n=st.integers(5, 200), k=st.integers(1, 5), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_iid_is_a_balanced_partition(n, k, seed):
    parts = partition.iid(n, k, rng_for(seed))
    _check_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@given(alpha=st.sampled_from([0.1, 0.5, 5.0]), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_dirichlet_partition_covers_and_fills(alpha, seed):
    labels = ["a"] * 60 + ["b"] * 60 + ["c"] * 60
    parts = partition.dirichlet(labels, 4, alpha, rng_for(seed), min_size=2)
    _check_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 2


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = [c for c in "abcd" for _ in range(100)]

    def mean_distinct(alpha):
        counts = []
        for seed in range(20):
            parts = partition.dirichlet(labels, 4, alpha, rng_for(seed))
            counts += [sum(1 for c in "abcd" if sum(labels[i] == c for i in p) >= 10) for p in parts]
        return sum(counts) / len(counts)

    assert mean_distinct(0.05) < mean_distinct(100.0)
    assert mean_distinct(100.0) == 4.0


def test_by_task_gives_each_client_only_its_tasks():
    labels = ["x"] * 10 + ["y"] * 10 + ["z"] * 10
    parts = partition.by_task(labels, [["x"], ["y", "z"], ["x"]], rng_for(0))
    assert {labels[i] for i in parts[0]} == {"x"} and {labels[i] for i in parts[2]} == {"x"}
    assert {labels[i] for i in parts[1]} == {"y", "z"}
    assert len(parts[0]) == len(parts[2]) == 5 and len(parts[1]) == 20
    _check_disjoint_cover(parts, 30)


def test_heldout_split_keeps_fraction_per_task():
    labels = ["a"] * 10 + ["b"] * 20
    train, held = partition.heldout_split(range(30), labels, 0.1, rng_for(0))
    assert sorted(train + held) == list(range(30))
    assert sum(labels[i] == "a" for i in held) == 1 and sum(labels[i] == "b" for i in held) == 2
