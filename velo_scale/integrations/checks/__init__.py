"""Repeatable integration checks against real T5X and AlgoPerf checkouts
(`t5x_check.py`, `algoperf_check.py`; run as scripts, see the README)."""
