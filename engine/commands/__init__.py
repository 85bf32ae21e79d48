"""Command-line sub-commands that belong to no single module."""
