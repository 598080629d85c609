"""`python -m central.cli`, as the tests and benches start the receiver."""

from central.cli import main

main()
