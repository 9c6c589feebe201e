"""Cryptobat: a DNSSEC signing HSM that enforces DNSSEC policy itself."""
__version__ = "0.1.0"
