"""A/B grids: the runner (``python -m train.ab``), evaluation, report, plots, statistics and inspection."""
