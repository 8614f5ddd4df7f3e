"""Infrastructure the stages execute through: the sandbox for model-written code. Not a stage."""
