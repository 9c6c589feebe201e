"""The steps of ``cryptobat signzone``, one module each.

``reader`` (master files) and ``keys`` (BIND key files) read the inputs; ``prepare`` builds
the zone to sign (serial, DNSKEY RRset, node kinds) and ``chain`` its NSEC/NSEC3 chain;
``inputs`` streams the RFC 4034 signing inputs in batches (``batch``), ``pipeline`` keeps a
bounded number of them at the token, ``output`` writes the result atomically, ``verify``
checks the token's signatures, ``stats`` reports; ``roles`` decides which key signs what.
"""
