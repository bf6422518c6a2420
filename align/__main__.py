"""`python -m align ...`: the same as the `align` command (used by `accelerate launch -m align`)."""

from align.commands.cli import main

main()
