"""`python -m seq2seq_cli ...` works like `translate ...`."""

from .cli import main

main()
