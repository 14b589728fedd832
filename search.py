#!/usr/bin/env python
"""Transfer-learning hyperparameter search (KerasTuner) for 28×28 grayscale datasets.

    python search.py                      # the whole job: search → retrain → export → report
    python search.py data [--data PATH]   # load, validate and summarise a dataset
    python search.py search|retrain|export|report [--run-dir DIR]
    python search.py predict --model DIR INPUT...
    python search.py tensorboard [--run-dir DIR]

Errors the user can fix print one line and exit 2; anything else is a bug and keeps
its traceback.
"""

import sys


def main(argv=None):
    from tuning import cli

    return cli.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
