"""Outrider: speculative decoding with placed draft and target models."""
