"""SampledKD: knowledge distillation from a sparse, unbiased, 37-byte-per-position teacher cache.

Stages, each `python -m pipeline.<stage>` (a thin entry module here; the code in its package):
  cache     -> stage1_cache/     the teacher's one pass: corpus -> windows -> sampled classes -> shards
  distill   -> stage2_distill/   the student trained from the cache under DeepSpeed ZeRO-3
  evaluate  -> stage3_evaluate/  held-out metrics and lm-eval tasks
cache_format/ is the contract between stage 1 and stage 2 (docs/CACHE_FORMAT.md); common/ is
what every stage shares; demo/ builds the embedded default's assets. docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
