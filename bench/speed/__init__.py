"""Speed against a baseline measured in the same run: each prints its figures and the ratio."""
