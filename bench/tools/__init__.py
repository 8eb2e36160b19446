"""What the benchmarks use: the synthetic-cache generator, and the toy recipe on a GPU."""
