"""Benchmarks behind ``fastflow bench`` and the scripts in ``bench/``: they print tables and return JSON rows."""
