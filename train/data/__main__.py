"""Data sets from the command line: list them, show the cache, fetch from the hub, install Debian packages.

python -m train.data list                      # every dataset: kind, offline source, help
python -m train.data where                     # the data cache folder
python -m train.data fetch cifar100            # download into the cache (bounded wait), e.g. on a login node
python -m train.data install fashion-mnist     # apt-get install its Debian package (as root)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from train.data import hub
from train.data.cache import ENV_VAR, default_root
from train.data.registry import DATASETS, help_lines, source
from train.data.splits import DatasetUnavailable


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every dataset: name, kind, source")
    commands.add_parser("where", help=f"the data cache folder (${ENV_VAR}, else ~/.cache/liere)")
    fetch = commands.add_parser("fetch", help="download a Hugging Face hub dataset into the data cache")
    fetch.add_argument("name", choices=sorted(hub.HUB_DATASETS))
    fetch.add_argument("--timeout", type=float, default=hub.Hub.timeout, help="seconds for the hub's first answer")
    fetch.add_argument("--deadline", type=float, default=hub.Hub.deadline, help="seconds for the whole download")
    install = commands.add_parser("install", help="apt-get install the Debian packages of a dataset (as root)")
    install.add_argument("name", choices=sorted(n for n, s in DATASETS.items() if s.debian_packages))
    download = commands.add_parser("download", help="what fetch runs in its child process: no time limit")
    download.add_argument("name", choices=sorted(hub.HUB_DATASETS))
    for command in (fetch, download):
        command.add_argument("--root", type=Path, default=None, help="data cache folder (default: see `where`)")
    return p


def install(name: str) -> int:
    """``apt-get install -y`` the dataset's Debian packages; as non-root, say which command to run."""
    command = ["apt-get", "install", "-y", *source(name).debian_packages]
    if os.geteuid() != 0:
        print(f"installing needs root: run `sudo {' '.join(command)}`", file=sys.stderr)
        return 1
    return subprocess.run(command).returncode


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = getattr(args, "root", None) or default_root()
    if args.command == "list":
        print(help_lines())
    elif args.command == "where":
        print(default_root())
    elif args.command == "install":
        return install(args.name)
    elif args.command == "download":
        hub.download(args.name, root)
    else:
        data = hub.fetch(args.name, root, hub.Hub.from_env(online=True, timeout=args.timeout, deadline=args.deadline))
        print(f"{args.name}: {data['source']} in {root}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DatasetUnavailable as err:
        sys.exit(f"error: {err}")
