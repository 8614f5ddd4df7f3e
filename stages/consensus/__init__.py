"""Consensus: pure, versioned policies turning a step's evidence into one label."""
