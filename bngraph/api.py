"""The Python API behind each command: every command is a function first."""
