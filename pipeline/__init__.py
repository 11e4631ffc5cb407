"""fgdata: data construction for fine-grained and hierarchical vision-language alignment."""

__version__ = "0.2.0"
