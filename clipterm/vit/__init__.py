"""Model families: loading, the exact decomposition, second-order effects, fast text encoding."""
