"""Ledger storage: SQLAlchemy models, the engine factory, the SQL ledger store and its background writer."""
