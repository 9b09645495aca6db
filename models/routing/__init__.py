"""Routing: which posts a human should review. One family: `policy` (the review policies a
card carries, their scores and cuts), `gate` (whether ITM evidence may route a card without a
policy), `route` (the routing stage the worker runs on every label, and the operator's
overrides, which each Label records). Fitting a policy is training: trainer/routing_fit.py."""
