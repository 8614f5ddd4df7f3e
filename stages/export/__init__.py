"""Export: the labelled step tree as TRL-ready datasets."""
