"""Delegated Python in separate, pre-warmed processes (``pool``) running ``child``."""
