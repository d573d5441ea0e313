"""The ranks of a ``torch.distributed`` process group deciding together, without pickling anything.

Only global rank 0 runs a weavelet sidecar. At each check every rank calls :meth:`Collective.share` with what it
has (rank 0: the revision it polled, or ``None``; the others: ``None``) and gets rank 0's value back, then each
rank applies it.

Costs, per check: with nothing waiting, one broadcast of two ``int64`` (a 2-element tensor: the payload's length
and a number rank 0 may share with it; on NCCL it lives on the current CUDA device). With a revision waiting, one
more broadcast of its JSON encoding as ``uint8``. Nothing is pickled: what crosses between ranks is JSON, so a
revision can only ever be the plain data the sidecar checked. After an applied revision, :meth:`Collective.all_same`
(one all-reduce) tells whether every rank's verdict agreed.

The group's backend decides the tensors' device: ``nccl`` needs CUDA tensors on ``torch.cuda.current_device()``;
``gloo`` (and every other backend) uses the CPU.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


class Collective:
    """Rank 0's decisions shared with every rank of a process group.

    :param group: the process group (default: the world group). It must be initialised.
    :raises RuntimeError: when ``torch.distributed`` is not initialised.
    """

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "weavelet: torch.distributed is not initialised; call torch.distributed.init_process_group() "
                "before building a Collective (or run single-process without one)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self._length = torch.zeros(2, dtype=torch.int64, device=self.device)

    @classmethod
    def current(cls, group: Any = None) -> Collective | None:
        """The initialised process group's collective, or ``None`` when not distributed or a world of one."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size(group) <= 1:
            return None
        return cls(group)

    @property
    def is_leader(self) -> bool:
        """Whether this is rank 0 of the group, the one that runs the weavelet sidecar."""
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the other ranks' arguments are ignored); see :meth:`share_with`."""
        return self.share_with(value, 0)[0]

    def share_with(self, value: Any, number: int) -> tuple[Any, int]:
        """Rank 0's ``value`` and ``number`` on every rank (the other ranks' arguments are ignored).

        ``number`` (an ``int64``) rides in the broadcast that carries the value's length, so it costs nothing more.

        :param value: on rank 0, ``None`` or plain JSON data (dicts with string keys, lists, numbers, strings,
            booleans); on the other ranks anything (ignored).
        :param number: on rank 0, any integer that fits in an ``int64``.
        :returns: rank 0's value as every rank decodes it from the same JSON (tuples come back as lists, on
            rank 0 too, so that every rank applies identical data), and rank 0's ``number``.
        :raises TypeError: on rank 0, for a value that JSON cannot encode.
        """
        length = self._length
        if self.rank == 0:
            data = b"" if value is None else json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
            length[0] = len(data)
            length[1] = number
        dist.broadcast(length, src=self._src, group=self.group)
        size, shared = (int(n) for n in length.tolist())
        if size == 0:
            return None, shared
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src=self._src, group=self.group)
        return json.loads(data if self.rank == 0 else buffer.cpu().numpy().tobytes()), shared

    def all_true(self, value: bool) -> bool:
        """Whether ``value`` is true on every rank (one all-reduce of a 1-element tensor)."""
        flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def all_same(self, value: bool) -> bool:
        """Whether ``value`` is the same on every rank (all true or all false): one all-reduce of a 2-element
        tensor (the minimum of ``value`` and of its negation)."""
        flag = torch.tensor([1 if value else 0, 0 if value else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag[0].item()) or bool(flag[1].item())
