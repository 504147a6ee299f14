"""Streams: one rank's walk through the global order, dealt into batches (rows or token budgets),
without gRPC.
"""
