"""Running the ``microattn`` command inside a test."""

from microattn.demo import cli


def run_cli(*argv):
    return cli.main([str(arg) for arg in argv])


def status_of(*argv):
    """The exit status, also of a usage error (argparse exits with 2)."""
    try:
        return run_cli(*argv)
    except SystemExit as exit_info:
        return exit_info.code
