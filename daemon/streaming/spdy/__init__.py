"""SPDY/3.1 as Kubernetes uses it (moby/spdystream on the other end).

``frames`` encodes and decodes frames, ``headers`` holds the name/value block and
its zlib compression with the SPDY/3 dictionary, ``session`` multiplexes streams
over one asyncio connection.
"""
