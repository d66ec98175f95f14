"""First code a SLURM task runs: ``python -m gensuite.slurm_entry -u -m submitit.core._submit FOLDER``.

SLURM may send its time-limit warning (SIGUSR2) up to a minute early, even while the interpreter
is still importing torch, before submitit has installed its handler; the default action would kill
the task and end the job unrequeued. This module only records such early signals, then hands over
to submitit; ``StopRequest.install`` replays them. Expected ends of the task (bad input, out of
requeues) leave one line in the .err log instead of a traceback. Keep it free of heavy imports.
"""

import runpy
import signal
import sys

received: list[int] = []


def _record(signum, frame) -> None:
    received.append(signum)


def main() -> None:
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, _record)
    args = [a for a in sys.argv[1:] if a != "-u"]  # python's own flag, passed along by submitit
    if args[:2] != ["-m", "submitit.core._submit"]:
        raise SystemExit(f"usage: python -m gensuite.slurm_entry -m submitit.core._submit FOLDER (got {args})")
    sys.argv = ["submitit.core._submit", *args[2:]]
    sys.modules.setdefault("gensuite.slurm_entry", sys.modules[__name__])  # where StopRequest looks
    try:
        runpy.run_module("submitit.core._submit", run_name="__main__", alter_sys=True)
    except Exception as e:
        # Expected ends of a task are one line in its .err log, not a traceback (submitit has
        # already stored the outcome for --status): bad input, and running out of requeues.
        from gensuite.errors import GensuiteError

        if isinstance(e, GensuiteError):
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        if type(e).__name__ == "UncompletedJobError":
            print(f"error: {e} (the last checkpoint is kept: submit the job again to continue)",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
