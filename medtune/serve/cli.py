"""Command-line verbs of this stage (registered by ``medtune.cli``)."""


def register(subparsers) -> None:
    """Nothing yet: this stage's verbs land with its issue."""
