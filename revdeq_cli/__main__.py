"""`python -m revdeq_cli ...` (also what `torchrun -m revdeq_cli train ...` runs)."""

from revdeq_cli.cli.app import main

if __name__ == "__main__":
    main()
