"""Benchmark tooling: a load generator for OpenAI-compatible servers and this machine's compute ceilings.

Kept outside the ``server`` package so it runs against any server (ours, llama.cpp's, vLLM's) and never
imports the engine it measures.
"""
