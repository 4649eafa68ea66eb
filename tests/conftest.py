"""Shared test setup. Server fixtures (memcached, S3, WSGI servers) live in
tests/support/ and are imported by the test modules that need them."""
