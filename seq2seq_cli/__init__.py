"""translate: a command-line neural machine translation toolkit (package seq2seq_cli)."""

__version__ = "0.1.0"
