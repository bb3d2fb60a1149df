"""`python -m metalab algo=imaml tasks=omniglot`: the same command line as `metalab` and train.py."""

from metalab.app.cli import main

if __name__ == "__main__":
    main()
