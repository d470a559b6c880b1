"""Runs without a tracker: an overview of the runs under a folder, and side-by-side comparison."""
