"""The cache format, the contract between stage 1 and stage 2: the codec of a position's
records, the manifest, the shard writer and the reader (docs/CACHE_FORMAT.md).
"""
