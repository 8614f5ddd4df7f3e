"""Measuring instruments for tests and benchmarks (synthetic world, fault proxy, local llama.cpp server). Not stages."""
