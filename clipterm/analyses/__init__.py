"""The methods, reading the cache (and the model where they must): pure results, no UI."""
