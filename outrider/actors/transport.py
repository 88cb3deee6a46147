"""Logits from the target's last stage to the scheduler over torch.distributed (gloo) instead of Ray's object
store: measured here for 4 rows × 151,936 bf16 logits, 1.4 ms per round against 3.6 ms through Ray; for 64 rows
10.4 ms against 16.1 ms.

Two ranks: the scheduler process is rank 0, the last target stage rank 1. Each round the scheduler posts a
receive into a buffer of the known shape, asks the stage to score (the call carries the tokens through Ray as
usual) and waits for both. If the call fails before sending, the posted receive would match some later send,
so the link is torn down and the target goes back to the Ray path for good.
"""
from __future__ import annotations

import logging
import random
import socket
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
PEER = 1  # the stage's rank
JOIN_TIMEOUT = timedelta(seconds=60)


RAY_WORKER_PORTS_END = 19999  # Ray's default worker port range is 10002-19999


def free_port(host: str = "127.0.0.1") -> int:
    """A free port between Ray's worker ports and the OS's ephemeral range. Between this call and the server's
    bind the port is free; a port from the ephemeral range could be taken meanwhile by any outgoing connection
    or by a Ray process (seen once: a test server's child exited before /health), one from here can't. Used for
    test servers and for the torch.distributed rendezvous of gloo links and draft groups."""
    low, high = RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    for port in random.sample(range(low, high), min(256, high - low)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class GlooLink:
    def __init__(self, stage, vocab_size: int, dtype: torch.dtype):
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed group; one gloo-linked target per "
                               "process (use transport: ray for the others)")
        host = ray.util.get_node_ip_address()
        url = f"tcp://{host}:{free_port(host)}"
        joined = stage.join_link.remote(url)
        dist.init_process_group("gloo", init_method=url, rank=0, world_size=2, timeout=JOIN_TIMEOUT)
        ray.get(joined)
        self.stage, self.vocab_size = stage, vocab_size
        self.wire_dtype = torch.int16 if dtype == torch.bfloat16 else dtype  # gloo moves the raw bits

    def score(self, slots: list[int], token_lists: list[list[int]], hidden, trees=None) -> torch.Tensor:
        """The last stage's logits for all rows, in the wire dtype."""
        buf = torch.empty(sum(map(len, token_lists)), self.vocab_size, dtype=self.wire_dtype)
        pending = dist.irecv(buf, src=PEER)
        try:
            ray.get(self.stage.score_to_link.remote(slots, token_lists, hidden=hidden, trees=trees))
        except BaseException:
            self.close()
            raise
        pending.wait()
        return buf

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class GroupComm:
    """torch.distributed among the members of a draft group (`outrider.actors.draft_groups`): this process is
    rank `rank` of `world`. gloo moves CPU tensors (what runs and is tested here); nccl moves GPU tensors for
    group actors on GPUs — one word in the profile (placement.draft_backend), untested here: no machine with
    several GPUs was available. Only broadcasts and all_gathers, never a reduction, so the bits that arrive are
    the bits sent (bf16 travels as its bytes over gloo; nccl has bf16)."""

    def __init__(self, url: str, rank: int, world: int, backend: str = "gloo", timeout_s: float = 60.0):
        if dist.is_initialized():  # a rejoin after a failure: the old group may be half-way through a call
            dist.destroy_process_group()
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each GPU actor one device, visible as cuda:0
        dist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world, self.backend = rank, world, backend
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """src's t on every rank (the others pass a buffer of the same shape and dtype)."""
        wire = self._wire(t)
        dist.broadcast(wire, src)
        return self._unwire(wire, t)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        wire = self._wire(t)
        out = [torch.empty_like(wire) for _ in range(self.world)]
        dist.all_gather(out, wire)
        return [self._unwire(w, t) for w in out]

    def broadcast_ints(self, values: list[int] | None, n: int, src: int = 0) -> list[int]:
        """n int64 values from src (the others pass None). One host sync: they steer the control flow."""
        t = torch.tensor(values if values is not None else [0] * n, dtype=torch.long, device=self.device)
        dist.broadcast(t, src)
        return t.tolist()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(self.device).contiguous()
        # gloo has no bf16 broadcast and no int16 ("Invalid scalar type"): 16-bit floats travel as their bytes
        return t.view(torch.uint8) if t.element_size() == 2 and t.is_floating_point() and self.backend == "gloo" else t

    @staticmethod
    def _unwire(wire: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return wire.view(like.dtype).to(like.device) if wire.dtype != like.dtype else wire.to(like.device)
