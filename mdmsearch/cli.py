"""Command line: thin argparse front end -> validated config -> run()."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import MDMError

log = logging.getLogger("mdmsearch")


def _cmd_processes(args: argparse.Namespace) -> int:
    from .diffusion import available_processes, preset

    for name in available_processes():
        if name == "learned":
            sys.stdout.write("learned   n = K + 1, Q = U - U^T and D = L L^T learned (masks select free entries)\n")
            continue
        proc = preset(name)
        q = proc.Q.tolist()
        d = proc.D.tolist()
        sys.stdout.write(f"{name:<9} n = {proc.n}  Q = {q}  D = {d}  valid = {proc.check().valid}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdmsearch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("processes", help="list the registered processes and their Q, D")
    p.set_defaults(func=_cmd_processes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MDMError as exc:
        sys.stderr.write(f"mdmsearch: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
