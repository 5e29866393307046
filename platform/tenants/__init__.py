"""Tenants and their API keys: who is calling, and with which role."""
