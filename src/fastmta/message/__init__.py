"""Building a message: the compiled core (wire encoding, templating, DKIM
canonicalization) and its pure-Python reference, templates, MIME assembly,
header handling and the DKIM signer.

Pure functions over bytes; no I/O besides reading keys.
"""
