"""Top-level commands about the embedded local stack: `demo` and `up`."""

from __future__ import annotations


def demo() -> None:
    """Run the whole story on the embedded local stack."""
    raise NotImplementedError("local stack issue")


def up() -> None:
    """Start the local stack and keep it running."""
    raise NotImplementedError("local stack issue")
