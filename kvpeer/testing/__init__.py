"""Test and benchmark harness: network namespaces, an impairment relay, fixtures.

Not used by the daemon itself.
"""
