"""Start-up: ``import bunny`` and every command's ``--help`` stay free of torch/transformers,
and the lazily registered Auto classes still load a saved Bunny model in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TRAIN_SCRIPT

HEAVY = ("torch", "transformers")
# The command-line entry points: (how to run it, the argv its --help is run with).
COMMANDS = {
    "bunny.merge": ("module", "bunny.merge"),
    "bunny.average": ("module", "bunny.average"),
    "bunny.tiny": ("module", "bunny.tiny"),
    "bunny.generate": ("module", "bunny.generate"),
    "bunny.evaluate": ("module", "bunny.evaluate"),
    "flows.demo": ("module", "flows.demo"),
}


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    report = f"import sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = run_python(f"{code}\n{report}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_import_bunny_imports_neither_torch_nor_transformers():
    assert heavy_modules_after("import bunny, bunny.model, bunny.merge, bunny.generate, bunny.evaluate") == []


def test_lazy_package_attributes_resolve():
    import bunny.model
    from bunny.model.families import FAMILIES
    from bunny.model.registry import FAMILY_NAMES

    assert bunny.model.FAMILIES is FAMILIES and tuple(FAMILIES) == FAMILY_NAMES
    assert "VisionTower" in dir(bunny.model)
    with pytest.raises(AttributeError):
        bunny.model.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", COMMANDS)
def test_help_imports_neither_torch_nor_transformers(name):
    kind, target = COMMANDS[name]
    run = "run_module" if kind == "module" else "run_path"
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{target!r}, '--help']\n"
        "try:\n"
        f"    runpy.{run}({target!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "else:\n"
        "    raise AssertionError('--help did not exit')"
    )
    assert heavy_modules_after(code) == []


def test_train_help_is_cached_and_then_needs_no_torch(tmp_path):
    """train.py's flags come from transformers' TrainingArguments: the first --help imports it and
    caches the text; the next prints the same text without importing torch or transformers."""
    env = {"XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(TRAIN_SCRIPT)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(TRAIN_SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "import json\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    first, second = run_python(code, env), run_python(code, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == list(HEAVY)  # rendered by HfArgumentParser
    assert json.loads(second.stdout.splitlines()[-1]) == []
    assert "--model_name_or_path" in first.stdout and "--per_device_train_batch_size" in first.stdout
    assert second.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]  # the help, without the module list


@pytest.fixture(scope="module")
def saved_bunny_model(tmp_path_factory):
    from bunny.model.configs import BunnyPhi3Config
    from bunny.model.families import BunnyPhi3ForCausalLM

    config = BunnyPhi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    path = tmp_path_factory.mktemp("bunny-model")
    BunnyPhi3ForCausalLM(config).save_pretrained(path)
    return path


# Each order in which a user may import bunny and transformers' Auto classes.
IMPORT_ORDERS = {
    "bunny, then AutoConfig, then AutoModel": "import bunny\nfrom transformers import AutoConfig\n"
                                                "from transformers import AutoModelForCausalLM\n",
    "transformers first": "from transformers import AutoConfig, AutoModelForCausalLM\nimport bunny\n",
    # modeling_utils imports configuration_auto half-way through its own execution
    "bunny, then AutoImageProcessor": "import bunny\nfrom transformers import AutoImageProcessor\n"
                                      "from transformers import AutoConfig, AutoModelForCausalLM\n",
    "a Bunny module first": "import bunny.model.families\nfrom transformers import AutoConfig, AutoModelForCausalLM\n",
}


@pytest.fixture(scope="module")
def auto_class_runs(saved_bunny_model):
    """One fresh interpreter per import order, all started at once (each spends seconds
    importing torch and transformers: they share the cores instead of queueing)."""
    code = (
        f"config = AutoConfig.from_pretrained({str(saved_bunny_model)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(saved_bunny_model)!r})\n"
        "print(type(config).__name__, type(model).__name__)"
    )
    runs = {order: subprocess.Popen([sys.executable, "-c", imports + code], cwd=REPO, env=dict(os.environ),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for order, imports in IMPORT_ORDERS.items()}
    yield runs
    for run in runs.values():  # a test deselected or failed early leaves its run behind
        if run.poll() is None:
            run.kill()
        run.wait()


@pytest.mark.parametrize("order", IMPORT_ORDERS)
def test_auto_classes_load_a_saved_bunny_model_in_a_fresh_process(order, auto_class_runs):
    stdout, stderr = auto_class_runs[order].communicate(timeout=300)
    assert auto_class_runs[order].returncode == 0, stderr[-3000:]
    assert stdout.split()[-2:] == ["BunnyPhi3Config", "BunnyPhi3ForCausalLM"]
