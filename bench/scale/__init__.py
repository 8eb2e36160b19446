"""Scale and memory: the read side on big synthetic caches, and peak resident memory against a baseline."""
