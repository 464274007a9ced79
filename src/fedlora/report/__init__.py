"""Run folders: metrics files, plots, comparison tables."""
