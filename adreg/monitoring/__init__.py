"""Monitoring of registered versions in production: ``drift`` (recent images' scores against the
reference good-image scores logged at fit). Above ``adreg.registry``, which it reads; re-exports nothing.
"""
