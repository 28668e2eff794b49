"""Stage 2 (`python -m pipeline.distill`): the student trained from the cache under DeepSpeed
ZeRO-3. Configuration and recipes, the trainer, objectives and losses, position selection,
checkpoints, export, validation during training.
"""
