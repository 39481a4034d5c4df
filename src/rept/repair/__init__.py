"""Repair: remove or unlearn culprits (mitigate), trace-remove-retrain rounds (rounds), and an edit
at inference (correct)."""
