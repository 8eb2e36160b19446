"""The cache on disk: the build pipeline, the write side, the mmap reader, neurons files."""
