"""`python -m watchlist.cli`, as the documentation walkthrough's test runs the command."""

from watchlist.cli import main

main()
