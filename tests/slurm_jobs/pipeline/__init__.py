"""Fake stage entry points for the SLURM plumbing tests (see ../README.md)."""
