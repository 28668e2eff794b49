"""SampledKD: knowledge distillation from a sparse, unbiased, 37-byte-per-position teacher cache.

Stages (each `python -m pipeline.<stage>`): `cache` (teacher -> WebDataset shards),
`distill` (student under DeepSpeed ZeRO-3), `evaluate` (lm-eval). See DESIGN in README.
"""

__version__ = "0.1.0"
