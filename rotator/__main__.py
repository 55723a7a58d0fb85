"""``python -m rotator``, and the ``rotator`` console script (`run`)."""

import sys


def run() -> None:
    """Run the command line. Ctrl-C while it loads (half a second of imports) is exit
    130 without a traceback, as it is once it runs."""
    try:
        from rotator.cli.main import main  # noqa: PLC0415 (imported inside the guard)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(main())


if __name__ == "__main__":
    run()
