"""lm-eval's logging and environment probing, tamed for a run that calls `simple_evaluate`
once per task (used by `pipeline.evaluate`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropGenKwargsNotice(logging.Filter):
    """simple_evaluate warns "generation_kwargs ... specified through cli" on every call that
    sets max_gen_toks; we set it on purpose for every generation task."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("generation_kwargs:")


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns that "Custom kwargs can be passed to `--metadata`" whenever a task has a
    `custom_dataset`; every offline task of ours has one (`pipeline/stage3_evaluate/tasks/local_data.py`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


def quiet_libraries(verbose: bool) -> None:
    """lm-eval logs every request batch at INFO; keep warnings unless --verbose."""
    for name, cls in (("lm_eval.evaluator", _DropGenKwargsNotice),
                      ("lm_eval.api.task", _DropCustomDatasetNotice)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
    if verbose:
        return
    import datasets
    import transformers

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


@contextlib.contextmanager
def env_info_once() -> Iterator[None]:
    """Collect lm-eval's environment info once per run instead of once per task.

    simple_evaluate calls `add_env_info`, which shells out (`pip list`, ...) for ~1.2 s;
    we call simple_evaluate once per task, so reuse the first answer. Restored on exit.
    """
    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info
    cache: dict = {}

    def cached(storage: dict) -> None:
        if not cache:
            original(cache)
        storage.update(cache)

    evaluator.add_env_info = cached
    try:
        yield
    finally:
        evaluator.add_env_info = original
