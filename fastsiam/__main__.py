"""``python -m fastsiam`` (also what torchrun runs: ``torchrun ... -m fastsiam train ...``)."""

from fastsiam.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
