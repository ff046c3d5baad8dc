"""The version, kept here (not read from installed metadata) so a vendored copy knows it too."""

#: changeloop's version (PEP 440), the one place it is written: pyproject.toml reads it from here.
__version__ = "0.1.0"
