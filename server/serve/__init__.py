"""The gRPC edge: request and message encoding, admission and limits, authentication, the
service's handlers.
"""
