"""The ``fisherstore`` command (installed as ``fisherstore.cli``): argument parsing and output only."""
