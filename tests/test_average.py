"""bunny.average: exact weighted sums, inherited files, every refused input, crash safety."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bunny import average as average_module
from bunny import fsutil
from bunny.average import (
    INDEX_NAME,
    AverageError,
    NonFiniteInputError,
    SafetensorsWriter,
    StreamingAverager,
    average_checkpoints,
    main,
    parse_size,
    read_checkpoint,
)
from bunny.fsutil import atomic_output_dir, write_json_atomic
from conftest import fill_the_disk_after

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.qkv_proj.weight": (48, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 33),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}


def random_state(seed: int, dtype: torch.dtype, shapes: dict = SHAPES) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def save_model(
    folder: Path, state: dict[str, torch.Tensor], shards: int = 1, extra_files: dict | None = None
) -> Path:
    """Save `state` as one model.safetensors (shards=1) or `shards` files with an index."""
    folder.mkdir(parents=True)
    names = list(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", {"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: state[name] for name in names[i::shards]}
            save_file(part, folder / shard, {"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        total = sum(t.nbytes for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index))
    for name, text in (extra_files or {"config.json": json.dumps({"source": folder.name})}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as handle:
            for name in handle.keys():
                assert index["weight_map"][name] == shard
                state[name] = handle.get_tensor(name)
    assert set(state) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    return state


def weighted_sum_float64(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    return {
        name: sum(w * s[name].double() for s, w in zip(states, weights)) for name in states[0]
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    states = [random_state(1, torch.bfloat16), random_state(2, torch.bfloat16)]
    first = save_model(tmp_path / "recipe-1", states[0], shards=1)
    second = save_model(
        tmp_path / "recipe-2",
        states[1],
        shards=2,
        extra_files={
            "config.json": json.dumps({"model_type": "bunny-phi3", "from": "recipe-2"}),
            "generation_config.json": "{}",
            "tokenizer.json": '{"version": "1.0"}',
            "pytorch_model.bin": "stale weights in another format",
            "vision/preprocessor_config.json": "{}",
        },
    )
    return first, second, states


@pytest.mark.parametrize("num_inputs", [2, 3])
def test_float32_output_is_the_weighted_sum(tmp_path: Path, num_inputs: int) -> None:
    states = [random_state(seed, torch.float32) for seed in range(num_inputs)]
    folders = [save_model(tmp_path / f"m{i}", s, shards=i + 1) for i, s in enumerate(states)]
    weights = [0.3, 0.7] if num_inputs == 2 else [0.2, 0.3, 0.5]
    average_checkpoints(folders, tmp_path / "avg", weights, chunk_elements=32)
    output = load_output(tmp_path / "avg")
    expected = weighted_sum_float64(states, weights)
    for name, tensor in output.items():
        assert tensor.dtype == torch.float32 and tensor.shape == SHAPES[name]
        torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_inputs", [2, 3])
def test_bfloat16_output_is_the_weighted_sum_to_bf16_rounding(tmp_path: Path, num_inputs: int) -> None:
    states = [random_state(10 + seed, torch.bfloat16) for seed in range(num_inputs)]
    folders = [save_model(tmp_path / f"m{i}", s, shards=3 - i) for i, s in enumerate(states)]
    weights = [0.3, 0.7] if num_inputs == 2 else [0.25, 0.25, 0.5]
    average_checkpoints(folders, tmp_path / "avg", weights, max_shard_size=700, chunk_elements=24)
    output = load_output(tmp_path / "avg")
    expected = weighted_sum_float64(states, weights)
    exact = total = 0
    for name, tensor in output.items():
        assert tensor.dtype == torch.bfloat16
        rounded = expected[name].to(torch.bfloat16)
        # Accumulating in float32 then rounding once may differ from the float64 sum rounded
        # once by one bf16 step (2**-7 relative at most), and only near a rounding tie.
        torch.testing.assert_close(tensor.double(), rounded.double(), rtol=2**-7, atol=1e-6)
        exact += int((tensor == rounded).sum())
        total += tensor.numel()
    assert exact / total > 0.99
    # The tutorial's bf16 arithmetic (`m1[k] * 0.3 + m2[k] * 0.7`) rounds three times: ours is
    # at least as close to the true sum.
    if num_inputs == 2:
        name = "lm_head.weight"
        tutorial = states[0][name] * 0.3 + states[1][name] * 0.7
        ours_error = (output[name].double() - expected[name]).abs().sum()
        assert ours_error <= (tutorial.double() - expected[name]).abs().sum()


def test_mixed_dtypes_and_integer_buffers_keep_their_dtype(tmp_path: Path) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        s = random_state(seed, torch.float16)
        s["model.norm.weight"] = s["model.norm.weight"].float()
        s["model.position_ids"] = torch.arange(7, dtype=torch.int64)
        s["model.empty"] = torch.zeros(0, 4, dtype=torch.float16)
        return s

    states = [state(1), state(2)]
    folders = [save_model(tmp_path / f"m{i}", s, shards=2) for i, s in enumerate(states)]
    average_checkpoints(folders, tmp_path / "avg", max_shard_size=900)
    output = load_output(tmp_path / "avg")
    assert output["model.norm.weight"].dtype == torch.float32
    assert output["lm_head.weight"].dtype == torch.float16
    assert torch.equal(output["model.position_ids"], torch.arange(7))
    assert output["model.empty"].shape == (0, 4)
    expected = weighted_sum_float64(
        [{k: v for k, v in s.items() if v.is_floating_point()} for s in states], [0.3, 0.7]
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(output[name].double(), tensor, rtol=2**-10, atol=1e-6)


def test_output_is_sharded_under_the_size_limit_with_an_index(tmp_path: Path, two_models) -> None:
    first, second, _ = two_models
    result = average_checkpoints([first, second], tmp_path / "avg", max_shard_size=3000)
    files = sorted(p.name for p in (tmp_path / "avg").glob("model-*.safetensors"))
    assert files == result.shard_files and len(files) == len(result.shard_files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    largest_tensor = max(40 * 16 * 2, 48 * 16 * 2)
    for name in files:
        with safe_open(tmp_path / "avg" / name, framework="pt") as handle:
            size = sum(handle.get_tensor(k).nbytes for k in handle.keys())
        assert size <= max(3000, largest_tensor)
    assert result.num_tensors == len(SHAPES)


def test_output_inherits_the_last_inputs_non_weight_files_by_default(tmp_path: Path, two_models) -> None:
    first, second, _ = two_models
    average_checkpoints([first, second], tmp_path / "avg")
    names = sorted(str(p.relative_to(tmp_path / "avg")) for p in (tmp_path / "avg").rglob("*"))
    assert names == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00001.safetensors",
        INDEX_NAME,
        "tokenizer.json",
        "vision",
        "vision/preprocessor_config.json",
    ]
    assert json.loads((tmp_path / "avg/config.json").read_text())["from"] == "recipe-2"


def test_inherit_from_picks_another_input(tmp_path: Path, two_models) -> None:
    first, second, _ = two_models
    assert main([str(first), str(second), "-o", str(tmp_path / "avg"), "--inherit-from", str(first)]) == 0
    assert json.loads((tmp_path / "avg/config.json").read_text()) == {"source": "recipe-1"}
    assert not (tmp_path / "avg/tokenizer.json").exists()
    assert main([str(first), str(second), "-o", str(tmp_path / "x"), "--inherit-from", str(tmp_path)]) == 2


def assert_refused(tmp_path: Path, models: list[Path], match: str, **kwargs) -> None:
    with pytest.raises(AverageError, match=match):
        average_checkpoints(models, tmp_path / "avg", **kwargs)
    assert not (tmp_path / "avg").exists() and not leftovers(tmp_path)


def test_refuses_differing_tensor_names_and_lists_them(tmp_path: Path) -> None:
    state = random_state(1, torch.float32)
    renamed = {k.replace("lm_head", "output_head"): v for k, v in random_state(2, torch.float32).items()}
    folders = [save_model(tmp_path / "a", state), save_model(tmp_path / "b", renamed)]
    assert_refused(tmp_path, folders, r"b lacks lm_head\.weight\n  .*b has extra output_head\.weight")


def test_refuses_differing_shapes_and_dtypes_and_lists_them(tmp_path: Path) -> None:
    state = random_state(1, torch.float32)
    other = random_state(2, torch.float32)
    other["model.norm.weight"] = torch.zeros(17)
    other["lm_head.weight"] = other["lm_head.weight"].bfloat16()
    folders = [save_model(tmp_path / "a", state), save_model(tmp_path / "b", other)]
    with pytest.raises(AverageError) as error:
        average_checkpoints(folders, tmp_path / "avg")
    assert "shapes differ for model.norm.weight" in str(error.value)
    assert "dtypes differ for lm_head.weight" in str(error.value)
    assert not (tmp_path / "avg").exists()


def test_refuses_differing_integer_buffers(tmp_path: Path) -> None:
    states = [random_state(i, torch.float32) for i in (1, 2)]
    states[0]["ids"], states[1]["ids"] = torch.arange(4), torch.arange(1, 5)
    folders = [save_model(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    assert_refused(tmp_path, folders, "non-float tensors .* differ between inputs: ids")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.6], r"sum to 1\.1, not 1 \(pass --allow-unnormalized"),
        ([1.2, -0.2], "non-negative"),
        ([0.2, 0.3, 0.5], "3 values for 2 model folders"),
    ],
)
def test_refuses_bad_weights(tmp_path: Path, two_models, weights: list[float], match: str) -> None:
    first, second, _ = two_models
    assert_refused(tmp_path, [first, second], match, weights=weights)


def test_unnormalized_weights_need_the_explicit_flag(tmp_path: Path, two_models) -> None:
    first, second, states = two_models
    average_checkpoints([first, second], tmp_path / "sum", [1.0, 1.0], allow_unnormalized=True)
    output = load_output(tmp_path / "sum")
    expected = weighted_sum_float64(states, [1.0, 1.0])
    torch.testing.assert_close(output["lm_head.weight"].double(), expected["lm_head.weight"], rtol=2**-7, atol=1e-6)


def test_refuses_missing_shard_naming_it(tmp_path: Path, two_models) -> None:
    first, second, _ = two_models
    (second / "model-00002-of-00002.safetensors").unlink()
    assert_refused(tmp_path, [first, second], r"missing shard: .*recipe-2/model-00002-of-00002")


@pytest.mark.parametrize("keep", [-1, 200, 5])
def test_refuses_truncated_shard_naming_it(tmp_path: Path, two_models, keep: int) -> None:
    """Cut inside the last tensor, inside the header, and inside the header's length."""
    first, second, _ = two_models
    shard = second / "model-00001-of-00002.safetensors"
    os.truncate(shard, keep if keep > 0 else shard.stat().st_size + keep)
    assert_refused(tmp_path, [first, second], r"truncated .*recipe-2/model-00001-of-00002")


def test_refuses_folder_without_weights(tmp_path: Path, two_models) -> None:
    first, _, _ = two_models
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, [first, tmp_path / "empty"], "neither model.safetensors.index.json")


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path, two_models) -> None:
    first, second, states = two_models
    (tmp_path / "avg").mkdir()
    (tmp_path / "avg/stale.txt").write_text("old")
    with pytest.raises(AverageError, match="already exists .*--overwrite"):
        average_checkpoints([first, second], tmp_path / "avg")
    assert (tmp_path / "avg/stale.txt").exists()
    average_checkpoints([first, second], tmp_path / "avg", overwrite=True)
    assert not (tmp_path / "avg/stale.txt").exists()
    assert set(load_output(tmp_path / "avg")) == set(states[0])
    assert not leftovers(tmp_path)
    with pytest.raises(AverageError, match="overlaps input"):
        average_checkpoints([first, second], second, overwrite=True)


def crash_after_first_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = SafetensorsWriter.write
    calls = []

    def failing_write(self: SafetensorsWriter, data: memoryview) -> None:
        if calls:
            raise OSError("disk vanished")
        calls.append(1)
        real_write(self, data)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)


def test_crash_half_way_leaves_no_finished_looking_output(
    tmp_path: Path, two_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, _ = two_models
    crash_after_first_write(monkeypatch)
    with pytest.raises(OSError, match="disk vanished"):
        average_checkpoints([first, second], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    assert not leftovers(tmp_path)


def test_crash_during_overwrite_keeps_the_previous_output(
    tmp_path: Path, two_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, _ = two_models
    average_checkpoints([first, second], tmp_path / "avg")
    before = load_output(tmp_path / "avg")
    crash_after_first_write(monkeypatch)
    with pytest.raises(OSError):
        average_checkpoints([first, second], tmp_path / "avg", [0.5, 0.5], overwrite=True)
    after = load_output(tmp_path / "avg")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not leftovers(tmp_path)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(1234) == 1234
    with pytest.raises(AverageError, match="--max-shard-size"):
        parse_size("lots")


def test_read_checkpoint_orders_tensors_by_file_then_offset(two_models) -> None:
    _, second, states = two_models
    checkpoint = read_checkpoint(second)
    assert set(checkpoint.tensors) == set(states[1])
    order = [(e.file.name, e.start) for e in checkpoint.tensors.values()]
    assert order == sorted(order)
    assert checkpoint.weight_files == {INDEX_NAME, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_atomic_output_dir_and_write_json_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as temp:
            (temp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and not leftovers(tmp_path)
    with atomic_output_dir(target) as temp:
        assert temp.parent == tmp_path and not target.exists()
        (temp / "done").write_text("x")
    assert (target / "done").exists()
    with pytest.raises(FileExistsError):
        with atomic_output_dir(target):
            pass
    write_json_atomic(tmp_path / "state.json", {"step": 3})
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 3}
    assert not leftovers(tmp_path)


def test_cli_end_to_end(tmp_path: Path, two_models) -> None:
    first, second, states = two_models
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "bunny.average", str(first), str(second), "-o", str(tmp_path / "avg")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    output = load_output(tmp_path / "avg")
    expected = weighted_sum_float64(states, [0.3, 0.7])
    torch.testing.assert_close(output["lm_head.weight"].double(), expected["lm_head.weight"].bfloat16().double(), rtol=2**-7, atol=1e-6)


def test_cli_refusal_exits_2_with_one_line(tmp_path: Path, two_models, capsys, monkeypatch) -> None:
    first, second, _ = two_models
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    assert main([str(first), str(second), "-o", str(tmp_path / "avg"), "-w", "0.5", "0.6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bunny-average: error: --weights [0.5, 0.6] sum to 1.1") and len(err.splitlines()) == 1
    assert main([str(first), str(second), "-o", str(tmp_path / "avg"), "--inherit-from", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("bunny-average: error: --inherit-from")
    with pytest.raises(AverageError, match="sum to 1.1"):
        main([str(first), str(second), "-o", str(tmp_path / "avg"), "-w", "0.5", "0.6", "--debug"])


def fake_free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make every file system report `free` bytes available (4 KiB blocks)."""
    fake = SimpleNamespace(f_frsize=4096, f_bavail=free // 4096)
    monkeypatch.setattr(fsutil.os, "statvfs", lambda path: fake)


def disk_size_of(folder: Path) -> int:
    """What `folder`'s files take in 4 KiB blocks, measured on a finished output."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_free_space_check_counts_every_file_in_human_units(
    tmp_path: Path, two_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, states = two_models
    average_checkpoints([first, second], tmp_path / "reference")
    written = disk_size_of(tmp_path / "reference")
    tensor_bytes = sum(t.nbytes for t in states[0].values())
    assert written > tensor_bytes + 4096  # headers, index, config, tokenizer... weigh
    fake_free_space(monkeypatch, written - 4096)
    assert_refused(tmp_path, [first, second], r"output .*avg needs \d+\.\d KB \(\d+ files\) but .* has "
                   rf"{(written - 4096) / 1000:.1f} KB free")
    fake_free_space(monkeypatch, written + 8192)
    average_checkpoints([first, second], tmp_path / "avg")


def test_disk_full_mid_write_is_one_clear_error(
    tmp_path: Path, two_models, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    first, second, _ = two_models
    fill_the_disk_after(monkeypatch, room=600)
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    with pytest.raises(AverageError) as caught:
        average_checkpoints([first, second], tmp_path / "avg", chunk_elements=64)
    assert "(write)" in str(caught.value.__cause__)  # the first failure, not abort()'s failing close
    message = str(caught.value)
    assert message.startswith(f"output {tmp_path / 'avg'}: the disk filled up while writing (No space left")
    assert re.search(r"needs \d+\.\d KB; .* were free when it started, .* are free now$", message)
    assert not (tmp_path / "avg").exists() and not leftovers(tmp_path)
    assert main([str(first), str(second), "-o", str(tmp_path / "avg")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "disk filled up" in err


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 256 KiB tmpfs, where the machine lets us mount one (root on Linux); else skip."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_on_a_real_small_filesystem(tmp_path: Path, small_filesystem: Path, monkeypatch) -> None:
    shapes = {"a": (128, 256), "b": (256, 256)}  # 393 KB in float32: more than the 262 KB (256 KiB) disk
    folders = [save_model(tmp_path / f"m{i}", random_state(i, torch.float32, shapes)) for i in range(2)]
    with pytest.raises(AverageError, match=r"needs 4\d\d\.\d KB \(\d+ files\) but .* has 2\d\d\.\d KB free"):
        average_checkpoints(folders, small_filesystem / "avg")
    monkeypatch.setattr(average_module, "free_space_problem", lambda *args: None)  # let it try anyway
    with pytest.raises(AverageError, match=rf"output {small_filesystem / 'avg'}: the disk filled up"):
        average_checkpoints(folders, small_filesystem / "avg")
    assert list(small_filesystem.iterdir()) == []
    assert shutil.disk_usage(small_filesystem).used < 16 * 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_named_and_nothing_is_written(tmp_path: Path, dtype, bad) -> None:
    states = [random_state(1, dtype), random_state(2, dtype)]
    states[1]["model.layers.0.mlp.down_proj.weight"].view(-1)[300] = bad
    folders = [save_model(tmp_path / "m0", states[0]), save_model(tmp_path / "m1", states[1], shards=2)]
    shard = next(f for f in sorted(folders[1].glob("*.safetensors"))
                 if "model.layers.0.mlp.down_proj.weight" in safe_open(f, "pt").keys())
    kind = "NaN" if bad != bad else "inf"
    assert_refused(tmp_path, folders, rf"{re.escape(str(shard))}: tensor model.layers.0.mlp.down_proj.weight "
                   rf"holds {kind} \(element 300;", chunk_elements=128)
    with pytest.raises(NonFiniteInputError):
        average_checkpoints(folders, tmp_path / "avg", [0.999, 0.001])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_screen_finds_negative_inf_and_overflow_on_every_path(tmp_path: Path, dtype) -> None:
    """16-bit chunks are screened on their exponent bits: -inf in one of three inputs (the
    float32 accumulator's path) is named, and so is a sum that only overflows on rounding
    back to 16 bits (every input finite), on the two-input (fused) path as on the other."""
    states = [random_state(seed, dtype) for seed in range(3)]
    states[2]["lm_head.weight"].view(-1)[7] = -float("inf")
    folders = [save_model(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    assert_refused(tmp_path, folders, rf"tensor lm_head.weight holds inf \(element 7;",
                   weights=[0.2, 0.3, 0.5], chunk_elements=64)
    largest = torch.finfo(dtype).max
    huge = [{name: torch.full_like(t, largest) for name, t in random_state(seed, dtype).items()}
            for seed in range(2)]
    folders = [save_model(tmp_path / f"huge{i}", s) for i, s in enumerate(huge)]
    assert_refused(tmp_path, folders, rf"overflows {'F16' if dtype == torch.float16 else 'BF16'}",
                   weights=[0.9, 0.9], allow_unnormalized=True)
    # The same finite inputs with weights summing to 1 (the fused two-input path) average cleanly.
    average_checkpoints(folders, tmp_path / "avg", [0.3, 0.7])
    assert all(torch.equal(t, huge[0][name]) for name, t in load_output(tmp_path / "avg").items())


def test_zero_weight_inputs_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poisoned = {name: torch.full_like(t, float("nan")) for name, t in random_state(1, torch.float32).items()}
    clean = random_state(2, torch.float32)
    ints = {"model.buffer": torch.arange(4)}
    folders = [save_model(tmp_path / "poisoned", poisoned | {"model.buffer": torch.arange(4) + 9}),
               save_model(tmp_path / "clean", clean | ints)]
    read_files: set[Path] = set()
    real_read, real_read_bytes = StreamingAverager._read, average_module._read_bytes
    monkeypatch.setattr(StreamingAverager, "_read", lambda self, chunk, slot: (
        read_files.update(e.file for e in chunk.sources), real_read(self, chunk, slot))[1])
    monkeypatch.setattr(average_module, "_read_bytes", lambda entry: (
        read_files.add(entry.file), real_read_bytes(entry))[1])
    average_checkpoints(folders, tmp_path / "avg", [0.0, 1.0])
    assert read_files == {folders[1] / "model.safetensors"}
    output = load_output(tmp_path / "avg")
    assert all(torch.equal(output[name], tensor) for name, tensor in (clean | ints).items())
    with pytest.raises(AverageError, match="all zero"):
        average_checkpoints(folders, tmp_path / "zeros", [0.0, 0.0], allow_unnormalized=True)


RSS_PROBE = """
import re, sys
import safetensors.torch, torch  # imported lazily by bunny.average: their memory must not count
from bunny.average import average_checkpoints

def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak RSS (VmHWM): the imports' transient peak must not count
before = status("VmRSS")
average_checkpoints(sys.argv[1:3], sys.argv[3])
print(status("VmHWM") - before)
"""


def test_memory_stays_flat_whatever_the_model_size(tmp_path: Path) -> None:
    """Averaging two 64 MB inputs raises the peak RSS by the chunk buffers (a few MB) and the
    output's two aligned write buffers (``OUTPUT_BUFFER_BYTES`` each) only, not by a tensor or
    a shard: a loader holding even one input whole would add 64 MB more."""
    shapes = {f"layer{i}.weight": (1024, 4096) for i in range(4)}  # 4 x 16 MB in float32
    folders = [save_model(tmp_path / f"m{i}", random_state(i, torch.float32, shapes)) for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *map(str, folders), str(tmp_path / "avg")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb = int(done.stdout.split()[-1]) / 1024  # /proc/self/status counts in kB
    bound_mb = 40 + 2 * average_module.OUTPUT_BUFFER_BYTES / 2**20
    assert grown_mb < bound_mb, f"peak RSS grew by {grown_mb:.0f} MB averaging two 64 MB models"
    assert (tmp_path / "avg" / "model-00001-of-00001.safetensors").stat().st_size > 64 * 10**6


def test_output_loads_with_transformers(tmp_path: Path) -> None:
    """The streamed shards and index are a model folder Hugging Face loads as is."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
    )
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(Phi3ForCausalLM(config))
        models[-1].save_pretrained(tmp_path / f"m{seed}", max_shard_size="20KB")
    average_checkpoints([tmp_path / "m1", tmp_path / "m2"], tmp_path / "avg", max_shard_size="30KB")
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path / "avg")
    first, second = (m.state_dict() for m in models)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, 0.3 * first[name] + 0.7 * second[name])


def test_shards_go_to_disk_while_written_two_windows_at_most_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the output cannot bypass the page cache, each full window is queued for writeback
    as soon as it is written and the one before is waited for, so the final fsync finds at most
    two windows left (not the whole model)."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: lambda fd, offset, length, flags: calls.append(
        (offset, length, flags)))
    monkeypatch.setattr(fsutil.Writeback.__init__, "__defaults__", (4096,))
    monkeypatch.delattr(os, "O_DIRECT")  # a file system without O_DIRECT: DirectFile goes through the page cache
    monkeypatch.setattr(average_module, "OUTPUT_BUFFER_BYTES", 4096)
    states = [random_state(seed, torch.float32, {"a": (64, 64), "b": (3, 1000)}) for seed in (1, 2)]
    folders = [save_model(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    average_checkpoints(folders, tmp_path / "avg", chunk_elements=500)
    write, wait = fsutil.Writeback.WRITE, fsutil.Writeback.WAIT_BEFORE | fsutil.Writeback.WRITE | fsutil.Writeback.WAIT_AFTER
    queued = [(offset, length) for offset, length, flags in calls if flags == write]
    waited = [(offset, length) for offset, length, flags in calls if flags == wait]
    assert len(calls) == len(queued) + len(waited) and len(queued) >= 4
    size = (tmp_path / "avg" / "model-00001-of-00001.safetensors").stat().st_size
    assert queued[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(queued, queued[1:]))  # in order, no gap
    assert all(n >= 4096 for _, n in queued) and size - sum(n for _, n in queued) < 4096 + 2000
    assert waited == queued[:-1]  # each window is waited for once the next one is queued


def test_writeback_without_kernel_support_leaves_it_to_fsync(tmp_path: Path, monkeypatch) -> None:
    def unsupported(fd, offset, length, flags):
        raise OSError(errno.EINVAL, "not here")

    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: unsupported)
    writeback = fsutil.Writeback(window=10)
    writeback.wrote(0, 100)
    assert writeback.window == float("inf")
    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: lambda *args: (_ for _ in ()).throw(
        OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        fsutil.Writeback(window=10).wrote(0, 100)


def test_shard_cut_short_while_being_averaged_is_named(tmp_path: Path, monkeypatch) -> None:
    """The inputs are mapped, not read: a shard truncated after its header was checked must
    give an error naming it, not a SIGBUS that kills the process."""
    states = [random_state(seed, torch.float32, {"a": (256, 256)}) for seed in (1, 2)]
    folders = [save_model(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    victim = folders[1] / "model.safetensors"
    real_map = StreamingAverager._map

    def map_then_truncate(self, path):
        mapped = real_map(self, path)
        if path == victim:
            os.truncate(path, 4096)
        return mapped

    monkeypatch.setattr(StreamingAverager, "_map", map_then_truncate)
    assert_refused(tmp_path, folders, rf"truncated shard {re.escape(str(victim))}: it shrank", chunk_elements=4096)
