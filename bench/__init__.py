"""Side-by-side benchmarks: every figure is a ratio measured in one run, written to JSON."""
