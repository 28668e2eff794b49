"""Stage 3 (`python -m pipeline.evaluate`): held-out metrics and the lm-eval tasks.
"""
