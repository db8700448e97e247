"""stockward's benchmark suite: `make bench` (or `make bench-quick`) runs every
scenario against stockward and its baselines side by side and writes a report under
benchmarks/results/."""
