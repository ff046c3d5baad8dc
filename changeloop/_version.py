"""The version, kept here (not read from installed metadata) so a vendored copy knows it too."""

__version__ = "0.1.0"
