"""Entry point: `python train.py algo=maml tasks=sinusoid solver=unroll` (see README)."""

from metalab.app.cli import main

if __name__ == "__main__":
    main()
