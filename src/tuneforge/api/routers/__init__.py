"""Routers: parse, authorize, call db/ or scheduler/, return a spec.api shape. Nothing more."""
