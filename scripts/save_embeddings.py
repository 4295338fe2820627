#!/usr/bin/env python3
"""The guide's step 1: process an image and save the model state (same as `vlcache cache`)."""

import argparse
import sys

import _bootstrap  # noqa: F401

from vlcache import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Process an image once and cache the model state.")
    parser.add_argument("--image", dest="images", type=lambda text: [text], required=True, help="path to the image file")
    parser.add_argument("--output", required=True, help="where to save the cache file (.pt works: it is safetensors)")
    cli.add_cache_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return cli.run_command(cli.run_cache, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
