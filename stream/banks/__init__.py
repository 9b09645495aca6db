"""Verdict banks (issue 20): a reviewer decides an image once, and every repost of it, byte for
byte (sha256) or perceptually (PDQ), gets that decision before the model sees it.

This package is the pure core, no Kafka, no Redis: the hashes (hashing), the PDQ
nearest-neighbour index (index), the banks with their entries, updates and match rule (bank),
and ThreatExchange hash lists (te_csv).
"""
