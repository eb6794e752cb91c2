"""``peftlab train --nproc N``: run the same command again under torchrun, N processes on this machine.

The command line is passed through unchanged except for ``--nproc`` itself, so

    peftlab train --nproc 2 --method lora --out runs/x
    torchrun --standalone --nproc-per-node 2 -m peftlab -- train --method lora --out runs/x

are the same run (``python -m torch.distributed.run`` is what the ``torchrun`` script starts). The ``--``
matters: torchrun's own parser accepts abbreviations and would take peftlab's ``--r 8`` for an ambiguous
``--rdzv-...`` option; after ``--`` it passes everything to peftlab untouched.
"""
from __future__ import annotations

import subprocess
import sys

from peftlab.train.distributed import launched


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` with every ``--nproc N`` / ``--nproc=N`` removed."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``peftlab <argv>`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "peftlab", "--", *without_nproc(argv)]  # "--": torchrun reads none of peftlab's options


def needs_relaunch(nproc: int) -> bool:
    """More than one process asked for, and this is not already one of torchrun's processes."""
    return nproc > 1 and not launched()


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run this command under torchrun and return its exit status (torchrun stops every process when one fails)."""
    argv = sys.argv[1:] if argv is None else argv
    return subprocess.run(torchrun_command(nproc, argv), check=False).returncode
