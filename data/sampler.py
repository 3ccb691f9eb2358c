"""Batches that never mix buckets, in an order fixed by (seed, epoch), sharded across processes, resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class BucketBatchSampler:
    """Yield lists of dataset indices; every batch comes from one bucket.

    The epoch's batch list is a pure function of (bucket_ids, batch_size, seed, epoch): indices
    are shuffled inside each bucket, cut into batches, and the batches shuffled. The list is
    then cut to a multiple of ``num_replicas`` (``drop_last``) or padded by repeating its first
    batches, and rank ``r`` takes batches ``r, r + R, r + 2R, ...``: each rank sees different
    batches, all ranks the same number.

    Resuming: ``state_dict()`` records the epoch and how many of this rank's batches were handed
    out; after ``load_state_dict`` the next iteration yields exactly the remaining ones (none if
    the saved epoch was complete; then ``set_epoch(epoch + 1)`` as usual). A trainer that counts
    the batches it has used passes that count instead: ``state_dict(consumed=k)``.
    """

    def __init__(
        self,
        bucket_ids: list[int],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.bucket_ids = [int(b) for b in bucket_ids]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._resume = False  # the next __iter__ continues from `position` (set by load_state_dict)
        counts = np.bincount(np.asarray(self.bucket_ids, dtype=np.int64)) if self.bucket_ids else np.zeros(0, np.int64)
        per_bucket = counts // batch_size if drop_last else -(-counts // batch_size)
        total = int(per_bucket.sum())
        self._per_rank = total // num_replicas if drop_last else -(-total // num_replicas)
        if self._per_rank == 0:
            raise ValueError(
                f"no full batch per process: {len(self.bucket_ids)} samples in buckets of sizes "
                f"{[int(c) for c in counts if c]} give {total} batches of {batch_size} for {num_replicas} process(es); "
                "lower train.batch_size, add samples, or use fewer aspect buckets"
            )

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self._per_rank

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this rank, in order."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        ids = np.asarray(self.bucket_ids, dtype=np.int64)
        batches: list[list[int]] = []
        for b in np.unique(ids):
            members = np.flatnonzero(ids == b)
            if self.shuffle:
                members = rng.permutation(members)
            for s in range(0, len(members), self.batch_size):
                chunk = members[s : s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append([int(x) for x in chunk])
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        need = self._per_rank * self.num_replicas
        if len(batches) >= need:
            batches = batches[:need]
        else:
            batches = batches + [batches[k % len(batches)] for k in range(need - len(batches))]
        return batches[self.rank :: self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; moving to another epoch starts it from its first batch."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0
            self._resume = False

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        # Only the first pass after load_state_dict continues mid-epoch (and yields nothing if the
        # saved epoch was complete); any other pass is a whole epoch.
        start = self.position if self._resume else 0
        self._resume = False
        self.position = start
        for k in range(start, len(batches)):
            self.position = k + 1
            yield batches[k]

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Epoch and position (batches of this epoch already used; ``consumed`` overrides the handed-out count)."""
        return {
            "epoch": self.epoch,
            "position": self.position if consumed is None else int(consumed),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "num_batches": self._per_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and position; refuses a state from a different seed, batch size or process count."""
        for key in ("seed", "batch_size", "num_replicas", "num_batches"):
            mine = getattr(self, key) if key != "num_batches" else self._per_rank
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {key}={mine}; resume with the same "
                    "dataset, train.seed, train.batch_size and number of processes, or start a new run"
                )
        pos = int(state["position"])
        if not 0 <= pos <= self._per_rank:
            raise ValueError(f"sampler state position {pos} is outside [0, {self._per_rank}]")
        self.epoch = int(state["epoch"])
        self.position = pos
        self._resume = True
