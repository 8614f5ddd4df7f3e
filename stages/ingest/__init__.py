"""Ingest: sources and importers turn dataset rows into problems (and imported trajectories and labels)."""
