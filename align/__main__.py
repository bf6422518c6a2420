"""`python -m align ...`: the same as the `align` command (used by `accelerate launch -m align`)."""

from align.commands.cli import main

# Guarded: a child process that re-runs the parent's main module under another name (the
# annotation server's import process, started through anyio.to_process, does) must not run
# the CLI again.
if __name__ == "__main__":
    main()
