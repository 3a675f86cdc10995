"""The golden cases' generators, one module per case kind, each with a `cases()` that yields the
kind's cases (with their seeds) from real peft; common.py holds what they share. golden/generate.py
runs them all, in kind order, and writes or checks golden/cases."""
