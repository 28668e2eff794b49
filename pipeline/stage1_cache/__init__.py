"""Stage 1 (`python -m pipeline.cache`): the teacher's one pass over the corpus. Corpus to
windows (units, packing), the teacher forward, the class sampler, the ledger of work units.
"""
