"""GPU slots shared by every flow run on the Prefect server: one global concurrency limit of
one slot per GPU of each host, named `gpu:<host>:<index>` and created on first use.

A stage holds the slots of all its GPUs (on every host it spans) for as long as it runs, so
two pipeline runs, the merge-and-average deployment, or any other flow that takes the same
slots never share a GPU, whichever process or worker they run in. All slots of a stage are
taken in one request (the server grants all or none: no deadlock between stages whose GPU
sets overlap). Slots are leased: if the holder dies, the server frees them when the lease
runs out. A stage that has to wait says so once in its run's log, with the holders' names.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence

import httpx
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

SLOT_PREFIX = "gpu"
LEASE_SECONDS = 120.0  # renewed while held; a dead holder's slots come back after this
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def host_name(host: str | None = None) -> str:
    """`host` as slot names spell it: this machine's hostname for None or a loopback name."""
    return socket.gethostname() if host is None or host in LOCAL_NAMES else host


def slot_name(host: str | None, index: int) -> str:
    return f"{SLOT_PREFIX}:{host_name(host)}:{index}"


def ensure_limits(names: Sequence[str]) -> None:
    """Create every missing limit with one slot (another process may race us: fine)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _locked(error: BaseException) -> bool:
    """The server answered 423: some slot is held (not a real error)."""
    cause = error.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextlib.contextmanager
def hold_gpu_slots(names: Sequence[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold every slot in `names` until the block ends; wait (calling `on_wait` once) while
    any of them is held elsewhere. Nothing to hold (the CPU path): no server call."""
    if not names:
        yield
        return
    names = sorted(set(names))
    ensure_limits(names)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(names, max_retries=0, lease_duration=LEASE_SECONDS, strict=True))
        except ConcurrencySlotAcquisitionError as error:
            if not _locked(error):
                raise
            if on_wait is not None:
                on_wait()
            stack.enter_context(concurrency(names, lease_duration=LEASE_SECONDS, strict=True))
        yield
