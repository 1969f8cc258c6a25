"""Placeholder: this verb lands with the foundation issue."""


def register(subparsers) -> None:
    pass
