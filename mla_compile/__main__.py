"""python -m mla_compile: the mla-compile command line (mla_compile.cli)."""

import sys

from mla_compile.cli import main

if __name__ == "__main__":
    sys.exit(main())
