"""The control plane's state: SQLAlchemy tables, sessions, migrations and data-access functions.

Functions take the session first and keyword arguments after; they return rows, and never commit
(the caller owns the transaction). Status writes live in scheduler/states.py, nowhere else.
"""
