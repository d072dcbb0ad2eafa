"""Runs a job's recipe (or tunes one) on a loaded model and reports what was gained and lost."""
