"""Decode rules, one module per cached-attention op (the table is ``passes/decode_rules.py``)."""
