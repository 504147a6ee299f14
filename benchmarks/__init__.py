"""Benchmarks: one script per question, each printing its figures and writing JSON to results/."""
