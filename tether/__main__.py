"""`python -m tether`: the command line (tether.cli)."""

from tether.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
