"""fgdata: data construction for fine-grained and hierarchical vision-language alignment."""

__version__ = "0.1.0"
