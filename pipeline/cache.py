"""`python -m pipeline.cache`: stage 1, the teacher's pass over the corpus into the sampled cache.

The code lives in `pipeline/stage1_cache/` (docs/ARCHITECTURE.md); this module keeps the command
where it was. `--help` prints the stage's flags."""

from pipeline.stage1_cache.run import main

if __name__ == "__main__":
    from pipeline.common.errors import clean_errors

    with clean_errors("pipeline.cache"):    # bad input: one line, not a traceback
        main()
