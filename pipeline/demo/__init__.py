"""Demo scaffolding, not the pipeline: the embedded real assets (`assets`: teacher, student
cut, Wikipedia text from PyPI wheels; `wikitext`: the dump's cleaner) and tiny HF models
built from configs for tests and benchmarks (`tiny`)."""
