"""Register the Bunny classes with transformers' Auto classes when transformers loads them.

``import bunny`` must not import torch or transformers (seconds of start-up for every
command), yet ``import bunny; AutoModelForCausalLM.from_pretrained(path)`` must load a saved
Bunny model. So a meta-path finder wraps the loaders of transformers' two Auto modules and
asks for the registration right after each has executed (at once for those already imported):
AutoConfig's asks for the config classes only, AutoModelForCausalLM's for the models too.

The imports interleave (``modeling_auto`` imports ``configuration_auto``; ``modeling_utils``
imports ``configuration_auto`` half-way through its own execution; a config class's docstring
decorator may import ``modeling_auto``; a Bunny module may be the one importing transformers),
so a request is served only once no transformers module is mid-execution: the finder wraps
every transformers module's loader until both registrations are done, and the last module
to finish serves it, or the bottom of ``bunny.model.configs`` / ``bunny.model.families`` does
(``register_wanted(finishing=__name__)``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# The --model_type values of the LLM families, importable without transformers (the
# command-line parsers' choices); bunny.model.families.FAMILIES holds one entry per name.
FAMILY_NAMES = ("phi-3", "llama", "qwen2")

CONFIG_AUTO_MODULE = "transformers.models.auto.configuration_auto"
MODELING_AUTO_MODULE = "transformers.models.auto.modeling_auto"
_CONFIGS_MODULE = "bunny.model.configs"
_FAMILIES_MODULE = "bunny.model.families"
# What each Auto module's import asks for: the module of ours that registers it.
_HOOKS = {CONFIG_AUTO_MODULE: _CONFIGS_MODULE, MODELING_AUTO_MODULE: _FAMILIES_MODULE}

_hooked: set[str] = set()  # Auto modules whose request has been made
_executing: set[str] = set()  # transformers modules executing under our loader wrapper
_wanted: set[str] = set()  # our modules whose registration is due
_registering = False


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def register_wanted(finishing: str | None = None) -> None:
    """Run the due registrations unless a module they depend on is mid-import.

    ``finishing`` is a Bunny module calling this from its own last line: complete enough.
    """
    global _registering
    if _registering or _executing:
        return
    if any(_initializing(name) for name in (_CONFIGS_MODULE, _FAMILIES_MODULE) if name != finishing):
        return
    _registering = True
    try:
        while _wanted:
            # The families' registration includes the configs'.
            name = _FAMILIES_MODULE if _FAMILIES_MODULE in _wanted else _CONFIGS_MODULE
            _wanted.difference_update({name, _CONFIGS_MODULE})
            importlib.import_module(name).register()
    finally:
        _registering = False
    if _hooked == set(_HOOKS) and not _wanted and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)  # all done: transformers' imports run unwrapped from now on


def _request(auto_module: str) -> None:
    _hooked.add(auto_module)
    _wanted.add(_HOOKS[auto_module])
    register_wanted()


def _is_transformers(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of transformers' modules."""

    def find_spec(self, fullname, path, target=None):
        if not _is_transformers(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            _executing.add(fullname)
            try:
                exec_module(module)
            finally:
                _executing.discard(fullname)
            if fullname in _HOOKS and fullname not in _hooked:
                _request(fullname)
            else:
                register_wanted()  # a request kept while this module executed may be due now

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


_FINDER = _AutoRegistrationFinder()


def install_auto_registration() -> None:
    """Register now for the Auto modules already imported, and on import for the others."""
    if _FINDER in sys.meta_path or _hooked == set(_HOOKS):
        return
    sys.meta_path.insert(0, _FINDER)
    for auto_module in _HOOKS:
        if auto_module in sys.modules and not _initializing(auto_module):
            _request(auto_module)
