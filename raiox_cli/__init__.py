"""raiox: identify the dental implant system in a radiograph."""

__version__ = "0.1.0"
