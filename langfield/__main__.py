"""``python -m langfield``: the CLI (what ``torchrun ... -m langfield <verb>`` runs on every rank)."""

import sys

from langfield.cli import main

if __name__ == "__main__":
    sys.exit(main())
