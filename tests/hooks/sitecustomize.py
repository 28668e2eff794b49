"""Hands stage 1's test hooks to `python -m pipeline.cache` (tests/hooks/__init__.py: the
variables, and why a file of this name). Python imports it at start-up when this folder is on
PYTHONPATH; it waits for `pipeline.stage1_cache.run` to be imported, then binds that
module's `main` to `hooks=Hooks(...)` built from the variables, before `pipeline.cache`
imports `main`. A malformed variable fails that import, so the run stops instead of running
without its hook."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time

TARGET = "pipeline.stage1_cache.run"


def _hooks(run):
    """The `run.Hooks` that SAMPLEDKD_TEST_SLOW_RANK and SAMPLEDKD_TEST_STATIC_UNITS ask for."""
    kw = {}
    spec = os.environ.get("SAMPLEDKD_TEST_SLOW_RANK")
    if spec:
        who, _, seconds = spec.partition(":")
        slow, delay = (None if who == "*" else int(who)), float(seconds)

        def after_batch(rank: int) -> None:
            if slow is None or rank == slow:
                time.sleep(delay)
        kw["after_batch"] = after_batch
    if os.environ.get("SAMPLEDKD_TEST_STATIC_UNITS") == "1":
        kw["static_units"] = True
    return run.Hooks(**kw)


class _ThenInstall:
    """The stage module's own loader, then the hooks bound into its `main`."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):          # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.main = functools.partial(module.main, hooks=_hooks(module))


class _WatchStage:
    """A meta path finder that only wraps the loader of TARGET (found by the usual finders)."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)        # the module is imported once per process
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenInstall(spec.loader)
        return spec


sys.meta_path.insert(0, _WatchStage())
