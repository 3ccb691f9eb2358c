"""BucketBatchSampler: homogeneous buckets, determinism, sharding, exact mid-epoch resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data import BucketBatchSampler

BUCKETS = [int(b) for b in np.random.default_rng(0).integers(0, 4, 103)]


def _all(sampler: BucketBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_batches_are_homogeneous_complete_and_deterministic() -> None:
    s = BucketBatchSampler(BUCKETS, batch_size=4, seed=7)
    batches = _all(s)
    assert len(batches) == len(s)
    assert all(len(b) == 4 and len({BUCKETS[i] for i in b}) == 1 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    counts = np.bincount(BUCKETS)
    assert len(batches) == int(sum(c // 4 for c in counts))
    # Same (seed, epoch) -> same batches, in a fresh object too; another epoch or seed -> another order.
    assert _all(BucketBatchSampler(BUCKETS, 4, seed=7)) == batches
    s.set_epoch(1)
    assert _all(s) != batches and sorted(map(sorted, _all(s))) != sorted(map(sorted, batches))
    assert _all(BucketBatchSampler(BUCKETS, 4, seed=8)) != batches


def test_no_shuffle_and_keep_last() -> None:
    s = BucketBatchSampler([0, 1, 0, 1, 0], batch_size=2, seed=0, shuffle=False, drop_last=False)
    assert _all(s) == [[0, 2], [4], [1, 3]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sharding_disjoint_equal_length(drop_last: bool) -> None:
    R = 3
    shards = [BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=drop_last, num_replicas=R, rank=r) for r in range(R)]
    for ep in (0, 1):
        for s in shards:
            s.set_epoch(ep)
        per_rank = [_all(s) for s in shards]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(shards[0])
        if drop_last:
            seen = [tuple(b) for p in per_rank for b in p]
            assert len(seen) == len(set(seen)), "no batch on two ranks"
            flat = [i for b in seen for i in b]
            assert len(flat) == len(set(flat))
        # The shards interleave the single-process batch list.
        single = BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=drop_last)
        single.set_epoch(ep)
        full = _all(single)
        interleaved = [b for group in itertools.zip_longest(*per_rank) for b in group if b is not None]
        n = min(len(full), len(interleaved))
        assert interleaved[:n] == full[:n]
        if not drop_last:
            assert {i for p in per_rank for b in p for i in b} == set(range(len(BUCKETS)))


@pytest.mark.parametrize("stop_after", [0, 1, 5, 12])
def test_resume_mid_epoch_yields_exactly_the_rest(stop_after: int) -> None:
    ref = BucketBatchSampler(BUCKETS, 4, seed=3, num_replicas=2, rank=1)
    ref.set_epoch(2)
    expected = _all(ref)
    run = BucketBatchSampler(BUCKETS, 4, seed=3, num_replicas=2, rank=1)
    run.set_epoch(2)
    it = iter(run)
    first = [next(it) for _ in range(stop_after)]
    state = run.state_dict()
    assert state["epoch"] == 2 and state["position"] == stop_after

    resumed = BucketBatchSampler(BUCKETS, 4, seed=3, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this again on resume; it must not restart the epoch
    rest = _all(resumed)
    assert first + rest == expected
    # The next pass of the same epoch, and the next epoch, are whole again.
    assert _all(resumed) == expected
    resumed.set_epoch(3)
    ref.set_epoch(3)
    assert _all(resumed) == _all(ref)


def test_resume_after_complete_epoch_and_consumed_override() -> None:
    s = BucketBatchSampler(BUCKETS, 4, seed=3)
    _all(s)
    done = BucketBatchSampler(BUCKETS, 4, seed=3)
    done.load_state_dict(s.state_dict())
    assert _all(done) == [], "a completed epoch resumes as complete"
    # A DataLoader with workers asks for batches ahead; the trainer records what it consumed.
    t = BucketBatchSampler(BUCKETS, 4, seed=3)
    it = iter(t)
    batches = [next(it) for _ in range(6)]
    state = t.state_dict(consumed=2)
    u = BucketBatchSampler(BUCKETS, 4, seed=3)
    u.load_state_dict(state)
    assert _all(u)[:4] == batches[2:]


def test_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="lower train.batch_size"):
        BucketBatchSampler([0, 1, 2, 3], batch_size=2, seed=0)
    s = BucketBatchSampler(BUCKETS, 4, seed=3)
    with pytest.raises(ValueError, match="train.seed"):
        BucketBatchSampler(BUCKETS, 4, seed=4).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="num_replicas=1 but this run has num_replicas=2"):
        BucketBatchSampler(BUCKETS, 4, seed=3, num_replicas=2).load_state_dict(s.state_dict())
