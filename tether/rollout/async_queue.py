"""Asynchronous rollouts: one background thread generates the next batches while the trainer updates.

    rollouts = RolloutQueue(lambda step: sample_rollout(..., step=step), ahead=k, start=start_step, stop=num_steps)
    for step in range(start_step, num_steps):
        item = rollouts.get()                         # item.step == step; item.staleness: policy lag in updates
        ... train on item.rollout (correct with TIS / masked IS: tether.losses) ...
        rollouts.push_weights(lambda: sampler.load_weights(model))
    rollouts.close()

`ahead=k` bounds the queue: the worker generates the batch of step s once the trainer has taken that of step
s − k, so it was sampled with the weights of update s − k or later: at most k updates stale (k = 1: step s + 1
is generated while step s trains, one step off-policy; k = 0: synchronous, each batch generated when asked
for, in the trainer's thread, from the latest weights). Generation
and weight pushes are serialised by one lock, so a push never lands mid-batch and each batch records the weight
version it was sampled with. The sampler must own its weights (vLLM, a RemoteSampler, or a built-in sampler on
a copy of the policy), since the trainer changes the policy while the worker samples.

What a resumed async run replays: the step counter, the optimizer and the prompt stream are restored as in sync
mode, but the batches that were queued (generated from older weights) are not saved: they are generated again,
from the resumed weights, so an async run resumed at step s is not bit-equal to an uninterrupted one (its first
k batches are fresher). Sync mode (ahead=0) resumes exactly.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class QueuedRollout:
    step: int
    """The training step this batch is for."""
    rollout: Any
    """What `produce(step)` returned."""
    version: int
    """Weight pushes before this batch was generated."""
    staleness: int
    """Pushes between its generation and its use: how many updates behind the trained policy it is."""


class RolloutQueue:
    """Runs `produce(step)` for step = start, start + 1, ..., stop − 1 on one worker thread, at most `ahead`
    batches ahead of `get`. ahead = 0 generates each batch when it is asked for (synchronous)."""

    def __init__(self, produce: Callable[[int], Any], *, ahead: int, start: int, stop: int):
        if ahead < 0:
            raise ValueError(f"async_rollouts must be >= 0 (0 = synchronous), got {ahead}")
        self.produce, self.ahead = produce, ahead
        self.version = 0  # weight pushes so far
        self.lock = threading.Lock()  # one of: a batch being generated, weights being pushed
        self._items: queue.Queue = queue.Queue()
        self._room = threading.Semaphore(ahead)  # batches the worker may generate before the trainer takes one
        self._stopping = threading.Event()
        self._next = start
        self._worker = threading.Thread(target=self._run, args=(start, stop), daemon=True, name="tether-rollouts")
        if ahead > 0:
            self._worker.start()

    def _run(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            self._room.acquire()
            if self._stopping.is_set():
                return
            try:
                with self.lock:
                    version = self.version
                    rollout = self.produce(step)
            except BaseException as err:  # handed to the trainer by get()
                self._items.put((step, err, version, True))
                return
            self._items.put((step, rollout, version, False))

    def get(self) -> QueuedRollout:
        """The next step's batch (waits for the worker); re-raises an error the worker met."""
        step = self._next
        if self.ahead == 0:
            version, rollout = self.version, self.produce(step)
        else:
            step, rollout, version, failed = self._items.get()
            self._room.release()
            if failed:
                raise rollout
        self._next = step + 1
        return QueuedRollout(step=step, rollout=rollout, version=version, staleness=self.version - version)

    def push_weights(self, push: Callable[[], None]) -> None:
        """Run `push` (e.g. `lambda: sampler.load_weights(model)`) between two batches and count a new version."""
        with self.lock:
            push()
            self.version += 1

    def close(self) -> None:
        """Stop the worker after the batch it is generating (if any)."""
        self._stopping.set()
        self._room.release()
        if self._worker.is_alive():
            self._worker.join()
