"""Generation backends behind the server: the interface (base.py) and twinrt's engine (local.py)."""
