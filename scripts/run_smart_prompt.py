#!/usr/bin/env python3
"""The guide's step 2: answer a prompt from a cache, or text-only without --cache (same as `vlcache ask`)."""

import argparse
import sys

import _bootstrap  # noqa: F401

from vlcache import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Answer a prompt using a cached image state.")
    cli.add_ask_arguments(parser, ("--max_new_tokens", "--max-new-tokens"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return cli.run_command(cli.run_ask, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
