"""The cache format, the contract between stage 1 and stage 2: the codec of a position's
records, the manifest, the shard writer, the checks of a shard file and of a sample
(checks.py: the only ones), the whole-cache verification, the statistics and the reader
(docs/CACHE_FORMAT.md, "Where the format lives in code").
"""
