"""`python -m pipeline.distill`: stage 2, training the student from the cache.

The code lives in `pipeline/stage2_distill/` (docs/ARCHITECTURE.md); this module keeps the command
where it was. `--help` prints the stage's flags."""

from pipeline.stage2_distill.trainer import main

if __name__ == "__main__":
    from pipeline.common.errors import clean_errors

    with clean_errors("pipeline.distill"):    # bad input: one line, not a traceback
        main()
