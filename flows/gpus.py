"""Where each stage runs: its GPUs (or the CPU), its master port, its deepspeed launcher flags.

Recipes get windows of the device list side by side; when there are too few GPUs for all of
them at once, windows wrap around and overlap, and the GPU slots (`flows.slots`, one Prefect
global concurrency slot per GPU of each host) make a recipe wait until the stage on the same
GPUs has finished — two stages never share a GPU, even across flow runs. A stage's merge holds
its recipe's GPUs too. With no GPU visible every stage takes the CPU path (`--num_gpus 1`, one
process) and parallel stages split the cores between them.

A plan covers the stages of one host: those whose `launch.work_pool` is the pool it is made
for (None: the pipeline's own). A stage with a DeepSpeed hostfile spans the hosts it names;
its GPUs are resolved with DeepSpeed's own hostfile and `--include` parsing, so the global
batch is kept over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.config import LaunchSettings, PipelineConfig
from flows.slots import slot_name


class GpuPlanError(ValueError):
    """The requested GPU assignment does not fit the visible GPUs."""


@dataclass(frozen=True)
class Placement:
    """Where one stage runs. `devices` empty means the CPU path, unless a hostfile or an
    explicit `include` hands the choice to deepspeed; then `hosts` holds the GPUs it resolves
    to (host -> GPU ids), empty when they cannot be known before the launch."""

    devices: tuple[int, ...] = ()
    include: str | None = None
    hostfile: Path | None = None
    hosts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    preferred_port: int = 29500
    cpu_threads: int | None = None

    @property
    def on_cpu(self) -> bool:
        return not self.devices and self.include is None and self.hostfile is None

    @property
    def world_size(self) -> int | None:
        """GPUs the stage trains on over all its hosts (1 on the CPU; None: unknown)."""
        if self.devices:
            return len(self.devices)
        if self.hosts:
            return sum(len(ids) for _, ids in self.hosts)
        return 1 if self.on_cpu else None

    def gpu_slots(self) -> list[str]:
        """The GPU slot names this stage holds while it runs (none on the CPU)."""
        if self.devices:
            return [slot_name(None, index) for index in self.devices]
        return [slot_name(host, index) for host, ids in self.hosts for index in ids]

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


def resolve_hosts(hostfile: Path | None, include: str | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The GPUs per host a deepspeed launch with this hostfile and `--include` uses, by
    DeepSpeed's own parsing (no hostfile: only an include that lists every GPU id can be
    resolved; otherwise empty)."""
    from deepspeed.launcher.runner import _parse_hostfile, parse_inclusion_exclusion, parse_node_config_list

    if hostfile is None:
        listed = parse_node_config_list(include or "")
        if not listed or any(not ids for ids in listed.values()):
            return ()
        return tuple((host, tuple(ids)) for host, ids in listed.items())
    try:
        pool = _parse_hostfile(hostfile.read_text().splitlines())
        active = parse_inclusion_exclusion(pool, include or "", "")
    except OSError as exc:
        raise GpuPlanError(f"hostfile {hostfile}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise GpuPlanError(f"hostfile {hostfile}{f' with include {include!r}' if include else ''}: {exc}") from exc
    return tuple((host, tuple(ids)) for host, ids in active.items())


def _explicit(launch: LaunchSettings, port: int) -> Placement | None:
    if launch.hostfile is None and launch.include is None:
        return None
    return Placement(include=launch.include, hostfile=launch.hostfile,
                     hosts=resolve_hosts(launch.hostfile, launch.include), preferred_port=port)


def plan_placements(
    config: PipelineConfig, visible: Sequence[int], cpu_count: int | None = None, work_pool: str | None = None
) -> dict[str, Placement]:
    """Placement of pretrain and of every recipe (and so of its merge) that runs on
    `work_pool`'s host (None: the pipeline's own), keyed by stage name."""
    devices = list(config.gpus.devices if config.gpus.devices is not None else visible)
    missing = sorted(set(devices) - set(visible))
    if missing:
        raise GpuPlanError(f"gpus.devices {missing} are not visible (visible GPUs: {list(visible)})")
    base_port = config.gpus.master_port
    ports = {recipe.name: base_port + index for index, recipe in enumerate(config.recipes, start=1)}
    recipes = [recipe for recipe in config.recipes if recipe.launch.work_pool == work_pool]
    plan_pretrain = config.pretrain.launch.work_pool == work_pool
    placements: dict[str, Placement] = {}
    if not devices:
        cores = cpu_count or os.cpu_count() or 1
        shared = config.runtime.cpu_threads
        if plan_pretrain:
            placements["pretrain"] = _explicit(config.pretrain.launch, base_port) or Placement(
                preferred_port=base_port, cpu_threads=shared or cores
            )
        for recipe in recipes:
            port = ports[recipe.name]
            placements[recipe.name] = _explicit(recipe.launch, port) or Placement(
                preferred_port=port,
                cpu_threads=shared or max(1, cores // len(recipes)),
            )
        return placements

    problems = []
    if plan_pretrain:
        wanted = config.pretrain.launch.num_gpus or len(devices)
        if wanted > len(devices):
            problems.append(f"pretrain asks for {wanted} GPUs, {len(devices)} available")
        placements["pretrain"] = _explicit(config.pretrain.launch, base_port) or Placement(
            devices=tuple(devices[:wanted]), preferred_port=base_port
        )
    share = config.gpus.gpus_per_recipe or max(1, len(devices) // max(1, len(recipes)))
    cursor = 0
    for recipe in recipes:
        port = ports[recipe.name]
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
