"""``python -m train.ab``: run an A/B comparison (see ``train.ab.runner``)."""

from train import cli
from train.ab.runner import main

cli.run(main)
