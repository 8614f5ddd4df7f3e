"""Agent trajectories: what a step is, WebSTAR step filtering, reasoning augmentation, agent step pairs."""
