"""``python -m gensuite.train JOB [--set k=v] [--run-dir DIR]`` (the form ``accelerate launch -m`` needs)."""

import sys

from gensuite.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
