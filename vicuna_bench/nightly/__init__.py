"""The nightly regression run: its SQLite history, the regression rule and REPORT.md.

``history`` stores one row per run and one per metric; ``rules`` judges a
run's metrics against a window of comparable earlier runs; ``report`` writes
the ``REPORT.md`` a person reads first, with trend plots.  See docs/nightly.md.
"""
