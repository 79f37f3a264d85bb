"""Runnable experiments reproducing the paper's results: `python -m experiments.<name>`."""
