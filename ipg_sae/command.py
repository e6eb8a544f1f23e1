"""Command-line glue shared by ``ipg-sae`` and ``python -m sae_training``: run one job from parsed arguments.

User errors (:class:`~ipg_sae.errors.IPGError`) and file-system errors print one line and exit 2;
SIGTERM stops a job the way Ctrl-C does, so checkpoints and ``finally`` blocks run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .config import load_config, overrides_from_args
from .errors import IPGError


def run_job(args: argparse.Namespace, cfg_cls, job, resumes: bool = True) -> int:
    """Load ``cfg_cls`` from ``args`` (YAML + flags) and run ``job(cfg)``: the shared body of every
    command line here and in ``python -m sae_training``. User errors print one line, exit 2."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "verify", False):
        os.environ["IPG_SAE_VERIFY"] = "1"  # digest.file_digest hashes every file afresh
    previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM stops a run the way Ctrl-C does
    try:
        check_utf8_arguments(args)
        overrides = overrides_from_args(args)
        if args.no_wandb:
            overrides["wandb.enabled"] = False
        cfg = load_config(cfg_cls, args.config, overrides)
        # After the config is checked: importing transformers takes ~0.5 s, which a config's typo need not wait for
        _quiet_weight_loading()
        job(cfg)
    except IPGError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only directory, ...: the files already written are intact
        if args.debug:
            raise
        where = f" {e.filename}" if e.filename else ""
        fix = ("move or remove that folder" if isinstance(e, IsADirectoryError) else
               "free disk space or fix the permissions")
        print(f"error: cannot write or read{where}: {e.strerror or e}; {fix}, then rerun the same command to resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kind = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        then = ("finished work is saved, rerun the same command to resume" if resumes else
                "this command keeps no partial work, rerun it to start over")
        print(f"stopped: {kind}; {then}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def check_utf8_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line, an argument holding a byte that is not UTF-8 (Python keeps it as a surrogate escape,
    which no file written here could hold: configs, markers and the run lock are UTF-8)."""
    for dest, value in vars(args).items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            what = "the config path" if dest == "config" else f"--{dest.removeprefix('cfg:')}"
            try:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate that is no escaped byte
                shown = value.encode("utf-8", "backslashreplace").decode("ascii")
            raise IPGError(f"{what} '{shown}' holds a byte that is not UTF-8; rename that file or folder (or give "
                           "another path) so that its name is UTF-8") from None


def _quiet_weight_loading() -> None:
    """transformers draws a progress bar for every model load (a fraction of a second here): noise on stderr."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so checkpoints and ``finally`` blocks run as for Ctrl-C."""


def _terminated(_signum, _frame):
    raise Terminated()
