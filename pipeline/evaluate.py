"""`python -m pipeline.evaluate`: stage 3, evaluating a student (held-out metrics and lm-eval tasks).

The code lives in `pipeline/stage3_evaluate/` (docs/ARCHITECTURE.md); this module keeps the command
where it was. `--help` prints the stage's flags."""

from pipeline.stage3_evaluate.run import main

if __name__ == "__main__":
    main()
