"""Wall time and peak memory of `bunny-average` against the tutorial's averaging loop.

Builds two random bf16 models with Phi-3-mini's tensor shapes (fewer layers), saved in 1 GB
shards, then times in fresh processes, interleaved, median of `--repeats`:
  (a) `python -m bunny.average` (streaming, fsyncs its output), as shipped;
  (a') the same `main()` with the `bunny` package's `__init__` skipped: the module's own cost,
       without whatever the package imports at start-up;
  (b) the tutorial's loop: load_file both shards whole, `m1[k] * 0.3 + m2[k] * 0.7`, save_file;
  (c) `cp -r` of one model: the copy floor (the page cache's speed: nothing reaches the disk);
  (d) `cp -r` then `sync` of the copied files: the floor with the output on disk, which (a)
      guarantees and (b) does not. If (d) alone takes more than half of (b), (a) <= 0.5x (b)
      is out of reach on this disk, however little (a) computes;
  (e) `python -c "import torch"`: the start-up (a) pays before its first byte of arithmetic,
      which the disk cannot overlap; (d) + (e) is the floor of (a) printed at the end.
Peak RSS is each child's own maximum resident set, from GNU time (`/usr/bin/time`, which
forks from a small process, so the parent's memory is not counted in). One untimed pass of
every command warms the page cache and the interpreter's files first, and dirty pages are
synced between runs.

    python benchmarks/average_bench.py --layers 6
    python benchmarks/average_bench.py --layers 12 --json /tmp/average_bench_12.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PHI3_CONFIG_NAME = "phi-3-mini-4k-instruct.config.json"


def default_phi3_config() -> Path:
    """The shared reference config in `../shared/reference/` beside the repository (for a
    worktree under `wt/`, beside the folder that holds it)."""
    candidates = [root / "shared" / "reference" / PHI3_CONFIG_NAME for root in REPO_ROOT.parents[:2]]
    return next((path for path in candidates if path.is_file()), candidates[0])
SHARD_BYTES = 10**9

MODULE_ONLY = """
import sys, types
package = types.ModuleType("bunny")
package.__path__ = [sys.argv.pop(1) + "/bunny"]
sys.modules["bunny"] = package
from bunny.average import main
sys.exit(main(sys.argv[1:]))
"""

TUTORIAL_LOOP = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
first, second, out = map(Path, sys.argv[1:4])
shards = sorted(set(json.loads((first / "model.safetensors.index.json").read_text())["weight_map"].values()))
for shard in shards:
    model_1 = load_file(first / shard)
    model_2 = load_file(second / shard)
    assert model_1.keys() == model_2.keys()
    avg = {}
    for k in model_1.keys():
        avg[k] = model_1[k] * 0.3 + model_2[k] * 0.7
    save_file(avg, out / shard, {"format": "pt"})
"""


def phi3_tensor_shapes(config: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Hugging Face Phi3ForCausalLM state dict."""
    hidden, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = hidden + 2 * config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.self_attn.qkv_proj.weight", (qkv, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            (f"{prefix}.mlp.gate_up_proj.weight", (2 * mlp, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, mlp)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_random_model(folder: Path, config: dict, layers: int, seed: int) -> int:
    """Save a random bf16 model in ~1 GB shards with an index; returns its size in bytes."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in phi3_tensor_shapes(config, layers):
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
            for name, shape in group
        }
        save_file(tensors, folder / shard, {"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    return total


def run_measured(command: list[str], rss_file: Path) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + sys) of one fresh child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    timed = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *command]
    started = time.perf_counter()
    done = subprocess.run(timed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    peak_kib, user, system = rss_file.read_text().split()[-3:]
    return wall, int(peak_kib) * 1024, float(user) + float(system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, help="where to write the figures (default: print only)")
    parser.add_argument("--phi3-config", type=Path, default=default_phi3_config(),
                        help="Phi-3-mini config.json (default: ../shared/reference/)")
    args = parser.parse_args()

    config = json.loads(args.phi3_config.read_text())
    load_at_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="average_bench_", dir=args.workdir))
    try:
        first, second = root / "recipe-1", root / "recipe-2"
        started = time.perf_counter()
        model_bytes = write_random_model(first, config, args.layers, seed=1)
        write_random_model(second, config, args.layers, seed=2)
        print(f"built 2 x {model_bytes / 1e9:.2f} GB models ({args.layers} layers) "
              f"in {time.perf_counter() - started:.0f} s under {root}")
        output = root / "out"
        os.sync()
        average_args = [str(first), str(second), "-o", str(output), "--weights", "0.3", "0.7",
                        "--max-shard-size", "1GB"]
        commands = {
            "a_bunny_average": [sys.executable, "-m", "bunny.average", *average_args],
            "a_module_only": [sys.executable, "-c", MODULE_ONLY, str(REPO_ROOT), *average_args],
            "b_tutorial_loop": [sys.executable, "-c", TUTORIAL_LOOP, str(first), str(second),
                                str(output)],
            "c_cp_r": ["cp", "-r", str(first), str(output)],
            "d_cp_r_fsync": ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", str(first), str(output)],
            "e_import_torch": [sys.executable, "-c", "import torch"],
        }
        samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in commands}
        for repeat in range(args.repeats + 1):
            for name, command in commands.items():
                if name == "b_tutorial_loop":
                    output.mkdir()
                measured = run_measured(command, root / "rss.txt")
                if repeat > 0:  # the first pass only warms caches
                    samples[name].append(measured)
                shutil.rmtree(output, ignore_errors=name == "e_import_torch")
                os.sync()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    results = {
        name: {
            "wall_s": statistics.median(wall for wall, _, _ in runs),
            "cpu_s": statistics.median(cpu for _, _, cpu in runs),
            "peak_rss_mb": statistics.median(rss for _, rss, _ in runs) / 2**20,
            "runs": [{"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss / 2**20} for wall, rss, cpu in runs],
        }
        for name, runs in samples.items()
    }
    tutorial, floor, disk_floor = results["b_tutorial_loop"], results["c_cp_r"], results["d_cp_r_fsync"]
    ratios = {
        f"{name}_over_b": {
            "wall": results[name]["wall_s"] / tutorial["wall_s"],
            "cpu": results[name]["cpu_s"] / tutorial["cpu_s"],
            "peak_rss": results[name]["peak_rss_mb"] / tutorial["peak_rss_mb"],
            "wall_over_c": results[name]["wall_s"] / floor["wall_s"],
            "wall_over_d": results[name]["wall_s"] / disk_floor["wall_s"],
        }
        for name in ("a_bunny_average", "a_module_only")
    }
    print(f"\n{'command':<18}{'wall s (median)':>17}{'cpu s (user+sys)':>18}{'peak RSS MB':>14}   runs (wall s)")
    for name, figures in results.items():
        runs = " ".join(f"{run['wall_s']:.2f}" for run in figures["runs"])
        print(f"{name:<18}{figures['wall_s']:>17.2f}{figures['cpu_s']:>18.2f}"
              f"{figures['peak_rss_mb']:>14.0f}   {runs}")
    print()
    for name, ratio in ratios.items():
        print(f"{name}: wall {ratio['wall']:.2f}x (target <= 0.5), cpu {ratio['cpu']:.2f}x, "
              f"peak RSS {ratio['peak_rss']:.1%} (target <= 15%); {ratio['wall_over_c']:.2f}x cp -r, "
              f"{ratio['wall_over_d']:.2f}x cp -r + fsync")
    disk_floor_over_b = disk_floor["wall_s"] / tutorial["wall_s"]
    print(f"d_cp_r_fsync alone is {disk_floor_over_b:.2f}x the tutorial loop's wall "
          f"({model_bytes / 1e9 / disk_floor['wall_s']:.2f} GB/s to disk): the floor of (a)/(b) with fsync kept")
    start_floor = disk_floor["wall_s"] + results["e_import_torch"]["wall_s"]
    print(f"d_cp_r_fsync + e_import_torch = {start_floor:.2f} s, {start_floor / tutorial['wall_s']:.2f}x the tutorial "
          f"loop's wall: (a)'s floor with the fsync kept (a_bunny_average is {results['a_bunny_average']['wall_s'] / start_floor:.2f}x it)")
    load = os.getloadavg()
    print(f"load average at start (1/5/15 min): {' '.join(f'{x:.1f}' for x in load_at_start)}; "
          f"at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} CPUs")
    report = {"layers": args.layers, "model_gb": model_bytes / 1e9, "repeats": args.repeats,
              "load_average_at_start": load_at_start, "load_average": load, "results": results, "ratios": ratios,
              "disk_floor_over_b": disk_floor_over_b}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
