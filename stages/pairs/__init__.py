"""Pairs: step-level preference pairs from the labelled step tree."""
