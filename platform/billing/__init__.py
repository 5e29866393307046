"""Billing: memory-time usage records (one per instance) and the price table."""
