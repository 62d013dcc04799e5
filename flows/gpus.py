"""Where each stage runs: its GPUs (or the CPU), its master port, its deepspeed launcher flags.

Recipes get windows of the device list side by side; when there are too few GPUs for all of
them at once, windows wrap around and overlap, and the per-device locks below make a recipe
wait until the recipe on the same GPUs has finished — two stages never share a GPU. A stage's
merge holds its recipe's GPUs too. With no GPU visible every stage takes the CPU path
(`--num_gpus 1`, one process) and parallel stages split the cores between them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.config import LaunchSettings, PipelineConfig

PORT_SEARCH_SPAN = 200


class GpuPlanError(ValueError):
    """The requested GPU assignment does not fit the visible GPUs."""


@dataclass(frozen=True)
class Placement:
    """Where one stage runs. `devices` empty means the CPU path, unless a hostfile or an
    explicit `include` hands the choice to deepspeed."""

    devices: tuple[int, ...] = ()
    include: str | None = None
    hostfile: Path | None = None
    preferred_port: int = 29500
    cpu_threads: int | None = None

    @property
    def on_cpu(self) -> bool:
        return not self.devices and self.include is None and self.hostfile is None

    def launcher_flags(self, master_port: int) -> list[str]:
        """deepspeed launcher flags (before the training script)."""
        flags = ["--master_port", str(master_port)]
        if self.hostfile is not None:
            flags += ["--hostfile", str(self.hostfile)]
        if self.include is not None:
            flags += ["--include", self.include]
        elif self.devices:
            flags += ["--include", "localhost:" + ",".join(map(str, self.devices))]
        elif self.hostfile is None:
            flags += ["--num_gpus", "1"]
        return flags

    def env(self) -> dict[str, str]:
        """Environment for a non-deepspeed child (merge): only this stage's GPUs, or threads."""
        if self.devices:
            return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.devices))}
        if self.on_cpu and self.cpu_threads:
            return {"OMP_NUM_THREADS": str(self.cpu_threads), "CUDA_VISIBLE_DEVICES": ""}
        return {}


def visible_gpus() -> list[int]:
    """GPU ids as deepspeed's `--include` sees them: CUDA_VISIBLE_DEVICES if set, else all."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [int(item) for item in listed.split(",") if item.strip().isdigit()]
    import torch

    return list(range(torch.cuda.device_count()))


def _explicit(launch: LaunchSettings, port: int) -> Placement | None:
    if launch.hostfile is None and launch.include is None:
        return None
    return Placement(include=launch.include, hostfile=launch.hostfile, preferred_port=port)


def plan_placements(
    config: PipelineConfig, visible: Sequence[int], cpu_count: int | None = None
) -> dict[str, Placement]:
    """Placement of pretrain and of every recipe (and so of its merge), keyed by stage name."""
    devices = list(config.gpus.devices if config.gpus.devices is not None else visible)
    missing = sorted(set(devices) - set(visible))
    if missing:
        raise GpuPlanError(f"gpus.devices {missing} are not visible (visible GPUs: {list(visible)})")
    base_port = config.gpus.master_port
    recipes = config.recipes
    placements: dict[str, Placement] = {}
    if not devices:
        cores = cpu_count or os.cpu_count() or 1
        shared = config.runtime.cpu_threads
        placements["pretrain"] = _explicit(config.pretrain.launch, base_port) or Placement(
            preferred_port=base_port, cpu_threads=shared or cores
        )
        for index, recipe in enumerate(recipes, start=1):
            placements[recipe.name] = _explicit(recipe.launch, base_port + index) or Placement(
                preferred_port=base_port + index,
                cpu_threads=shared or max(1, cores // len(recipes)),
            )
        return placements

    problems = []
    wanted = config.pretrain.launch.num_gpus or len(devices)
    if wanted > len(devices):
        problems.append(f"pretrain asks for {wanted} GPUs, {len(devices)} available")
    placements["pretrain"] = _explicit(config.pretrain.launch, base_port) or Placement(
        devices=tuple(devices[:wanted]), preferred_port=base_port
    )
    share = config.gpus.gpus_per_recipe or max(1, len(devices) // len(recipes))
    cursor = 0
    for index, recipe in enumerate(recipes, start=1):
        port = base_port + index
        explicit = _explicit(recipe.launch, port)
        if explicit is not None:
            placements[recipe.name] = explicit
            continue
        count = recipe.launch.num_gpus or share
        if count > len(devices):
            problems.append(f"recipe {recipe.name} asks for {count} GPUs, {len(devices)} available")
            count = len(devices)
        if cursor + count > len(devices):
            cursor = 0  # wrap: this recipe waits for the one before it on these GPUs
        placements[recipe.name] = Placement(
            devices=tuple(devices[cursor : cursor + count]), preferred_port=port
        )
        cursor += count
    if problems:
        raise GpuPlanError("; ".join(problems))
    return placements


class DeviceLocks:
    """One lock per GPU id, taken in ascending order so two stages cannot deadlock."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, devices: Sequence[int], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold every lock of `devices`; `on_wait` is called once if another stage has one."""
        with self._guard:
            locks = [self._locks.setdefault(d, threading.Lock()) for d in sorted(set(devices))]
        with contextlib.ExitStack() as stack:
            for lock in locks:
                if not lock.acquire(blocking=False):
                    if on_wait is not None:
                        on_wait()
                        on_wait = None
                    lock.acquire()
                stack.callback(lock.release)
            yield


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


class PortPool:
    """Master ports handed out in this process; a port stays taken until its stage ends."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._taken: set[int] = set()

    @contextlib.contextmanager
    def reserve(self, preferred: int) -> Iterator[int]:
        """The first port from `preferred` up that no running stage holds and that is free."""
        with self._guard:
            for port in range(preferred, preferred + PORT_SEARCH_SPAN):
                if port not in self._taken and _bindable(port):
                    self._taken.add(port)
                    break
            else:
                raise RuntimeError(f"no free master port in {preferred}..{preferred + PORT_SEARCH_SPAN}")
        try:
            yield port
        finally:
            with self._guard:
                self._taken.discard(port)


DEVICE_LOCKS = DeviceLocks()
PORTS = PortPool()
