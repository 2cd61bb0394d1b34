"""The side-by-side benchmark behind `scripts/bench` (see docs/benchmarks.md). Not collected by pytest."""
