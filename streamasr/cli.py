"""What the package's command-line entry points share (standard library only)."""

from __future__ import annotations

import argparse


def argument_parser(
    prog: str, doc: str | None, description: str | None = None
) -> argparse.ArgumentParser:
    """A parser whose --help shows ``doc`` (the module documentation) as written: as the
    description, or after a one-line ``description`` when one is given."""
    if description is None:
        return argparse.ArgumentParser(
            prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
