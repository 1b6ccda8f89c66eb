"""Tools that read resdiff's own source (its import graph, the shape of its code): `python -m tools.NAME`."""
