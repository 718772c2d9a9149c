"""edgefilter: harassment-call screening for Asterisk."""
__version__ = "0.1.0"
