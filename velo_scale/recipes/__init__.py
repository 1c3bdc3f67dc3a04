"""Gin recipes that ship inside the package (the CLI's embedded default)."""
