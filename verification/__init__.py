"""Verification tier: coverage studies of `qtm fit` on data simulated from known parameters.

Run with `make verify` or `python -m verification --help`. Not part of the installed packages: it is a
research check of the fit's calibration, run by hand or in the slow tests (small versions), never in the
default test suite.
"""
